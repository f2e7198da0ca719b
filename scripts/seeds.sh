#!/usr/bin/env bash
# The demo's training stages after SFT - PPO-Lag (Safe RLHF-V), plain PPO on the reward model (RLHF, helpfulness),
# plain PPO on a reward model of safety (RLHF, safety), DPO on each dimension - and the held-out evaluation, on seeds
# 1-3, all from the same SFT policy, reward model and cost model. Two tables: every headline figure (mean ± std over
# the seeds and each seed, with the goals of issue 13 checked per seed), and the paper's Table 4 analogue.
# Usage: bash scripts/seeds.sh [output folder, default runs/seeds]
#   BASE=runs/demo   a demo.sh output holding sft/, rm/ and cm/ (built with `bash demo.sh $BASE` if absent)
#   SEEDS="1 2 3"    the PPO and evaluation seeds; THRESHOLD, PPO_EXTRA are passed on to demo.sh
#   ALGOS="ppo ppo_safe ppo_lag dpo_helpful dpo_safe"  the runs of each seed
# A seed whose folder already holds table.md is not run again (delete the folder to redo it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/seeds}
BASE=${BASE:-runs/demo}
SEEDS=${SEEDS:-1 2 3}
export ALGOS=${ALGOS:-ppo ppo_safe ppo_lag dpo_helpful dpo_safe}
[ -f "$BASE/cm/summary.json" ] || bash demo.sh "$BASE"
RUNS=()
for S in $SEEDS; do
    [ -f "$OUT/seed$S/table.md" ] || SEED=$S FROM=$BASE bash demo.sh "$OUT/seed$S"
    RUNS+=("$S=$OUT/seed$S")
done
python scripts/toy_report.py seeds --runs "${RUNS[@]}" --output "$OUT/table.md" --json "$OUT/figures.json"
python scripts/toy_report.py table4 --runs "${RUNS[@]}" --output "$OUT/table4.md"
