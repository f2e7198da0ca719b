#!/usr/bin/env bash
# The whole Safe RLHF-V pipeline on the toy world with tiny models, offline, on a 2-core CPU:
#   toy data -> tiny models -> SFT -> reward model + cost model -> PPO-Lagrangian, plain PPO and the DPO baselines
#   (on helpfulness, on safety) -> evaluation.
# Usage: bash demo.sh [output folder, default runs/demo]
# Optional environment (the defaults are the demo; scripts/seeds.sh, budget_sweep.sh and lambda_compare.sh use the rest):
#   SEED=1            seed of SFT, RM, CM, PPO and the evaluation sampling
#   THRESHOLD=0       d, the cost budget of PPO-Lag
#   FROM=runs/demo    reuse the SFT policy, reward model and cost model of an earlier demo output (skips steps 2-3)
#   ALGOS="ppo ppo_lag dpo_helpful dpo_safe"  which runs to train and evaluate (against SFT); also ppo_safe: plain
#                     PPO on a reward model of safety alone (train_rm.py --preference safe), as scripts/seeds.sh does
#   PPO_EXTRA="..."   extra train_ppo_lag.py options, e.g. "--lambda_update pid"
#   TOY_DIR=data/toy TINY_DIR=models/tiny   where the toy world and the tiny models live
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/demo}
SEED=${SEED:-1}
THRESHOLD=${THRESHOLD:-0}
FROM=${FROM:-}
ALGOS=${ALGOS:-ppo ppo_lag dpo_helpful dpo_safe}
PPO_EXTRA=${PPO_EXTRA:-}
TOY_DIR=${TOY_DIR:-data/toy}
TINY_DIR=${TINY_DIR:-models/tiny}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One torch thread per process was far steadier than two on this machine; independent stages run side by side.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

# Both are rebuilt when the toy world's rules change (the tiny models' tokenizer is trained on its sentences).
stamp "1/7 toy world ($TOY_DIR) and tiny models ($TINY_DIR)"
python data/toy_world.py --output_dir "$TOY_DIR" --if_changed
CORPUS=$(python -c "import hashlib, tiny_models; print(hashlib.sha256(repr(tiny_models.default_corpus()).encode()).hexdigest())")
if [ ! -f "$TINY_DIR/llava/config.json" ] || [ "$(cat "$TINY_DIR/corpus.sha256" 2>/dev/null)" != "$CORPUS" ]; then
    python tiny_models.py --output_dir "$TINY_DIR" --families llava && echo "$CORPUS" > "$TINY_DIR/corpus.sha256"
fi

# The toy's settings differ from the paper's defaults (those are for 7B models): tiny models learn with larger
# learning rates, and the toy trains the vision tower, which is random here (a real VLM's is pretrained).
TINY="--max_length 256 --gradient_checkpointing false --freeze_vision_tower false"

if [ -n "$FROM" ]; then
    BASE=$FROM
    stamp "2-3/7 reusing the SFT policy, reward model and cost model of $FROM"
else
    BASE=$OUT
    stamp "2/7 SFT policy"
    # Each stage starts afresh: the trainers refuse a new run over an earlier run's checkpoints (--resume_from auto
    # would continue it instead), and a demo run again is a new run.
    rm -rf "$OUT/sft" "$OUT/rm" "$OUT/cm"
    python train_sft.py --model_name_or_path "$TINY_DIR/llava" --train_data "$TOY_DIR/sft/train.jsonl" \
        --output_dir "$OUT/sft" --epochs 4 --per_device_batch_size 16 --lr 2e-3 $TINY --seed "$SEED" 2>&1 | grep -v "it/s"

    stamp "3/7 reward model and cost model (in parallel)"
    SCORE="--model_name_or_path $OUT/sft --train_data $TOY_DIR/pairs --per_device_batch_size 16 --lr 1e-3 $TINY --seed $SEED"
    python train_rm.py $SCORE --output_dir "$OUT/rm" --epochs 2 > "$OUT/rm.log" 2>&1 &
    RM=$!
    python train_cm.py $SCORE --output_dir "$OUT/cm" --epochs 1 --regularization 0.1 > "$OUT/cm.log" 2>&1 &
    CM=$!
    wait $RM; wait $CM
    cat "$OUT/rm.log" "$OUT/cm.log" | tr "\r" "\n" | grep -E "^(epoch|saved)"
fi
# PPO-Safe's reward: a reward model of the safer answer (the single-dimension RLHF baseline on safety), trained as
# the reward model is, on the same pairs; reused from $BASE when it has one
RM_SAFE=$BASE/rm_safe
if [[ " $ALGOS " == *" ppo_safe "* ]] && [ ! -f "$RM_SAFE/summary.json" ]; then
    stamp "3/7 the reward model of safety (for ppo_safe)"
    RM_SAFE=$OUT/rm_safe
    rm -rf "$RM_SAFE"
    python train_rm.py --model_name_or_path "$BASE/sft" --train_data "$TOY_DIR/pairs" --per_device_batch_size 16 \
        --lr 1e-3 $TINY --seed "$SEED" --preference safe --output_dir "$RM_SAFE" --epochs 2 > "$OUT/rm_safe.log" 2>&1
    tr "\r" "\n" < "$OUT/rm_safe.log" | grep -E "^(epoch|saved)"
fi

