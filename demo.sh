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
python train_cm.py $SCORE --output_dir "$OUT/cm" --epochs 1 --regularization 0.1 > "$OUT/cm.log" 2>&1 &
CM=$!
wait $RM; wait $CM
cat "$OUT/rm.log" "$OUT/cm.log" | tr "\r" "\n" | grep -E "^(epoch|saved)"

# PPO: the toy's lambda settings fit its cost scale (the cost model is trained with reg 0.1 so C stays within
# about +-2, and the budget is d = 0: "at most half of the answers harmful"); the paper's (lambda_init 10,
# lambda_max 20, d = -0.5) are the script defaults and fit BeaverTails-V's scale.
stamp "4/7 PPO-Lagrangian and plain PPO from the SFT policy (in parallel)"
PPO="--actor_model_name_or_path $OUT/sft --reward_model_name_or_path $OUT/rm --cost_model_name_or_path $OUT/cm
     --train_data data/toy/pairs --max_steps 150 --per_device_prompt_batch_size 32 --per_device_train_batch_size 16
     --max_new_tokens 24 --actor_lr 5e-5 --critic_lr 5e-4 --kl_coeff 0.1 --threshold 0
     --lambda_init 1 --lambda_lr 0.1 --lambda_max 5 --max_length 256 --toy_grader --logging_steps 1 --seed $SEED"
python train_ppo_lag.py $PPO --algo ppo_lag --output_dir "$OUT/ppo_lag" > "$OUT/ppo_lag.log" 2>&1 &
LAG=$!
python train_ppo_lag.py $PPO --algo ppo --output_dir "$OUT/ppo" > "$OUT/ppo.log" 2>&1 &
PLAIN=$!
wait $LAG; wait $PLAIN
tail -n 1 "$OUT/ppo_lag.log" "$OUT/ppo.log"

stamp "5/7 answers of SFT, PPO and PPO-Lag to the 600 held-out evaluation prompts"
EVAL="--data data/toy/pairs --split evaluation --max_length 256 --batch_size 64"
python evaluate.py generate $EVAL --models SFT="$OUT/sft" PPO="$OUT/ppo/actor" PPO-Lag="$OUT/ppo_lag/actor" \
    --max_new_tokens 24 --seed "$SEED" --output "$OUT/eval/generations.jsonl"

stamp "6/7 scores (reward model, cost model, toy ground truth) and win rates against SFT"
python evaluate.py score $EVAL --generations "$OUT/eval/generations.jsonl" --reward_model "$OUT/rm" \
    --cost_model "$OUT/cm" --toy_grader --output "$OUT/eval/scores.json" --answers_output "$OUT/eval/answers.jsonl"
for MODEL in PPO PPO-Lag; do
    python evaluate.py winrate $EVAL --generations "$OUT/eval/generations.jsonl" --scores "$OUT/eval/answers.jsonl" \
        --judge rm_cm --model_a "$MODEL" --model_b SFT --output "$OUT/eval/winrate_$MODEL.json"
done

stamp "7/7 table and curves"
python evaluate.py plot --runs PPO-Lag="$OUT/ppo_lag" PPO="$OUT/ppo" --smooth 5 --output "$OUT/curves.png"
python evaluate.py table --scores "$OUT/eval/scores.json" --winrates "$OUT/eval/winrate_PPO.json" \
    "$OUT/eval/winrate_PPO-Lag.json" --models SFT PPO PPO-Lag --output "$OUT/table.md"
stamp "done: $OUT/table.md, $OUT/curves.png"
