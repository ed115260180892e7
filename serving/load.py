"""`tide load`: real prompts to the HTTP API, C concurrent clients, bounded in count and time."""

from __future__ import annotations

import itertools
import json
import threading
import time

import httpx

from tide.prompts import Prompt


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _post(http: httpx.Client, path: str, body: dict, stream: bool) -> dict:
    """One request; streamed, the time to its first text chunk is measured too."""
    t0 = time.monotonic()
    if not stream:
        r = http.post(path, json=body)
        res = {"status": r.status_code, "latency_s": time.monotonic() - t0}
        if r.status_code == 200:
            res["usage"] = r.json()["usage"]
        else:
            res["error"] = r.text[:200]
        return res
    res = {"status": 0}
    with http.stream("POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        res["status"] = r.status_code
        if r.status_code != 200:
            res["error"] = r.read().decode(errors="replace")[:200]
        for line in r.iter_lines() if r.status_code == 200 else ():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                res.update(status=500, error=str(event["error"].get("message"))[:200])
                break
            c = event["choices"][0] if event.get("choices") else {}  # the usage chunk may have none
            if "ttft_s" not in res and (c.get("text") or (c.get("delta") or {}).get("content")):
                res["ttft_s"] = time.monotonic() - t0
            if "usage" in event:
                res["usage"] = event["usage"]
    res["latency_s"] = time.monotonic() - t0
    if res["status"] == 200 and "usage" not in res:
        res.update(status=0, error="the stream ended without its final chunk")
    return res


def run_load(url: str, prompts: list[Prompt], concurrency: int = 1, requests: int | None = None,
             duration_s: float | None = None, max_tokens: int = 128, temperature: float = 0.0,
             api_key: str | None = None, timeout_s: float = 300.0, on_result=None, stream: bool = False,
             model: str | None = None) -> dict:
    """C clients send the prompts in order (cycling) until `requests` are sent or `duration_s`
    is over (requests=None and no duration: each prompt once). stream: SSE, time to first token
    measured. Any OpenAI-compatible server (tide's speculation figures, `usage.tide`, are zeros
    where a server has none); `model` names the model where the server wants one."""
    if requests is None and duration_s is None:
        requests = len(prompts)
    deadline = time.monotonic() + duration_s if duration_s else None
    order = itertools.cycle(range(len(prompts)))
    lock = threading.Lock()
    issued = 0
    results: list[dict] = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def next_prompt():
        nonlocal issued
        with lock:
            if requests is not None and issued >= requests:
                return None
            if deadline is not None and time.monotonic() >= deadline:
                return None
            issued += 1
            return prompts[next(order)]

    def client():
        with httpx.Client(base_url=url, timeout=timeout_s, headers=headers) as http:
            while (p := next_prompt()) is not None:
                body = {"max_tokens": max_tokens, "temperature": temperature, **({"model": model} if model else {})}
                if p.chat:
                    path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": p.text}]
                else:
                    path, body["prompt"] = "/v1/completions", p.text
                t0 = time.monotonic()
                try:
                    res = _post(http, path, body, stream)
                    if res["status"] == 200:
                        u = res.pop("usage")
                        spec = u.get("tide") or {"accepted_tokens": 0, "drafted_tokens": 0, "verify_passes": 0,
                                                 "draft_version": None}
                        res.update(tokens=u["completion_tokens"], **{k: spec[k] for k in (
                            "accepted_tokens", "drafted_tokens", "verify_passes", "draft_version")})
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    res = {"status": 0, "latency_s": time.monotonic() - t0, "error": f"{type(e).__name__}: {e}"}
                res["t"] = time.time()
                with lock:
                    results.append(res)
                if on_result:
                    on_result(res)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    report = summarize(results, wall)
    report.update(url=url, concurrency=concurrency)
    return report


def summarize(results: list[dict], wall: float) -> dict:
    """Figures over request results (run_load's) that took `wall` seconds in all."""
    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if "ttft_s" in r]
    passes = sum(r["verify_passes"] for r in ok)
    return {
        "requests": len(results), "ok": len(ok), "tokens": sum(r["tokens"] for r in ok),
        "failed": len(results) - len(ok), "wall_s": round(wall, 2),
        "throughput_req_s": round(len(ok) / wall, 3) if wall else 0.0,
        "throughput_tok_s": round(sum(r["tokens"] for r in ok) / wall, 2) if wall else 0.0,
        "latency_p50_s": _percentile(lat, 50), "latency_p99_s": _percentile(lat, 99),
        "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
        "mean_accept_len": round((sum(r["accepted_tokens"] for r in ok) + passes) / passes, 3) if passes else None,
        "draft_versions": sorted({r["draft_version"] for r in ok if r["draft_version"] is not None}),
        "errors": sorted({r.get("error", "")[:120] for r in results if r["status"] != 200})[:5],
    }


def format_report(report: dict) -> str:
    return json.dumps(report, indent=2)
