#!/usr/bin/env bash
# The domain-shift demo (issue 3): a draft warm-started on chat (first halves of mt_bench and
# alpaca) serves that chat traffic, then code (humaneval, first half): acceptance drops, drift
# fires, online training recovers it; then the same run with a static draft. About 35 minutes
# on 2 CPU cores (warm start ~10, each run ~12). Usage: scripts/demo_drift.sh [RUN_DIR] [overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/drift}; shift || true
W=${WORKLOADS:-../shared/workloads}
PY=.venv/bin/python
if [ ! -f "$RUN/chat-draft/model.safetensors" ]; then
  .venv/bin/tide train-offline train.gen_samples=3 --half first --out "$RUN/chat-draft" --records "$RUN/chat-records" \
    --prompts "$W/mt_bench.jsonl" "$W/alpaca.jsonl"
fi
# phase-1 traffic: the warm start's own chat prompts, the two files interleaved
$PY - "$W" "$RUN/chat_first_half.jsonl" <<'PYEOF'
import sys
w, out = sys.argv[1], sys.argv[2]
halves = []
for name in ("mt_bench", "alpaca"):
    lines = [line for line in open(f"{w}/{name}.jsonl") if line.strip()]
    halves.append(lines[: len(lines) // 2])
open(out, "w").writelines(x for pair in zip(*halves) for x in pair)
PYEOF
for mode in online static; do
  $PY scripts/demo.py --run-dir "$RUN/$mode" $([ "$mode" = static ] && echo --static) \
    --first-prompts "$RUN/chat_first_half.jsonl" --code-prompts "$W/humaneval.jsonl" \
    --chat-s 180 --code-s 420 draft.path="$RUN/chat-draft" decode.k=3 "$@"
done
