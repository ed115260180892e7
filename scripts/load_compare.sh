#!/usr/bin/env bash
# HTTP load, speculative vs the target alone: the same C concurrent clients for S seconds against
# `tide up` twice (online training off in both, so only decoding differs). Loopback only,
# bounded in time. Usage: scripts/load_compare.sh [DRAFT_DIR] [C] [S] [PROMPTS]
set -euo pipefail
cd "$(dirname "$0")/.."
DRAFT=${1:-runs/bench/draft}; C=${2:-4}; S=${3:-120}; PROMPTS=${4:-builtin}
TIDE=.venv/bin/tide
OUT=runs/load-compare; mkdir -p $OUT
for mode in spec target; do
  extra="online.enabled=false serving.replicas=1 serving.threads=2"
  [ -f "$DRAFT/model.safetensors" ] && extra="$extra draft.path=$DRAFT"
  [ $mode = target ] && extra="$extra serving.speculative=false"
  $TIDE up --run-dir $OUT/$mode $extra
  $TIDE load --prompts "$PROMPTS" --concurrency "$C" --duration "$S" --max-tokens 96 --json $OUT/$mode.json \
    2>/dev/null || true
  $TIDE down --run-dir $OUT/$mode
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
s, t = (json.load(open(f"{out}/{m}.json")) for m in ("spec", "target"))
keys = ("requests", "failed", "throughput_tok_s", "latency_p50_s", "latency_p99_s", "mean_accept_len")
for name, r in (("speculative", s), ("target alone", t)):
    print(f"{name:>13}: " + "  ".join(f"{k}={r[k]}" for k in keys))
print(f"throughput ratio: {s['throughput_tok_s'] / t['throughput_tok_s']:.3f}")
PY
