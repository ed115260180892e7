"""OpenAI-compatible HTTP front over the serving actors.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as SSE),
GET /v1/models, GET /health, GET /metrics (Prometheus text). Requests go to the least loaded
replica that is up (serving.router); a full queue answers 429, no live replica or a replica that
dies mid-request a retryable 503, a call past serving.request_timeout_s 504. A client that goes
away (streaming or not) frees its slot and stops its decoding at the next verify pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from serving.metrics import prometheus_text
from serving.requests import ApiError, cut_at_stop, decode_params, prompt_of, read_body
from serving.router import Router
from tide.config import ServingConfig

log = logging.getLogger(__name__)
SMALL_CALL_S = 30.0  # tokenize, detokenize, stats: anything but decoding


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _err(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s else None
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}},
                        status_code=e.status, headers=headers)


def _usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": len(result["tokens"]),
            "total_tokens": result["prompt_tokens"] + len(result["tokens"]),
            "tide": {"draft_version": result["draft_version"],
                     "draft_versions": result.get("draft_versions", [result["draft_version"]]),
                     "drafted_tokens": result["drafted"],
                     "accepted_tokens": result["accepted"], "verify_passes": result["verify_passes"],
                     "acceptance_length": result["accept_len"], "replica": result["replica"]}}


class _Auth:
    """Bearer-key check on every route but /health, compared in constant time. A plain ASGI
    middleware: starlette's BaseHTTPMiddleware would hide client disconnects from the routes."""

    def __init__(self, app, key: bytes):
        self.app, self.expected = app, b"Bearer " + key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(sent, self.expected):
                resp = _err(ApiError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                     "authentication_error"))
                return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def build_app(actors: list, model_id: str, max_context: int, vocab: int, cfg: ServingConfig) -> FastAPI:
    app = FastAPI(title="tide", docs_url=None, redoc_url=None)
    router = Router(actors, cfg.max_queue + cfg.max_batch - 1)  # a full batch + max_queue waiting
    api_key = (os.environ.get(cfg.api_key_env) or "").encode() or None
    counters = {"ok": 0, "client_error": 0, "server_error": 0, "rejected": 0, "unavailable": 0,
                "client_gone": 0}
    app.state.router, app.state.counters = router, counters
    timeout_s = cfg.request_timeout_s

    @app.on_event("startup")
    async def start_probe():
        async def loop():
            while True:
                with contextlib.suppress(Exception):
                    await router.probe()
                await asyncio.sleep(1.0)

        app.state.probe = asyncio.create_task(loop())

    if api_key:
        app.add_middleware(_Auth, key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        counters["rejected" if e.status == 429 else "unavailable" if e.status == 503
                 else "server_error" if e.status >= 500 else "client_error"] += 1
        return _err(e)

    @app.get("/health")
    async def health():
        h = router.health()
        return JSONResponse(h, status_code=200 if h["replicas_up"] else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "tide",
                                            "created": 0}]}

    @app.get("/metrics")
    async def metrics():
        async def one(i, a):
            if router.down_since[i] is not None:
                return None
            with contextlib.suppress(Exception):
                return await asyncio.wait_for(a.stats.remote(), 5.0)
            return None

        stats = [s for s in await asyncio.gather(*(one(i, a) for i, a in enumerate(actors))) if s]
        return PlainTextResponse(prometheus_text(stats, counters, router.health(),
                                                 getattr(app.state, "stream_stats", None)),
                                 media_type="text/plain; version=0.0.4")

    def _failure(i: int, e: Exception) -> ApiError:
        """What a failed actor call means to the client."""
        import ray

        if isinstance(e, ApiError):
            return e
        if isinstance(e, ray.exceptions.RayActorError):
            router.mark_down(i, type(e).__name__)
            return ApiError(503, f"replica {i} stopped during the request (it restarts); retry",
                            "service_unavailable", retry_after_s=2)
        if isinstance(e, asyncio.TimeoutError):
            return ApiError(504, f"the replica did not answer within {timeout_s:g} s "
                                 "(serving.request_timeout_s)", "timeout_error")
        if "Overloaded" in type(e).__name__ or "Overloaded" in str(e)[:300]:
            return ApiError(429, "replica queue is full; retry later", "rate_limit_error", retry_after_s=1)
        log.error("generation failed: %s", str(e)[-2000:])
        return ApiError(500, f"generation failed: {type(e).__name__}", "server_error")

    async def _until_done_or_gone(request: Request, ref, rid: str, actor):
        """The actor call's result, or ClientGone (the replica is told to stop) if the client
        disconnects first."""
        task = asyncio.ensure_future(asyncio.wait_for(ref, timeout_s))
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                actor.cancel.remote(rid)
                task.cancel()
                raise ClientGone(rid)

    async def _run(request: Request, chat: bool):
        body = await read_body(request, cfg.max_body_bytes)
        params = decode_params(body, max_context - 1, vocab)
        prompt_kw = prompt_of(body, chat, cfg.max_prompt_chars)
        stream = params.pop("stream")
        i = router.acquire()
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                router.release(i)

        actor = actors[i]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            ids = await asyncio.wait_for(actor.tokenize.remote(**prompt_kw), SMALL_CALL_S)
            if len(ids) + 1 > max_context:
                raise ApiError(400, f"prompt is {len(ids)} tokens; the context holds {max_context}: "
                                    "shorten it", param="messages" if chat else "prompt")
            params["max_new_tokens"] = min(params["max_new_tokens"], max_context - len(ids))
            if stream:
                resp = StreamingResponse(_events(request, actor, i, ids, params, rid, chat, release),
                                         media_type="text/event-stream")
                resp.release = release
                return resp
            result = await _until_done_or_gone(request, actor.generate.remote(ids, params, rid), rid, actor)
        except ClientGone:
            counters["client_gone"] += 1
            release()
            return PlainTextResponse("", status_code=499)  # nobody reads it
        except Exception as e:
            release()
            raise _failure(i, e) from None
        release()
        counters["ok"] += 1
        text, stopped = cut_at_stop(result["text"], params["stop"])
        finish = "stop" if stopped else result["finish_reason"]
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_id, "choices": [choice], "usage": _usage(result)}

    async def _events(request, actor, i, ids, params, rid, chat, release):
        """SSE chunks as the verify passes finish. The slot is released however this ends: the
        stream runs out, the client leaves (starlette cancels this generator, or never starts
        it: see the background task below), or the replica fails."""
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        stops = params["stop"]
        sent = ""

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

        streamed = ""  # the text the replica streamed so far
        finished = False
        try:
            gen = actor.generate_stream.options(num_returns="streaming").remote(ids, params, rid)
            async for ref in gen:
                item = await asyncio.wait_for(ref, timeout_s)
                if await request.is_disconnected():
                    counters["client_gone"] += 1
                    return  # `finally` stops the decoding
                if "tokens" in item and "request_id" not in item:
                    text = streamed = streamed + item["text"]
                    text, _ = cut_at_stop(text, stops)
                    if len(text) > len(sent):
                        yield chunk(text[len(sent):])
                        sent = text
                else:
                    text, stopped = cut_at_stop(item["text"], stops)
                    if len(text) > len(sent):
                        yield chunk(text[len(sent):])
                        sent = text
                    finished = True
                    yield chunk("", "stop" if stopped else item["finish_reason"], _usage(item))
            counters["ok"] += 1
            yield "data: [DONE]\n\n"
        except Exception as e:
            err = _failure(i, e)
            counters["unavailable" if err.status == 503 else "server_error"] += 1
            yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind, 'code': err.status}})}\n\n"
        finally:
            if not finished:  # the client went away or the replica failed: stop the decoding
                with contextlib.suppress(Exception):
                    actor.cancel.remote(rid)
            release()

    def _streaming(request: Request, chat: bool):
        async def handler():
            resp = await _run(request, chat)
            if isinstance(resp, StreamingResponse):
                # runs after the response, even when the client left before the first chunk
                # and the generator never started (its `finally` would never run)
                gen = resp.body_iterator

                async def cleanup():
                    with contextlib.suppress(Exception):
                        await gen.aclose()
                    resp.release()

                from starlette.background import BackgroundTask

                resp.background = BackgroundTask(cleanup)
            return resp

        return handler()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _streaming(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _streaming(request, chat=True)

    return app
