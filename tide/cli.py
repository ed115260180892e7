"""`tide` command line. Config: conf/default.yaml (or --config FILE) plus key=value overrides."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from tide.config import load_config
from tide.errors import TideError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: conf/default.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tide", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--draft", help="draft checkpoint folder (default: draft.path)")
    g.add_argument("--no-spec", action="store_true", help="the target alone, no speculation")
    g.add_argument("--raw", action="store_true", help="no chat template: plain completion")
    _common(g)

    t = sub.add_parser("train-offline", help="warm-start a draft head from target answers")
    t.add_argument("--prompts", nargs="+", required=True, help="JSONL prompt files ('builtin' ok)")
    t.add_argument("--half", choices=["first", "second", "all"], default="all",
                   help="use the first/second half of each prompt file (train/bench split)")
    t.add_argument("--limit", type=int, help="at most N prompts per file (after --half)")
    t.add_argument("--out", required=True, help="checkpoint folder to write")
    t.add_argument("--records", help="folder of target answers: reused when it holds some, else written")
    _common(t)

    b = sub.add_parser("bench", help="speculative vs target alone, interleaved")
    b.add_argument("--prompts", nargs="+", required=True)
    b.add_argument("--half", choices=["first", "second", "all"], default="all")
    b.add_argument("--limit", type=int, help="at most N prompts per file (after --half)")
    b.add_argument("--max-new-tokens", type=int)
    b.add_argument("--temperature", type=float)
    b.add_argument("--k", type=int, help="draft tokens per verify pass")
    b.add_argument("--draft", help="draft checkpoint folder (default: draft.path; none = fresh head)")
    b.add_argument("--dtype", choices=["bfloat16", "float32", "float16"])
    b.add_argument("--peer", choices=["pld"], help="also run a reference method")
    b.add_argument("--spec-both-dtypes", action="store_true",
                   help="also speculate with the target in the other dtype (fp32 <-> bf16)")
    b.add_argument("--chain", type=int, metavar="K",
                   help="also speculate with the head alone, a chain of K tokens (the reference for "
                        "a draft tree, decode.tree_topk > 1, or prompt lookup, decode.lookup_ngram > 0)")
    b.add_argument("--json", required=True, help="write the results here")
    _common(b)
    tu = sub.add_parser("tune", help="pick k / draft_threshold / prompt lookup for this machine "
                                     "from a replay of the target's answers")
    tu.add_argument("--prompts", nargs="+", required=True)
    tu.add_argument("--half", choices=["first", "second", "all"], default="all")
    tu.add_argument("--limit", type=int, help="at most N prompts per file (after --half)")
    tu.add_argument("--holdout", action="store_true",
                    help="only the prompts the warm start held out (every 10th): unseen by the head")
    tu.add_argument("--draft", help="draft checkpoint folder (default: draft.path)")
    tu.add_argument("--max-k", type=int, default=5, help="longest chain to try")
    tu.add_argument("--trees", default=None, metavar="D:T:N,...",
                    help="draft trees to price beside the one-level ones: depth (decode.k):topk:tree_tokens, "
                         "comma-separated, or 'none' (default: 2:3:4,3:4:8,3:5:10,4:4:12,5:4:16,6:6:24)")
    tu.add_argument("--top", type=int, default=12, help="settings to print")
    tu.add_argument("--json", help="also write every setting's figures here")
    _common(tu)
    u = sub.add_parser("up", help="start Redis, Ray, serving actors, trainer, HTTP and W&B")
    u.add_argument("--run-dir", default="runs/latest", help="logs, status and history go here")
    u.add_argument("--foreground", action="store_true", help="stay attached (Ctrl-C stops)")
    u.add_argument("--fresh", action="store_true",
                   help="start from the configured draft, not the drafts this run folder kept")
    _common(u)

    for name, text in [("down", "stop what `tide up` started"), ("status", "live state as JSON")]:
        d = sub.add_parser(name, help=text)
        d.add_argument("--run-dir", default="runs/latest")

    pl = sub.add_parser("plot", help="PNG of acceptance length over time from a run's history")
    pl.add_argument("--run-dir", default="runs/latest")
    pl.add_argument("--out", help="PNG path (default: RUN_DIR/acceptance.png)")

    ld = sub.add_parser("load", help="send real prompts to the HTTP API and report")
    ld.add_argument("--prompts", default="builtin", help="JSONL prompt file, or 'builtin'")
    ld.add_argument("--url", default="http://127.0.0.1:8000")
    ld.add_argument("--concurrency", type=int, default=1)
    ld.add_argument("--requests", type=int, help="stop after N requests")
    ld.add_argument("--duration", type=float, help="stop after S seconds")
    ld.add_argument("--max-tokens", type=int, default=128)
    ld.add_argument("--temperature", type=float, default=0.0)
    ld.add_argument("--stream", action="store_true", help="stream (SSE): time to first token measured")
    ld.add_argument("--json", help="also write the report here")
    return ap


def _cfg(args, extra: list[str] = ()):
    return load_config(args.config, [*args.overrides, *extra])


def _load_workloads(files: list[str], half: str, limit: int | None):
    from tide.prompts import load_prompts

    out = {}
    for f in files:
        ps = load_prompts(f)
        mid = len(ps) // 2
        ps = {"first": ps[:mid], "second": ps[mid:], "all": ps}[half]
        out[Path(f).stem if f != "builtin" else "builtin"] = ps[:limit] if limit else ps
    return out


def cmd_generate(args) -> int:
    from tide.checkpoint import load_draft, new_head
    from tide.models import load_target
    from tide.prompts import Prompt, encode
    from tide.speculative import speculative_generate, target_generate

    extra = []
    if args.max_new_tokens is not None:
        extra.append(f"decode.max_new_tokens={args.max_new_tokens}")
    if args.temperature is not None:
        extra.append(f"decode.temperature={args.temperature}")
    cfg = _cfg(args, extra)
    target = load_target(cfg.model, cfg.draft.feature_layers)
    ids = encode(target.tokenizer, Prompt(args.prompt, chat=not args.raw))
    t0 = time.perf_counter()
    if args.no_spec:
        g = target_generate(target, ids, cfg.decode, cfg.model.max_context)
        version = None
    else:
        path = args.draft or cfg.draft.path
        head, version = load_draft(path, target) if path else (
            new_head(target, cfg.draft.vocab_size, seed=cfg.draft.seed), 0)
        g = speculative_generate(target, head, ids, cfg.decode, cfg.model.max_context)
    dt = time.perf_counter() - t0
    print(target.tokenizer.decode(g.tokens, skip_special_tokens=True))
    stats = {"tokens": len(g.tokens), "tok_s": round(len(g.tokens) / dt, 2),
             "finish_reason": g.finish_reason}
    if version is not None:
        stats.update(draft_version=version, mean_accept_len=round(g.mean_accept_len, 3),
                     drafted=g.drafted, accepted=g.accepted)
    print(json.dumps(stats), file=sys.stderr)
    return 0


def cmd_train_offline(args) -> int:
    from trainers.warm_start import warm_start

    cfg = _cfg(args)
    prompts = [p for ps in _load_workloads(args.prompts, args.half, args.limit).values() for p in ps]
    summary = warm_start(cfg, prompts, args.out, args.records)
    last = summary["history"][-1]
    print(json.dumps({"out": args.out, "records": summary["records"],
                      "generated_tokens": summary["generated_tokens"],
                      "heldout_sim_accept_len": round(last["sim_accept_len"], 3),
                      "heldout_acc": [round(a, 3) for a in last["acc"]]}))
    return 0


def cmd_bench(args) -> int:
    from tide.bench import run_bench

    extra = []
    for flag, key in [("max_new_tokens", "decode.max_new_tokens"), ("temperature", "decode.temperature"),
                      ("k", "decode.k"), ("dtype", "model.dtype")]:
        if getattr(args, flag) is not None:
            extra.append(f"{key}={getattr(args, flag)}")
    cfg = _cfg(args, extra)
    workloads = _load_workloads(args.prompts, args.half, args.limit)
    result = run_bench(cfg, workloads, args.draft or cfg.draft.path, args.peer,
                       args.spec_both_dtypes, args.chain)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    shown = {k: ({k2: v2 for k2, v2 in v.items() if k2 != "per_workload"} if k == "chain" else v)
             for k, v in result.items() if k not in ("config", "per_workload")}
    print(json.dumps(shown, indent=2))
    for name, s in result["per_workload"].items():
        chain = result["chain"]["per_workload"][name] if "chain" in result else None
        print(f"{name:>12}: speedup {s['speedup']:.2f}x  accept len {s['mean_accept_len']:.2f}  "
              f"exact {s['exact_prompts']}/{s['n_prompts']}"
              + (f"  | chain {chain['speedup']:.2f}x  accept len {chain['mean_accept_len']:.2f}" if chain else ""))
    return 0


def _tree_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    """'2:3:4,5:4:16' -> ((2, 3, 4), (5, 4, 16)); 'none' -> (). Raises ConfigError (a ValueError)."""
    from tide.config import tree_shapes

    return () if text.strip().lower() == "none" else tuple(tree_shapes([p.strip() for p in text.split(",")]))


def cmd_tune(args) -> int:
    from tide.checkpoint import load_draft
    from tide.lookup import history_from_config
    from tide.models import load_target
    from tide.prompts import HOLDOUT_EVERY, encode
    from tide.tune import MATCH_NGRAMS, TREE_SHAPES, run_tune

    cfg = _cfg(args)
    path = args.draft or cfg.draft.path
    if not path:
        print("tide: tune needs a trained draft: --draft DIR or draft.path=DIR", file=sys.stderr)
        return 2
    if args.max_k < 1:
        print("tide: --max-k must be at least 1", file=sys.stderr)
        return 2
    try:
        shapes = TREE_SHAPES if args.trees is None else _tree_shapes(args.trees)
    except ValueError as e:
        print(f"tide: --trees: {e}", file=sys.stderr)
        return 2
    prompts = [p for ps in _load_workloads(args.prompts, args.half, args.limit).values() for p in ps]
    if args.holdout:
        prompts = prompts[::HOLDOUT_EVERY]
    if not prompts:
        print("tide: tune has no prompts to replay (check --prompts, --half, --limit)", file=sys.stderr)
        return 2
    target = load_target(cfg.model, cfg.draft.feature_layers)
    head, _ = load_draft(path, target)
    ids = [encode(target.tokenizer, p) for p in prompts]
    # decode.history_k > 0: also price the answer history, seeded without the replayed prompts;
    # seeded with the longest copy match compared, so that each keeps the prompt tokens it would
    match_ngrams = tuple(sorted({cfg.serving.history_match_ngram, *MATCH_NGRAMS}))
    cfg.serving.history_match_ngram = max(match_ngrams)
    history = history_from_config(cfg, skip_prompts={tuple(i) for i in ids})
    result = run_tune(target, head, ids, cfg.decode, cfg.model.max_context, args.max_k, history=history,
                      match_ngrams=match_ngrams, tree_shapes=shapes)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    c = result["costs_ms"]
    print(f"{result['n_prompts']} prompts, {result['answer_tokens']} answer tokens; target step "
          f"{c['target_step']:.1f} ms, draft step {c['draft_call'] + c['draft_logits']:.1f} ms, verify of "
          + " / ".join(f"{w}: {v / c['target_step']:.2f}" for w, v in enumerate(c["verify"])
                       if w in (2, 3, 4, 6, 8, 12, 16)) + " target steps")
    print(f"{'predicted':>9} {'accept':>6} {'lookup':>6} {'history':>7} {'exact':>5}  settings")
    for r in result["settings"][: args.top]:
        print(f"{r['predicted_speedup']:>8.2f}x {r['mean_accept_len']:>6.2f} {r['lookup_pass_share']:>6.0%} "
              f"{r['history_pass_share']:>7.0%} {'yes' if r['bit_exact'] else 'no':>5}  {r['overrides']}")
    if result["best_any"] != result["best"]:
        print(f"fastest, not token-identical here (passes wider than {result['exact_rows']} rows): "
              f"{result['best_any']}")
    print(f"best: {result['best']}")
    return 0


def cmd_up(args) -> int:
    from serving import launcher

    cfg = _cfg(args)  # validate here: a bad config fails before anything starts
    run_dir = Path(args.run_dir)
    if args.fresh and not launcher.running(run_dir):
        import shutil

        shutil.rmtree(run_dir / "drafts", ignore_errors=True)
    if args.foreground:
        from serving.controller import run_foreground

        return run_foreground(cfg, run_dir)
    return launcher.up(run_dir, args.config, args.overrides)


def cmd_down(args) -> int:
    from serving import launcher

    return launcher.down(Path(args.run_dir))


def cmd_status(args) -> int:
    from serving import launcher

    return launcher.status(Path(args.run_dir))


def cmd_plot(args) -> int:
    from serving.plot import load_history, plot_history

    run_dir = Path(args.run_dir)
    hist = run_dir / "history.jsonl"
    if not hist.exists():
        print(f"tide: no history at {hist}: start a run with `tide up` first", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else run_dir / "acceptance.png"
    try:
        print(json.dumps(plot_history(load_history(hist), out)))
    except ValueError as e:
        print(f"tide: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_load(args) -> int:
    import os

    from serving.load import format_report, run_load
    from tide.prompts import load_prompts

    prompts = load_prompts(args.prompts)
    def show(r: dict) -> None:
        if r["status"] != 200:
            print(f"  {r['status']} {r['latency_s']:.2f}s {r.get('error', '')}", file=sys.stderr)
            return
        accept = (r["accepted_tokens"] + r["verify_passes"]) / max(r["verify_passes"], 1)
        print(f"  200 {r['latency_s']:.2f}s draft v{r['draft_version']} accept len {accept:.2f}",
              file=sys.stderr)

    report = run_load(args.url, prompts, args.concurrency, args.requests, args.duration,
                      args.max_tokens, args.temperature, api_key=os.environ.get("TIDE_API_KEY"),
                      on_result=show, stream=args.stream)
    text = format_report(report)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if report["failed"] == 0 else 1


COMMANDS = {"generate": cmd_generate, "train-offline": cmd_train_offline, "bench": cmd_bench,
            "tune": cmd_tune, "up": cmd_up, "down": cmd_down, "status": cmd_status, "plot": cmd_plot, "load": cmd_load}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # `tide load` prints its own line per request
    try:
        return COMMANDS[args.cmd](args)
    except TideError as e:
        print(f"tide: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