# PPO: the toy's lambda settings fit its cost scale (the cost model is trained with reg 0.1 so C stays within
# about +-2, and the budget is d = 0: "at most about half of the answers harmful"); the paper's (lambda_init 10,
# lambda_max 20, d = -0.5) are the script defaults and fit BeaverTails-V's scale.
stamp "4/7 $ALGOS from the SFT policy (in parallel), d = $THRESHOLD"
PPO="--actor_model_name_or_path $BASE/sft --reward_model_name_or_path $BASE/rm --cost_model_name_or_path $BASE/cm
     --train_data $TOY_DIR/pairs --max_steps 150 --per_device_prompt_batch_size 32 --per_device_train_batch_size 16
     --max_new_tokens 24 --actor_lr 5e-5 --critic_lr 5e-4 --kl_coeff 0.1 --threshold $THRESHOLD
     --lambda_init 1 --lambda_lr 0.1 --lambda_max 5 --max_length 256 --toy_grader --logging_steps 1 --seed $SEED"
# DPO: the PPO actor's learning rate (tiny models learn with larger ones than the paper's 1e-6, as SFT and PPO do
# here); measured on seed 1: at 2e-4 DPO-Helpful over-optimises the RM-agreeing shortcut (well-formed rate 0.41),
# at 5e-5 both DPO runs keep SFT's well-formed rate (0.98) and move true helpfulness / harm the way they should
DPO_TOY="--epochs 1 --per_device_batch_size 16 --lr 5e-5 --beta 0.1 --eval_split evaluation"
declare -A NAME=([ppo_lag]=PPO-Lag [ppo]=PPO [ppo_safe]=PPO-Safe [dpo_helpful]=DPO-Helpful [dpo_safe]=DPO-Safe)
MODELS="SFT=$BASE/sft"
PIDS=() PPO_ALGOS=() DPO_ALGOS=()
for ALGO in $ALGOS; do
    [ -n "${NAME[$ALGO]:-}" ] || { echo "unknown ALGOS entry $ALGO (known: ${!NAME[*]})" >&2; exit 1; }
    case $ALGO in dpo_*) DPO_ALGOS+=("$ALGO"); continue;; esac
    PPO_ALGOS+=("$ALGO")
    rm -rf "$OUT/$ALGO"
    case $ALGO in  # PPO-Safe: plain PPO whose reward is the reward model of safety
        ppo_safe) RUN="--algo ppo --reward_model_name_or_path $RM_SAFE";;
        *) RUN="--algo $ALGO";;
    esac
    python train_ppo_lag.py $PPO $PPO_EXTRA $RUN --output_dir "$OUT/$ALGO" > "$OUT/$ALGO.log" 2>&1 &
    PIDS+=($!)
    MODELS="$MODELS ${NAME[$ALGO]}=$OUT/$ALGO/actor"
done
for PID in "${PIDS[@]}"; do wait "$PID"; done
for ALGO in "${PPO_ALGOS[@]}"; do tail -n 1 "$OUT/$ALGO.log"; done
# DPO on one preference dimension, from the same SFT policy (its own reference), on the same pairs as the RM/CM
if [ ${#DPO_ALGOS[@]} -gt 0 ]; then
    stamp "4/7 ${DPO_ALGOS[*]} from the SFT policy (in parallel)"
    PIDS=()
    for ALGO in "${DPO_ALGOS[@]}"; do
        rm -rf "$OUT/$ALGO"
        python train_dpo.py --model_name_or_path "$BASE/sft" --train_data "$TOY_DIR/pairs" --preference "${ALGO#dpo_}" \
            --output_dir "$OUT/$ALGO" $DPO_TOY $TINY --seed "$SEED" > "$OUT/$ALGO.log" 2>&1 &
        PIDS+=($!)
        MODELS="$MODELS ${NAME[$ALGO]}=$OUT/$ALGO"
    done
    for PID in "${PIDS[@]}"; do wait "$PID"; done
    for ALGO in "${DPO_ALGOS[@]}"; do tail -n 1 "$OUT/$ALGO.log"; done
fi

stamp "5/7 answers of SFT, $ALGOS to the 600 held-out evaluation prompts"
EVAL="--data $TOY_DIR/pairs --split evaluation --max_length 256 --batch_size 64"
python evaluate.py generate $EVAL --models $MODELS --max_new_tokens 24 --seed "$SEED" \
    --output "$OUT/eval/generations.jsonl"

stamp "6/7 scores (reward model, cost model, toy ground truth) and win rates against SFT"
python evaluate.py score $EVAL --generations "$OUT/eval/generations.jsonl" --reward_model "$BASE/rm" \
    --cost_model "$BASE/cm" --toy_grader --output "$OUT/eval/scores.json" --answers_output "$OUT/eval/answers.jsonl"
RUNS=() WINRATES=() ROWS=(SFT)
for ALGO in $ALGOS; do
    MODEL=${NAME[$ALGO]}
    python evaluate.py winrate $EVAL --generations "$OUT/eval/generations.jsonl" --scores "$OUT/eval/answers.jsonl" \
        --judge rm_cm --model_a "$MODEL" --model_b SFT --output "$OUT/eval/winrate_$MODEL.json"
    WINRATES+=("$OUT/eval/winrate_$MODEL.json") ROWS+=("$MODEL")
done
for ALGO in "${PPO_ALGOS[@]}"; do RUNS+=("${NAME[$ALGO]}=$OUT/$ALGO"); done  # (the curves are PPO's)

stamp "7/7 table and curves"
python evaluate.py plot --runs "${RUNS[@]}" --smooth 5 --output "$OUT/curves.png"
python evaluate.py table --scores "$OUT/eval/scores.json" --winrates "${WINRATES[@]}" --models "${ROWS[@]}" \
    --output "$OUT/table.md"
stamp "done: $OUT/table.md, $OUT/curves.png"
# The self-check: only claims that any machine reproduces (win rates, the grader's true harm, the safe rate). The
# mean reward and cost are in this run's own RM/CM units: another CPU trains other units, so they are not checked.
python scripts/toy_report.py check --run "$OUT"
