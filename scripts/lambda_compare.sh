#!/usr/bin/env bash
# Lambda without overshoot: PPO-Lag with the paper's log-space update (the default; its runs are scripts/seeds.sh's)
# against the PID Lagrangian, on seeds 1-3 from the same SFT, RM and CM -> a table of steps at lambda_max, overshoot
# of J_C below d after it is first met, and the std of J_C over the second half.
# Usage: bash scripts/lambda_compare.sh [output folder, default runs/lambda]
#   BASE=runs/demo  SEEDS_DIR=runs/seeds (the log runs; run first if absent)  SEEDS="1 2 3"  JOBS=2
#   VARIANTS="pid=--lambda_update pid;pid_kp2_ki0.05=--lambda_update pid --lambda_pid_kp 2 --lambda_pid_ki 0.05"
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/lambda}
BASE=${BASE:-runs/demo}
SEEDS_DIR=${SEEDS_DIR:-runs/seeds}
SEEDS=${SEEDS:-1 2 3}
JOBS=${JOBS:-2}
VARIANTS=${VARIANTS:-pid=--lambda_update pid;pid_kp2_ki0.05=--lambda_update pid --lambda_pid_kp 2 --lambda_pid_ki 0.05}
[ -f "$SEEDS_DIR/table.md" ] || BASE=$BASE SEEDS="$SEEDS" bash scripts/seeds.sh "$SEEDS_DIR"
mkdir -p "$OUT"
RUNS=()
for S in $SEEDS; do RUNS+=("log/$S=$SEEDS_DIR/seed$S"); done
IFS=';' read -ra VARIANT_LIST <<< "$VARIANTS"
for V in "${VARIANT_LIST[@]}"; do
    NAME=${V%%=*} EXTRA=${V#*=}
    for S in $SEEDS; do
        RUN="$OUT/$NAME/seed$S"
        RUNS+=("$NAME/$S=$RUN")
        [ -f "$RUN/table.md" ] && continue
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
        echo "[$(date +%H:%M:%S)] PPO-Lag $NAME ($EXTRA) seed $S -> $RUN"
        ALGOS=ppo_lag PPO_EXTRA="$EXTRA" SEED=$S FROM=$BASE bash demo.sh "$RUN" > "$OUT/$NAME.seed$S.log" 2>&1 &
    done
done
wait
python scripts/toy_report.py lambda --runs "${RUNS[@]}" --output "$OUT/table.md"
