"""OpenAI-compatible HTTP front over the serving actors.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as SSE),
GET /v1/models, GET /health, GET /metrics (Prometheus text). Requests go to the replica with
the fewest in-flight requests; when every replica's queue is full the answer is 429 at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from serving.metrics import prometheus_text

SUPPORTED = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
             "top_p", "stop", "seed", "n", "stream", "user", "stream_options", "top_k"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _err(status: int, message: str, kind: str = "invalid_request_error", param=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


class Router:
    """Least-in-flight routing with a bounded queue per replica."""

    def __init__(self, actors: list, max_queue: int):
        self.actors = actors
        self.inflight = [0] * len(actors)
        self.max_queue = max_queue

    def acquire(self) -> int:
        i = min(range(len(self.actors)), key=lambda j: self.inflight[j])
        if self.inflight[i] > self.max_queue:  # one decoding + max_queue waiting
            raise ApiError(429, "all replicas are busy; retry later", "rate_limit_error")
        self.inflight[i] += 1
        return i

    def release(self, i: int) -> None:
        self.inflight[i] -= 1


def _params(body: dict, max_tokens_cap: int) -> dict:
    unknown = sorted(set(body) - SUPPORTED)
    if unknown:
        raise ApiError(400, f"unsupported parameter(s): {', '.join(unknown)}", param=unknown[0])
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    mt = body.get("max_tokens", body.get("max_completion_tokens", 128))
    if not isinstance(mt, int) or isinstance(mt, bool) or not 1 <= mt <= max_tokens_cap:
        raise ApiError(400, f"max_tokens must be an integer in [1, {max_tokens_cap}]", param="max_tokens")
    temp = body.get("temperature", 0.0)
    if not isinstance(temp, (int, float)) or isinstance(temp, bool) or not 0 <= temp <= 2:
        raise ApiError(400, "temperature must be a number in [0, 2]", param="temperature")
    top_p = body.get("top_p", 1.0)
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise ApiError(400, "top_p must be a number in (0, 1]", param="top_p")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, "seed must be an integer", param="seed")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                             or len(stop) > 4):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4", param="stop")
    return {"max_new_tokens": mt, "temperature": float(temp), "top_p": float(top_p), "seed": seed,
            "stop": stop or []}


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": len(result["tokens"]),
            "total_tokens": result["prompt_tokens"] + len(result["tokens"]),
            "tide": {"draft_version": result["draft_version"],
                     "draft_versions": result.get("draft_versions", [result["draft_version"]]),
                     "drafted_tokens": result["drafted"],
                     "accepted_tokens": result["accepted"], "verify_passes": result["verify_passes"],
                     "acceptance_length": result["accept_len"], "replica": result["replica"]}}


def build_app(actors: list, model_id: str, max_context: int, max_queue: int,
              api_key_env: str = "TIDE_API_KEY") -> FastAPI:
    app = FastAPI(title="tide", docs_url=None, redoc_url=None)
    router = Router(actors, max_queue)
    api_key = os.environ.get(api_key_env) or None
    counters = {"ok": 0, "client_error": 0, "server_error": 0, "rejected": 0}
    app.state.router = router

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _err(401, "missing or wrong API key (Authorization: Bearer ...)",
                            "authentication_error")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        counters["rejected" if e.status == 429 else "client_error"] += 1
        return _err(e.status, e.message, e.kind, e.param)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "tide",
                                            "created": 0}]}

    @app.get("/metrics")
    async def metrics():
        stats = list(await asyncio.gather(*[a.stats.remote() for a in actors]))  # fresh, per scrape
        return PlainTextResponse(prometheus_text(stats, counters),
                                 media_type="text/plain; version=0.0.4")

    async def _body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "request body is not UTF-8") from None
        except json.JSONDecodeError as e:
            raise ApiError(400, f"request body is not valid JSON: {e.msg}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    async def _run(request: Request, chat: bool):
        body = await _body(request)
        params = _params(body, max_context - 1)
        if chat:
            msgs = body.get("messages")
            if (not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in
                    ("system", "user", "assistant") for m in msgs)):
                raise ApiError(400, "messages must be a non-empty list of {role, content} objects",
                               param="messages")
            if not any(m["content"].strip() for m in msgs):
                raise ApiError(400, "messages are empty", param="messages")
            prompt_kw = {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ApiError(400, "prompt must be a non-empty string", param="prompt")
            prompt_kw = {"prompt": prompt}
        i = router.acquire()
        try:
            actor = actors[i]
            ids = await actor.tokenize.remote(**prompt_kw)
            if len(ids) + 1 > max_context:
                raise ApiError(400, f"prompt is {len(ids)} tokens; the context holds {max_context}: "
                                    "shorten it", param="messages" if chat else "prompt")
            params["max_new_tokens"] = min(params["max_new_tokens"], max_context - len(ids))
            stops = params.pop("stop")
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            if body.get("stream"):
                return _stream(actor, i, ids, params, stops, rid, chat, body)
            result = await actor.generate.remote(ids, params, rid)
        except ApiError:
            router.release(i)
            raise
        except Exception as e:
            router.release(i)
            if "Overloaded" in type(e).__name__ or "Overloaded" in str(e)[:300]:
                counters["rejected"] += 1  # the replica's own queue bound (Ray wraps the error)
                return _err(429, "replica queue is full; retry later", "rate_limit_error")
            counters["server_error"] += 1
            return _err(500, f"generation failed: {type(e).__name__}", "server_error")
        router.release(i)
        counters["ok"] += 1
        text, stopped = _cut_at_stop(result["text"], stops)
        finish = "stop" if stopped else result["finish_reason"]
        created = int(time.time())
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [choice],
                "usage": _usage(result)}

    def _stream(actor, i, ids, params, stops, rid, chat, body):
        async def events():
            created = int(time.time())
            obj = "chat.completion.chunk" if chat else "text_completion"
            sent, done = "", False

            def chunk(delta_text, finish=None, usage=None):
                if chat:
                    delta = {"content": delta_text} if delta_text else {}
                    if not sent and delta_text:
                        delta["role"] = "assistant"
                    c = {"index": 0, "delta": delta, "finish_reason": finish}
                else:
                    c = {"index": 0, "text": delta_text, "finish_reason": finish, "logprobs": None}
                out = {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [c]}
                if usage is not None:
                    out["usage"] = usage
                return f"data: {json.dumps(out)}\n\n"

            tokens: list[int] = []
            finished = False
            try:
                gen = actor.generate_stream.options(num_returns="streaming").remote(ids, params, rid)
                async for ref in gen:
                    item = await ref
                    if "tokens" in item and "request_id" not in item:
                        if done:
                            continue
                        tokens += item["tokens"]
                        text = await actor.detokenize.remote(tokens)
                        if text.endswith("\ufffd"):
                            continue  # a multi-byte character is still incomplete
                        text, stopped = _cut_at_stop(text, stops)
                        if len(text) > len(sent):
                            yield chunk(text[len(sent):])
                            sent = text
                        done = stopped
                    else:
                        text, stopped = _cut_at_stop(item["text"], stops)
                        if len(text) > len(sent) and not done:
                            yield chunk(text[len(sent):])
                            sent = text
                        finish = "stop" if (stopped or done) else item["finish_reason"]
                        finished = True
                        yield chunk("", finish, _usage(item))
                counters["ok"] += 1
                yield "data: [DONE]\n\n"
            except Exception as e:
                counters["server_error"] += 1
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            finally:
                if not finished:  # the client went away: free the replica, not only our slot
                    actor.cancel.remote(rid)
                router.release(i)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _run(request, chat=True)

    return app
