#!/usr/bin/env bash
# The whole Safe RLHF-V pipeline on the toy world with tiny models, offline, on a 2-core CPU:
#   toy data -> tiny models -> SFT -> reward model + cost model -> PPO-Lagrangian and plain PPO -> evaluation.
# Usage: bash demo.sh [output folder, default runs/demo]
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/demo}
SEED=${SEED:-1}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One torch thread per process was far steadier than two on this machine; independent stages run side by side.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

stamp "1/7 toy world (data/toy) and tiny models (models/tiny)"
[ -f data/toy/world.json ] || python data/toy_world.py --output_dir data/toy
[ -f models/tiny/llava/config.json ] || python tiny_models.py --output_dir models/tiny --families llava

# The toy's settings differ from the paper's defaults (those are for 7B models): tiny models learn with larger
# learning rates, and the toy trains the vision tower, which is random here (a real VLM's is pretrained).
TINY="--max_length 256 --gradient_checkpointing false --freeze_vision_tower false"

stamp "2/7 SFT policy"
python train_sft.py --model_name_or_path models/tiny/llava --train_data data/toy/sft/train.jsonl \
    --output_dir "$OUT/sft" --epochs 4 --per_device_batch_size 16 --lr 2e-3 $TINY --seed "$SEED" 2>&1 | grep -v "it/s"

stamp "3/7 reward model and cost model (in parallel)"
SCORE="--model_name_or_path $OUT/sft --train_data data/toy/pairs --per_device_batch_size 16 --lr 1e-3 $TINY --seed $SEED"
python train_rm.py $SCORE --output_dir "$OUT/rm" --epochs 2 > "$OUT/rm.log" 2>&1 &
RM=$!
python train_cm.py $SCORE --output_dir "$OUT/cm" --epochs 1 > "$OUT/cm.log" 2>&1 &
CM=$!
wait $RM; wait $CM
cat "$OUT/rm.log" "$OUT/cm.log" | tr "\r" "\n" | grep -E "^(epoch|saved)"
