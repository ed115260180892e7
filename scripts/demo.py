"""The self-improving demo: a cold draft on SmolLM2-135M, chat traffic, then a domain shift to code.

    python scripts/demo.py --chat-s 300 --code-s 300            # online training on
    python scripts/demo.py --static ...                          # the same with a static draft

Each run: `tide up` -> `tide load` (built-in chat prompts) -> `tide load` (code prompts) ->
final draft pulled from Redis -> `tide down` -> a PNG of acceptance over time (shift marked)
and summary.json: acceptance before/after the shift, time to recover, drift events, and the
final draft's speedup over the target alone (tide bench, same process, interleaved).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.load import run_load  # noqa: E402
from serving.plot import load_history, plot_history  # noqa: E402
from tide.prompts import load_prompts  # noqa: E402


def tide(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "tide.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"tide {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out


def window_mean(rows: list[dict], t0: float, t1: float) -> float | None:
    xs = [r["accept_len"] for r in rows if r.get("accept_len") is not None and t0 <= r["elapsed_s"] < t1]
    return round(sum(xs) / len(xs), 3) if xs else None


def pull_draft(run_dir: Path, out: Path, overrides: list[str]) -> int:
    """Save the draft the system serves now as a checkpoint folder (for the final bench): the
    newest one the controller kept in the run folder."""
    from serving.drafts import DraftStore
    from tide.checkpoint import load_draft, new_head, save_draft, state_from_bytes, swap_in_place
    from tide.config import load_config
    from tide.models import load_target

    cfg = load_config(overrides=overrides)
    target = load_target(cfg.model)
    if cfg.draft.path:  # nothing published yet: the system still serves its starting draft
        head, version = load_draft(cfg.draft.path, target)
    else:
        head, version = new_head(target, cfg.draft.vocab_size, seed=cfg.draft.seed), 0
    kept = DraftStore(run_dir / "drafts").newest(cfg.model.source, cfg.draft.path)
    if kept is not None:
        swap_in_place(head, state_from_bytes(kept[1]))
        version = kept[0]
    save_draft(head, out, version, target)
    return version


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--chat-s", type=float, default=300)
    ap.add_argument("--code-s", type=float, default=300)
    ap.add_argument("--first-prompts", default="builtin", help="phase-1 traffic (default: built-in chat)")
    ap.add_argument("--code-prompts", default=str(ROOT.parent / "shared/workloads/humaneval.jsonl"),
                    help="phase-2 traffic after the shift (first half; the final bench uses the second)")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--static", action="store_true", help="online training off (the comparison)")
    ap.add_argument("--bench-limit", type=int, default=8)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    run_dir = ROOT / args.run_dir
    overrides = [f"decode.max_new_tokens={args.max_tokens}", *args.overrides]
    if args.static:
        overrides.append("online.enabled=false")
    chat = load_prompts(args.first_prompts)
    code_all = load_prompts(args.code_prompts)
    code = code_all[: len(code_all) // 2]  # traffic; the final bench uses the other half
    t_start = time.time()
    print(f"tide up ({'static draft' if args.static else 'online training'}) ...", flush=True)
    tide("up", "--fresh", "--run-dir", str(run_dir), *overrides)
    url = json.loads((run_dir / "status.json").read_text())["http"]
    try:
        print(f"phase 1: chat traffic for {args.chat_s:.0f} s", flush=True)
        r1 = run_load(url, chat, args.concurrency, duration_s=args.chat_s, max_tokens=args.max_tokens)
        shift_at = time.time()
        print(f"phase 2: code traffic for {args.code_s:.0f} s", flush=True)
        r2 = run_load(url, code, args.concurrency, duration_s=args.code_s, max_tokens=args.max_tokens)
        time.sleep(2)
        status = json.loads((run_dir / "status.json").read_text())
        version = pull_draft(run_dir, run_dir / "final_draft", overrides)
    finally:
        tide("down", "--run-dir", str(run_dir), check=False)
    rows = load_history(run_dir / "history.jsonl")
    t0 = rows[0]["t"] - rows[0]["elapsed_s"]
    shift = shift_at - t0
    end = rows[-1]["elapsed_s"]
    label = "static draft" if args.static else "online training"
    phases = f"{Path(args.first_prompts).stem}, then {Path(args.code_prompts).stem}"
    plot = plot_history(rows, run_dir / "acceptance.png", title=f"tide demo ({label}): {phases}",
                        marks=[(shift, "domain shift")])
    pre = window_mean(rows, shift - 60, shift)
    recover_s = None
    for r in rows:  # first time the trailing 60 s mean is back at the pre-shift level
        if r["elapsed_s"] > shift + 60 and pre is not None:
            m = window_mean(rows, r["elapsed_s"] - 60, r["elapsed_s"])
            if m is not None and m >= pre:
                recover_s = round(r["elapsed_s"] - shift, 1)
                break
    trainer = status.get("trainer") or {}
    summary = {
        "mode": label, "chat_s": args.chat_s, "code_s": args.code_s,
        "accept_len_first_60s": window_mean(rows, 0, 60 + rows[0]["elapsed_s"]),
        "accept_len_before_shift": pre,
        "accept_len_after_shift_60s": window_mean(rows, shift, shift + 60),
        "accept_len_last_60s": window_mean(rows, end - 60, end + 1),
        "time_to_recover_s": recover_s, "drift_events": trainer.get("drift_events"),
        "final_draft_version": version, "trainer_steps": trainer.get("trainer_step"),
        "load_chat": r1, "load_code": r2, "plot": plot,
    }
    print("final bench on held-out code prompts (target alone vs final draft) ...", flush=True)
    bench_json = run_dir / "final_bench.json"
    tide("bench", "--prompts", args.code_prompts, "--half", "second", "--limit", str(args.bench_limit),
         "--draft", str(run_dir / "final_draft"), "--json", str(bench_json), *overrides)
    b = json.loads(bench_json.read_text())
    summary["final_bench_code"] = {k: b[k] for k in ("speedup", "speedup_vs_fastest", "mean_accept_len",
                                                      "spec_tok_s", "baseline_tok_s", "exact_match")}
    summary["wall_s"] = round(time.time() - t_start, 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("load_chat", "load_code")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
