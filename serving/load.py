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


def run_load(url: str, prompts: list[Prompt], concurrency: int = 1, requests: int | None = None,
             duration_s: float | None = None, max_tokens: int = 128, temperature: float = 0.0,
             api_key: str | None = None, timeout_s: float = 300.0, on_result=None) -> dict:
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
                body = {"max_tokens": max_tokens, "temperature": temperature}
                if p.chat:
                    path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": p.text}]
                else:
                    path, body["prompt"] = "/v1/completions", p.text
                t0 = time.monotonic()
                try:
                    r = http.post(path, json=body)
                    res = {"status": r.status_code, "latency_s": time.monotonic() - t0, "t": time.time()}
                    if r.status_code == 200:
                        u = r.json()["usage"]
                        res.update(tokens=u["completion_tokens"], **{k: u["tide"][k] for k in (
                            "accepted_tokens", "drafted_tokens", "verify_passes", "draft_version")})
                    else:
                        res["error"] = r.text[:200]
                except httpx.HTTPError as e:
                    res = {"status": 0, "latency_s": time.monotonic() - t0, "error": str(e), "t": time.time()}
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
    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    passes = sum(r["verify_passes"] for r in ok)
    return {
        "url": url, "concurrency": concurrency, "requests": len(results), "ok": len(ok),
        "failed": len(results) - len(ok), "wall_s": round(wall, 2),
        "throughput_req_s": round(len(ok) / wall, 3) if wall else 0.0,
        "throughput_tok_s": round(sum(r["tokens"] for r in ok) / wall, 2) if wall else 0.0,
        "latency_p50_s": _percentile(lat, 50), "latency_p99_s": _percentile(lat, 99),
        "mean_accept_len": round((sum(r["accepted_tokens"] for r in ok) + passes) / passes, 3) if passes else None,
        "draft_versions": sorted({r["draft_version"] for r in ok}),
        "errors": sorted({r.get("error", "")[:120] for r in results if r["status"] != 200})[:5],
    }


def format_report(report: dict) -> str:
    return json.dumps(report, indent=2)
