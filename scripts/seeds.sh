#!/usr/bin/env bash
# The demo's PPO stages (PPO-Lag and plain PPO, then the held-out evaluation) on seeds 1-3, all from the same SFT
# policy, reward model and cost model, and one table of every headline figure: mean ± std over the seeds and each
# seed, with the goals of issue 13 checked per seed.
# Usage: bash scripts/seeds.sh [output folder, default runs/seeds]
#   BASE=runs/demo   a demo.sh output holding sft/, rm/ and cm/ (built with `bash demo.sh $BASE` if absent)
#   SEEDS="1 2 3"    the PPO and evaluation seeds; THRESHOLD, PPO_EXTRA are passed on to demo.sh
# A seed whose folder already holds table.md is not run again (delete the folder to redo it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/seeds}
BASE=${BASE:-runs/demo}
SEEDS=${SEEDS:-1 2 3}
[ -f "$BASE/cm/summary.json" ] || bash demo.sh "$BASE"
RUNS=()
for S in $SEEDS; do
    [ -f "$OUT/seed$S/table.md" ] || SEED=$S FROM=$BASE bash demo.sh "$OUT/seed$S"
    RUNS+=("$S=$OUT/seed$S")
done
python scripts/toy_report.py seeds --runs "${RUNS[@]}" --output "$OUT/table.md" --json "$OUT/figures.json"
