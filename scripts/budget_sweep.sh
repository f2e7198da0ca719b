#!/usr/bin/env bash
# Budget tracking: PPO-Lag at the budgets d = -0.5, 0, +0.5 (seeds 1-3, from the same SFT, RM and CM), held-out
# cost and reward against d with plain PPO as the reference point -> docs/budget_sweep.png and a table next to it.
# Usage: bash scripts/budget_sweep.sh [output folder, default runs/budget]
#   BASE=runs/demo      SFT, RM and CM (built with `bash demo.sh $BASE` if absent)
#   SEEDS_DIR=runs/seeds  scripts/seeds.sh output: its runs are the d = 0 points and the plain-PPO reference
#                         (run first if absent)
#   BUDGETS="-0.5 0 0.5" SEEDS="1 2 3" FIGURE=docs/budget_sweep.png JOBS=2 (runs side by side)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/budget}
BASE=${BASE:-runs/demo}
SEEDS_DIR=${SEEDS_DIR:-runs/seeds}
BUDGETS=${BUDGETS:--0.5 0 0.5}
SEEDS=${SEEDS:-1 2 3}
FIGURE=${FIGURE:-docs/budget_sweep.png}
JOBS=${JOBS:-2}
[ -f "$SEEDS_DIR/table.md" ] || BASE=$BASE SEEDS="$SEEDS" bash scripts/seeds.sh "$SEEDS_DIR"
mkdir -p "$OUT"
RUNS=() PPO=()
for S in $SEEDS; do PPO+=("$SEEDS_DIR/seed$S"); done
for D in $BUDGETS; do
    for S in $SEEDS; do
        if python -c "import sys; sys.exit(float('$D') != 0)"; then   # d = 0 is the demo's budget: reuse seeds.sh
            RUNS+=("$SEEDS_DIR/seed$S")
            continue
        fi
        RUN="$OUT/d$D/seed$S"
        RUNS+=("$RUN")
        [ -f "$RUN/table.md" ] && continue
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
        echo "[$(date +%H:%M:%S)] PPO-Lag d = $D seed $S -> $RUN"
        ALGOS=ppo_lag THRESHOLD=$D SEED=$S FROM=$BASE bash demo.sh "$RUN" > "$OUT/d$D.seed$S.log" 2>&1 &
    done
done
wait
python scripts/toy_report.py budget --runs "${RUNS[@]}" --ppo "${PPO[@]}" --output "$FIGURE"
