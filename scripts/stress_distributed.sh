#!/usr/bin/env bash
# Run every multi-rank test (2-rank gloo torchrun runs: tests/test_distributed.py, tests/test_fsdp.py, the slow ones
# included) N times and print how many rounds failed: `bash scripts/stress_distributed.sh 20` -> "failures: 0/20".
# A torchrun run that did its work must exit 0 every time; one failed round in N is a defect to find, not to retry.
# Each round's pytest output goes to $LOG_DIR/round_<i>.log (default: a fresh temporary folder, printed first).
# One round takes about 4 minutes on a 2-core CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
rounds="${1:?usage: bash scripts/stress_distributed.sh N}"
log_dir="${LOG_DIR:-$(mktemp -d -t stress_distributed.XXXXXX)}"
mkdir -p "$log_dir"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "logs: $log_dir"
failures=0
for ((i = 1; i <= rounds; i++)); do
    start=$SECONDS
    if python -m pytest -q -m "slow or not slow" tests/test_distributed.py tests/test_fsdp.py >"$log_dir/round_$i.log" 2>&1; then
        status=passed
    else
        status=FAILED
        failures=$((failures + 1))
        grep -E "^(FAILED|ERROR)|terminate called|Signal|exitcode" "$log_dir/round_$i.log" | head -5
    fi
    echo "round $i/$rounds: $status ($((SECONDS - start)) s)"
done
echo "failures: $failures/$rounds"
[ "$failures" -eq 0 ]
