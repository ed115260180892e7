"""The HTTP request contract: a JSON body of bounded size becomes validated decode parameters,
or an ApiError (4xx) that names the field to fix. Pure functions: no actors, no event loop."""

from __future__ import annotations

import json
import math

from fastapi import Request

# OpenAI's fields tide serves; any other is refused by name (never silently ignored)
SUPPORTED = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
             "top_p", "top_k", "stop", "seed", "n", "stream", "user", "stream_options"}
ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 256
MAX_STOPS, MAX_STOP_CHARS = 4, 256
MAX_NAME_CHARS = 256  # model, user
SEED_RANGE = (0, 2**63 - 1)  # torch.Generator.manual_seed's range


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.retry_after_s = retry_after_s


async def read_body(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object, read in chunks and refused (413) past max_bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length is not a number")
        if int(declared) > max_bytes:
            raise ApiError(413, f"request body is {int(declared)} bytes; the limit is {max_bytes} "
                                "(serving.max_body_bytes)")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise ApiError(413, f"request body exceeds {max_bytes} bytes (serving.max_body_bytes)")
    return parse_body(bytes(raw))


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except ValueError as e:  # e.g. an integer past Python's 4300-digit limit, NaN/Infinity
        raise ApiError(400, f"request body is not valid JSON: {str(e)[:120]}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _text(value, field: str, max_chars: int | None = None) -> str:
    """A string that is valid Unicode (no lone surrogates) and not too long."""
    if not isinstance(value, str):
        raise ApiError(400, f"{field} must be a string", param=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{field} holds an invalid Unicode character (a lone surrogate)",
                       param=field) from None
    if max_chars is not None and len(value) > max_chars:
        raise ApiError(400, f"{field} is {len(value)} characters; at most {max_chars}", param=field)
    return value


def _number(body: dict, field: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(field)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not (lo < v if lo_open else lo <= v) or v > hi:
        raise ApiError(400, f"{field} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]", param=field)
    return float(v)


def _integer(body: dict, field: str, default, lo: int, hi: int):
    v = body.get(field)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ApiError(400, f"{field} must be an integer in [{lo}, {hi}]", param=field)
    return v


def decode_params(body: dict, max_tokens_cap: int, vocab: int) -> dict:
    """The sampling fields of a completion or chat request, validated."""
    unknown = sorted(set(body) - SUPPORTED)
    if unknown:
        raise ApiError(400, f"unsupported parameter(s): {', '.join(unknown)}", param=unknown[0])
    if body.get("model") is not None:
        _text(body["model"], "model", MAX_NAME_CHARS)
    if body.get("user") is not None:
        _text(body["user"], "user", MAX_NAME_CHARS)
    if body.get("n") is not None and (body["n"] != 1 or isinstance(body["n"], bool)):
        raise ApiError(400, "only n=1 is supported", param="n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or set(opts) - {"include_usage"}
                             or not isinstance(opts.get("include_usage", False), bool)):
        raise ApiError(400, "stream_options must be {\"include_usage\": true|false}", param="stream_options")
    field = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    max_tokens = _integer(body, field, 128, 1, max_tokens_cap)
    temperature = _number(body, "temperature", 0.0, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1, lo_open=True)
    top_k = _integer(body, "top_k", 0, -1, vocab)  # -1 (vLLM) and 0 both mean off
    seed = _integer(body, "seed", None, *SEED_RANGE)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not 1 <= len(stop) <= MAX_STOPS:
            raise ApiError(400, f"stop must be a string or a list of 1 to {MAX_STOPS} strings", param="stop")
        for s in stop:
            if not _text(s, "stop", MAX_STOP_CHARS):
                raise ApiError(400, "stop strings must not be empty", param="stop")
    return {"max_new_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
            "top_k": max(top_k, 0), "seed": seed, "stop": stop or [], "stream": bool(stream)}


def prompt_of(body: dict, chat: bool, max_chars: int) -> dict:
    """{"messages": [...]} for chat, {"prompt": str} for a completion, validated."""
    if chat:
        if "prompt" in body:
            raise ApiError(400, "chat completions take messages, not prompt", param="prompt")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or len(msgs) > MAX_MESSAGES:
            raise ApiError(400, f"messages must be a list of 1 to {MAX_MESSAGES} {{role, content}} objects",
                           param="messages")
        out = []
        for i, m in enumerate(msgs):
            where = f"messages[{i}]"
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ApiError(400, f"{where} must be an object with role one of {', '.join(ROLES)}",
                               param="messages")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI's content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ApiError(400, f"{where}.content: only text parts are supported", param="messages")
                content = "".join(_text(p.get("text"), f"{where}.content", max_chars) for p in content)
            out.append({"role": m["role"], "content": _text(content, f"{where}.content", max_chars)})
        if not any(m["content"].strip() for m in out):
            raise ApiError(400, "messages are empty", param="messages")
        return {"messages": out}
    if "messages" in body:
        raise ApiError(400, "completions take prompt, not messages (use /v1/chat/completions)",
                       param="messages")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "prompt must be a non-empty string", param="prompt")
    return {"prompt": _text(prompt, "prompt", max_chars)}


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)
