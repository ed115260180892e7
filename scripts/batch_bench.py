"""The batched decoder in one process (a lab instrument; the service bench is what users see):
the target alone batched and tide's default controller, at each batch size, on real prompts.

    .venv/bin/python scripts/batch_bench.py --batch 1 4 8 16 [--draft runs/warm/draft]

Each batch size serves 2 x B prompts (at least 4) of mt_bench through B slots, requests joining
as slots free; both modes in turn, with the same prompts. Prints tok/s and the controller's
choices; bf16 by default (the service's dtype).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tide.batch import BatchDecoder, Request
from tide.checkpoint import load_draft, new_head
from tide.config import DecodeConfig, ModelConfig
from tide.models import load_target
from tide.policy import policy_from_config
from tide.prompts import encode, load_prompts

ROOT = Path(__file__).resolve().parent.parent


def serve(target, head, prompts, params, slots, policy, speculative) -> tuple[float, int]:
    dec = BatchDecoder(target, head, slots=slots, max_context=2048, policy=policy, speculative=speculative)
    queue = [Request(p, params, rid=str(i)) for i, p in enumerate(prompts)]
    tokens, t0 = 0, time.perf_counter()
    while queue or dec.busy():
        if queue and dec.has_room():
            dec.admit(queue.pop(0))
        for row in dec.step():
            if row.error is not None:
                raise row.error
            tokens += len(row.g.tokens)
    return tokens / (time.perf_counter() - t0), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--draft", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared" / "workloads" / "mt_bench.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(ModelConfig())
    head = load_draft(args.draft, target)[0] if args.draft else new_head(target, 8192, seed=0)
    params = DecodeConfig(max_new_tokens=args.max_tokens)
    need = max(4, 2 * max(args.batch))
    prompts = [encode(target.tokenizer, p) for p in load_prompts(args.prompts, need)]
    policy = policy_from_config(params, target, head, 2048, batch=max(args.batch))
    print("pass cost by rows (ms):", {w: round(policy.costs.rows_ms(w), 1) for w in (1, 2, 4, 8, 16, 32, 64, 128)})
    for b in args.batch:
        work = prompts[: max(4, 2 * b)]
        policy.counts.clear()
        alone, _ = serve(target, head, work, params, b, None, False)
        spec, _ = serve(target, head, work, params, b, policy, True)
        print(f"batch {b:2d}: target alone {alone:6.1f} tok/s, tide {spec:6.1f} tok/s ({spec / alone:.2f}x); "
              f"choices {dict(sorted(policy.counts.items(), key=lambda kv: -kv[1])[:4])}", flush=True)


if __name__ == "__main__":
    main()
