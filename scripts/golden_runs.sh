#!/usr/bin/env bash
# Golden runs for a refactor that must not change behaviour: run this from the checkout before the change and from
# the one after it, into the SAME output folder each time (paths then match byte for byte), move each result aside,
# and compare them with scripts/compare_runs.py:
#   bash scripts/golden_runs.sh /tmp/golden/run && mv /tmp/golden/run /tmp/golden/before   # old checkout
#   bash scripts/golden_runs.sh /tmp/golden/run && mv /tmp/golden/run /tmp/golden/after    # new checkout
#   python scripts/compare_runs.py /tmp/golden/before /tmp/golden/after
# What it runs (tiny models, a small toy world, a few steps each; GOLDEN_DEMO=1 adds the whole demo):
#   --help and --dry_run of every script; SFT, RM, CM; PPO-Lag with the paper's batch (the --reuse_critic_forward
#   path) and with a split batch; LoRA with one shared base (+ --merge_lora); PTX; PID lambda; --compile; plain PPO;
#   2-rank DDP and 2-rank FSDP (gloo); a resume from a checkpoint written by the checkout that made RESUME_FROM
#   (a folder of an earlier golden run: the "before" one, to show the old checkpoint format still resumes; compare
#   its checkpoints/checkpoint-00000004 with the before run's paper_batch one).
# Everything runs on one thread per process, so the float order is the same in both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/golden_runs.sh OUTPUT_DIR}
RESUME_FROM=${RESUME_FROM:-}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONHASHSEED=0
rm -rf "$OUT" && mkdir -p "$OUT/help"
stamp() { echo "[$(date +%H:%M:%S)] $*"; }
quiet() { "$@" > "$OUT/last.log" 2>&1 || { cat "$OUT/last.log"; echo "FAILED: $*"; exit 1; }; }

stamp "help"
for script in train_sft.py train_rm.py train_cm.py train_ppo_lag.py tiny_models.py data/toy_world.py; do
    python "$script" --help > "$OUT/help/$(basename "$script" .py).txt"
done
for sub in preference generate score winrate plot table; do python evaluate.py "$sub" --help > "$OUT/help/evaluate_$sub.txt"; done

stamp "toy world and tiny models"
quiet python data/toy_world.py --output_dir "$OUT/toy" --seed 0 --train_pairs_per_category 20 \
    --eval_pairs_per_category 10 --sft_examples 48
quiet python tiny_models.py --output_dir "$OUT/tiny" --families llava
TINY="--max_length 256 --gradient_checkpointing false --freeze_vision_tower false --logging_steps 1"

stamp "dry runs"
for stage in train_sft.py train_rm.py train_cm.py train_ppo_lag.py; do
    python "$stage" --dry_run --model_name_or_path "$OUT/tiny/llava" --actor_model_name_or_path "$OUT/tiny/llava" \
        --reward_model_name_or_path "$OUT/tiny/llava" --cost_model_name_or_path "$OUT/tiny/llava" \
        --gpu_memory_gb 24 > "$OUT/help/dry_run_$(basename "$stage" .py).txt" 2>&1 || true
done

stamp "SFT, RM, CM"
quiet python train_sft.py --model_name_or_path "$OUT/tiny/llava" --train_data "$OUT/toy/sft/train.jsonl" \
    --output_dir "$OUT/sft" --epochs 1 --per_device_batch_size 8 --lr 2e-3 $TINY --save_steps 3
SCORE="--model_name_or_path $OUT/sft --train_data $OUT/toy/pairs --per_device_batch_size 8 --lr 1e-3 $TINY --epochs 1"
quiet python train_rm.py $SCORE --output_dir "$OUT/rm" --max_steps 6 --save_steps 3
quiet python train_cm.py $SCORE --output_dir "$OUT/cm" --max_steps 6 --regularization 0.1 --save_steps 3

PPO="--actor_model_name_or_path $OUT/sft --reward_model_name_or_path $OUT/rm --cost_model_name_or_path $OUT/cm
     --train_data $OUT/toy/pairs --max_new_tokens 8 --actor_lr 1e-4 --critic_lr 1e-3 --kl_coeff 0.1 --threshold 0
     --lambda_init 1 --lambda_lr 0.1 --lambda_max 5 --max_length 256 --toy_grader --logging_steps 1 --seed 3
     --eval_steps 2 --eval_prompts 8 --sample_steps 2 --sample_prompts 2"
ppo() { local name=$1; shift; stamp "PPO: $name"; quiet python train_ppo_lag.py $PPO --output_dir "$OUT/$name" "$@"; }
ppo paper_batch --max_steps 4 --per_device_prompt_batch_size 8 --per_device_train_batch_size 8 --save_steps 2
ppo split_batch --max_steps 3 --per_device_prompt_batch_size 8 --per_device_train_batch_size 4 --update_iters 2
ppo lora_shared --max_steps 3 --per_device_prompt_batch_size 4 --per_device_train_batch_size 4 --lora_r 4 --merge_lora
ppo ptx --max_steps 3 --per_device_prompt_batch_size 4 --per_device_train_batch_size 2 \
    --ptx_data "$OUT/toy/sft/train.jsonl" --ptx_coeff 0.5
ppo pid --max_steps 3 --per_device_prompt_batch_size 4 --per_device_train_batch_size 4 --lambda_update pid
ppo plain_ppo --max_steps 3 --per_device_prompt_batch_size 4 --per_device_train_batch_size 4 --algo ppo
ppo compiled --max_steps 2 --per_device_prompt_batch_size 4 --per_device_train_batch_size 4 --compile
if [ -n "$RESUME_FROM" ]; then  # the old checkout's step-2 checkpoint of paper_batch, resumed by this checkout
    mkdir -p "$OUT/resumed/checkpoints"
    cp -r "$RESUME_FROM/paper_batch/checkpoints/checkpoint-00000002" "$OUT/resumed/checkpoints/"
    ppo resumed --max_steps 4 --per_device_prompt_batch_size 8 --per_device_train_batch_size 8 --save_steps 2 \
        --resume_from auto
fi

TORCHRUN="python -m torch.distributed.run --standalone --nproc_per_node 2"
for mode in ddp fsdp; do
    stamp "PPO-Lag on 2 ranks: $mode"
    quiet $TORCHRUN train_ppo_lag.py $PPO --output_dir "$OUT/$mode" --max_steps 2 --per_device_prompt_batch_size 4 \
        --per_device_train_batch_size 2 --fsdp $([ $mode = fsdp ] && echo true || echo false)
done

if [ "${GOLDEN_DEMO:-0}" = 1 ]; then
    stamp "the demo"
    TOY_DIR="$OUT/demo_toy" TINY_DIR="$OUT/demo_tiny" bash demo.sh "$OUT/demo" > "$OUT/demo.log" 2>&1
fi
rm -f "$OUT/last.log"
stamp "done: $OUT"
