#!/usr/bin/env bash
# The issue-2 benchmark: warm-start a draft head on the first half of each workload, then
# benchmark speculative decoding against the target alone on the second half (disjoint),
# interleaved in one process. Usage: scripts/bench.sh [RUN_DIR] [extra tide bench args]
# BENCH_FLAGS: replaces --spec-both-dtypes (e.g. BENCH_FLAGS="--chain 3" with a draft tree)
# TRAIN_ARGS: overrides for the warm start, e.g. on a GPU machine
#   TRAIN_ARGS="train.device=cuda train.gen_batch_size=1024 train.gen_samples=112 ..." (see README)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/bench}; shift || true
W=${WORKLOADS:-../shared/workloads}
FILES="$W/mt_bench.jsonl $W/alpaca.jsonl $W/humaneval.jsonl $W/gsm8k.jsonl"
TIDE=.venv/bin/tide
REC=${RECORDS:-$RUN/records}  # target answers: kept, so a retrain with other settings skips generation
if [ ! -f "$RUN/draft/model.safetensors" ]; then
  $TIDE train-offline ${TRAIN_ARGS:-} --half first --out "$RUN/draft" --records "$REC" --prompts $FILES
fi
# extra args come first: config overrides (decode.tree_topk=4) must precede --prompts
$TIDE bench "$@" --half second --draft "$RUN/draft" --json "$RUN/bench.json" --peer pld ${BENCH_FLAGS---spec-both-dtypes} \
  --limit "${LIMIT:-10}" --prompts $FILES
