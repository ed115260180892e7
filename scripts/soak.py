#!/usr/bin/env python
"""Soak: the default service (fp32, 2 replicas, trainer on) under 8 streaming and plain chat
clients for 10 minutes, with a signed draft published every 30 s, one replica killed, the trainer
killed and the embedded Redis killed on the way. Every answer is compared with the target alone's
greedy answer to the same prompt: none may be lost (clients retry a 503/429 after Retry-After, as
the OpenAI client does) or differ. The memory of everything `tide up` started is sampled every
10 s: it must stay flat. Writes report.json and soak.png to --out; exit 1 on a lost or wrong answer.

    python scripts/soak.py                      # 10 minutes, 8 clients
    python scripts/soak.py --minutes 3 --clients 4
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from serving.launcher import session_members  # noqa: E402
from tide.checkpoint import new_head, state_to_bytes  # noqa: E402
from tide.config import load_config  # noqa: E402
from tide.models import load_target  # noqa: E402
from tide.prompts import chat_ids, load_prompts  # noqa: E402
from tide.speculative import target_generate  # noqa: E402
from tide.transport.redis_server import free_port, local_url  # noqa: E402
from tide.transport.redis_transport import RedisWeightChannel, connect  # noqa: E402

KEY = "soak-weights-key"


def tide(*args, env=None) -> None:
    subprocess.run([sys.executable, "-m", "tide.cli", *args], cwd=ROOT, check=True, env=env)


def rss_mb(pids: list[int]) -> dict[str, float]:
    """RSS in MB by process name (ray::ServingActor, ray::TrainerActor, redis-server, ...)."""
    by: dict[str, float] = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    by[name] = round(by.get(name, 0) + int(line.split()[1]) / 1024, 1)
        except OSError:
            continue
    return by


def expected_answers(cfg, prompts, max_tokens: int):
    """The target alone's greedy answers (fp32): what every response must equal."""
    target = load_target(cfg.model)
    params = cfg.decode
    params.max_new_tokens, params.temperature = max_tokens, 0.0
    out = []
    for i, p in enumerate(prompts):
        ids = chat_ids(target.tokenizer, [{"role": "user", "content": p.text}])
        out.append(target.tokenizer.decode(target_generate(target, ids, params).tokens, skip_special_tokens=True))
        print(f"\r  target alone: {i + 1}/{len(prompts)} answers", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out, target


class Clients:
    def __init__(self, url, prompts, expected, n, max_tokens, deadline):
        self.url, self.prompts, self.expected = url, prompts, expected
        self.max_tokens, self.deadline = max_tokens, deadline
        self.results: list[dict] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(n)]

    def ask(self, http, prompt: str, stream: bool) -> tuple[int, str]:
        body = {"model": "tide", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens, "temperature": 0, "stream": stream}
        if not stream:
            r = http.post("/v1/chat/completions", json=body)
            return r.status_code, (r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else
                                   r.headers.get("retry-after", "1"))
        text = []
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, r.headers.get("retry-after", "1")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:  # the replica died mid-stream: retry the whole request
                    return int(event["error"].get("code") or 500), "1"
                text.append(event["choices"][0]["delta"].get("content") or "")
        return 200, "".join(text)

    def run(self, c: int):
        http = httpx.Client(base_url=self.url, timeout=300)
        n = c
        while time.time() < self.deadline:
            i = n % len(self.prompts)
            stream = n % 2 == 0
            n += len(self.threads)
            t0, tries, status, got = time.time(), 0, 0, ""
            while tries < 20:
                tries += 1
                try:
                    status, got = self.ask(http, self.prompts[i].text, stream)
                except httpx.HTTPError as e:
                    status, got = -1, str(e)
                if status == 200:
                    break
                if status not in (429, 503, -1):
                    break  # not retryable: counted as lost
                time.sleep(min(float(got) if str(got).replace(".", "").isdigit() else 1.0, 5.0))
            with self.lock:
                self.results.append({"t": t0, "latency_s": time.time() - t0, "prompt": i, "stream": stream,
                                     "tries": tries, "status": status,
                                     "exact": status == 200 and got == self.expected[i]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/soak")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--publish-every-s", type=float, default=30.0)
    ap.add_argument("--no-faults", dest="faults", action="store_false",
                    help="no kills (to watch memory without restarts resetting it)")
    ap.add_argument("--workload", default=str(ROOT.parent / "shared" / "workloads" / "mt_bench.jsonl"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    overrides = ["model.dtype=float32", "serving.replicas=2", "wandb.mode=disabled"]
    cfg = load_config(overrides=overrides)
    prompts = load_prompts(args.workload, limit=args.prompts)
    print(f"{len(prompts)} prompts; the target alone answers each once (fp32, greedy)", file=sys.stderr)
    expected, target = expected_answers(cfg, prompts, args.max_tokens)
    env = {**os.environ, "TIDE_WEIGHTS_KEY": KEY, "WANDB_SILENT": "true"}
    port = free_port()
    tide("up", "--fresh", "--run-dir", str(run_dir), f"serving.port={port}", *overrides, env=env)
    url = f"http://127.0.0.1:{port}"
    status = lambda: json.loads((run_dir / "status.json").read_text())  # noqa: E731
    sid = json.loads((run_dir / "tide.pid").read_text())["sid"]
    t_start = time.time()
    deadline = t_start + args.minutes * 60
    clients = Clients(url, prompts, expected, args.clients, args.max_tokens, deadline)
    events, memory = [], []
    channel = RedisWeightChannel(connect(local_url(run_dir / "redis")), cfg.redis.prefix, key=KEY.encode())
    faults = {0.25: "kill a replica", 0.5: "kill the trainer", 0.75: "kill Redis"} if args.faults else {}
    try:
        for t in clients.threads:
            t.start()
        next_publish, next_sample, version = t_start + args.publish_every_s, t_start, 1000
        while time.time() < deadline:
            now = time.time()
            frac = (now - t_start) / (deadline - t_start)
            for at, what in list(faults.items()):
                if frac >= at:
                    del faults[at]
                    st = status()
                    redis_pid = json.loads((run_dir / "redis" / "redis.pid").read_text())["pid"]
                    pid = {"kill a replica": st["replicas"][0].get("pid"), "kill the trainer": st["trainer"]["pid"],
                           "kill Redis": redis_pid}[what]
                    os.kill(pid, signal.SIGKILL)
                    events.append({"t": now - t_start, "event": what, "pid": pid})
                    print(f"  {now - t_start:5.0f} s: {what} (pid {pid})", file=sys.stderr)
            if now >= next_publish:
                version += 1
                try:
                    channel = RedisWeightChannel(connect(local_url(run_dir / "redis")), cfg.redis.prefix,
                                                 key=KEY.encode())
                    channel.publish(version, state_to_bytes(new_head(target, cfg.draft.vocab_size, seed=version)),
                                    {"published_at": time.time()})
                    events.append({"t": now - t_start, "event": f"publish v{version}"})
                except Exception as e:  # noqa: BLE001 - Redis may be restarting: the next one goes
                    events.append({"t": now - t_start, "event": f"publish v{version} failed: {type(e).__name__}"})
                next_publish += args.publish_every_s
            if now >= next_sample:
                pids = session_members(sid)
                redis_rec = run_dir / "redis" / "redis.pid"
                if redis_rec.exists():
                    pids.append(json.loads(redis_rec.read_text())["pid"])
                by = rss_mb(pids)
                memory.append({"t": now - t_start, "rss_mb": round(sum(by.values()), 1), "processes": len(pids),
                               "by_process": by})
                done = len(clients.results)
                print(f"  {now - t_start:5.0f} s: {done} answers, memory {memory[-1]['rss_mb']:.0f} MB "
                      f"in {len(pids)} processes", file=sys.stderr)
                next_sample += 10
            time.sleep(0.5)
        for t in clients.threads:
            t.join(600)
        final = status()
        health = httpx.get(url + "/health").json()
    finally:
        tide("down", "--run-dir", str(run_dir), env=env)
    res = clients.results
    ok = [r for r in res if r["status"] == 200]
    lost = [r for r in res if r["status"] != 200]
    wrong = [r for r in ok if not r["exact"]]
    warm = [m for m in memory if m["t"] >= 60] or memory
    report = {
        "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), "?"),
        "minutes": args.minutes, "clients": args.clients, "answers": len(res), "exact": len(ok) - len(wrong),
        "lost": len(lost), "wrong": len(wrong), "retried": sum(1 for r in res if r["tries"] > 1),
        "latency_p50_s": sorted(r["latency_s"] for r in ok)[len(ok) // 2] if ok else None,
        "memory_mb_after_1min": warm[0]["rss_mb"] if warm else None,
        "memory_mb_end": memory[-1]["rss_mb"] if memory else None,
        "memory_mb_max": max((m["rss_mb"] for m in warm), default=None),
        "events": events, "redis_restarts": final.get("redis_restarts"), "health_at_end": health["status"],
        "swaps_applied": sum(r.get("swaps_applied", 0) for r in final["replicas"]),
        "records_dropped": sum(r.get("records_dropped", 0) for r in final["replicas"]),
        "records": final.get("records"), "memory": memory,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot(res, memory, events, out / "soak.png", t_start)
    print(json.dumps({k: v for k, v in report.items() if k not in ("memory", "events")}, indent=2))
    return 0 if not lost and not wrong else 1


def plot(results, memory, events, path: Path, t0: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    bins: dict[int, int] = {}
    for r in results:
        if r["status"] == 200:
            b_ = int((r["t"] + r["latency_s"] - t0) // 30)
            bins[b_] = bins.get(b_, 0) + 1
    xs = sorted(bins)
    a.bar([x * 30 + 15 for x in xs], [bins[x] for x in xs], width=28, color="C0")
    a.set_ylabel("exact answers / 30 s")
    b.plot([m["t"] for m in memory], [m["rss_mb"] for m in memory], color="C1")
    b.set_ylabel("RSS of everything tide up started (MB)")
    b.set_xlabel("seconds")
    for e in events:
        if not e["event"].startswith("publish"):
            for ax in (a, b):
                ax.axvline(e["t"], color="red", lw=0.8)
            a.text(e["t"], a.get_ylim()[1] * 0.95, e["event"], rotation=90, va="top", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
