#!/usr/bin/env bash
# The replicas' shared answer history, measured end to end: `tide up` with two replicas, then
# the same prompts sent twice through the HTTP API (round 2 repeats round 1, so every request
# of round 2 was answered before, by one replica or the other), once with
# serving.history_share=true and once with false. Usage:
#   scripts/bench_share.sh DRAFT_DIR [OUT_DIR] [extra tide up overrides]
# PER: prompts per workload (the first of each held-out half; default 5); PORT (default 8000).
set -euo pipefail
cd "$(dirname "$0")/.."
DRAFT=${1:?usage: scripts/bench_share.sh DRAFT_DIR [OUT_DIR] [overrides]}
OUT=${2:-runs/share}
shift $(( $# < 2 ? $# : 2 ))
W=${WORKLOADS:-../shared/workloads}
PER=${PER:-5}
PORT=${PORT:-8000}
TIDE=.venv/bin/tide
mkdir -p "$OUT"
.venv/bin/python - "$W" "$PER" "$OUT/prompts.jsonl" <<'EOF'
import sys
from pathlib import Path

folder, per, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
lines = []
for name in ("mt_bench", "alpaca", "humaneval", "gsm8k"):
    rows = (folder / f"{name}.jsonl").read_text().splitlines()
    lines += rows[len(rows) // 2 :][:per]  # the held-out half, as `tide bench --half second`
out.write_text("\n".join(lines) + "\n")
EOF
N=$(wc -l < "$OUT/prompts.jsonl")
UP="serving.replicas=2 serving.threads=1 serving.port=$PORT serving.capture=false online.enabled=false
 wandb.mode=disabled ray.dashboard=false draft.path=$DRAFT decode.k=1 decode.lookup_ngram=3
 decode.lookup_min_ngram=2 decode.lookup_k=7 decode.history_k=7"
for SHARE in true false; do
  RUN="$OUT/share-$SHARE"
  # shellcheck disable=SC2086
  $TIDE up --run-dir "$RUN" $UP serving.history_share=$SHARE redis.prefix="share-$SHARE" "$@"
  trap '$TIDE down --run-dir "$RUN"' EXIT
  for ROUND in 1 2; do
    $TIDE load --url "http://127.0.0.1:$PORT" --prompts "$OUT/prompts.jsonl" --concurrency 2 \
      --requests "$N" --max-tokens 128 --json "$RUN/round$ROUND.json" > /dev/null
  done
  curl -s "http://127.0.0.1:$PORT/metrics" > "$RUN/metrics.txt"
  $TIDE down --run-dir "$RUN"
  trap - EXIT
done
.venv/bin/python - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
summary = {}
for share in ("true", "false"):
    rounds = [json.loads((out / f"share-{share}" / f"round{r}.json").read_text()) for r in (1, 2)]
    metrics = {}
    for line in (out / f"share-{share}" / "metrics.txt").read_text().splitlines():
        if line.startswith("tide_history_shared_answers_total") and 'direction="in"' in line:
            metrics["shared_in"] = metrics.get("shared_in", 0) + int(float(line.split()[-1]))
    summary[f"history_share={share}"] = {
        f"round{r}": {k: rounds[r - 1][k] for k in ("ok", "failed", "throughput_tok_s", "latency_p50_s",
                                                   "mean_accept_len")} for r in (1, 2)} | metrics
print(json.dumps(summary, indent=2))
(out / "summary.json").write_text(json.dumps(summary, indent=2))
EOF
