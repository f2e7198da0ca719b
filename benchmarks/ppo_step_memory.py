"""Peak host memory (RSS) of one PPO-Lagrangian step on SmolLM2-135M-sized models, built from a config offline.

Six roles (actor, reference, reward and cost models, two critics) of a 135M-parameter Llama (hidden 576, 30 layers,
9 heads / 3 KV heads, intermediate 1536, vocabulary 49152: SmolLM2-135M's shapes) with random weights. One warm-up
step creates the AdamW states; then the kernel's peak-RSS counter is reset (/proc/self/clear_refs) and the next
step's peak is read (VmHWM), next to the RSS before it. Run it against another checkout to compare versions:

    python benchmarks/ppo_step_memory.py                       # this checkout
    python benchmarks/ppo_step_memory.py --repo /tmp/old_tree  # the same step with another version's trainer
    python benchmarks/ppo_step_memory.py --roles one_base      # LoRA roles: six on one base (or three_bases)

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def build(out: Path, vocab_size: int, lora_scores: bool = False, prompt_repeat: int = 6) -> tuple[str, str, str, str]:
    """A SmolLM2-135M-shaped text model (random weights), a reward and a cost model on it (full score models, or
    LoRA adapters on the policy: lora_scores), and prompts."""
    import torch
    import transformers as tf

    from modeling import ScoreModel
    from tiny_models import train_tokenizer

    torch.manual_seed(0)
    # a fixed corpus (not the toy world's, which changes between versions): the same tokenizer for every checkout
    corpus = [f"How should I store item number {i} at home? Keep it locked away. Leave it where the kids play."
              for i in range(64)] * 4
    tokenizer = train_tokenizer(corpus, "text", 512)
    config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                            tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    policy = out / "policy"
    tf.LlamaForCausalLM(config).save_pretrained(str(policy))
    tokenizer.save_pretrained(str(policy))
    scores = []
    for seed, name in ((1, "rm"), (2, "cm")):
        torch.manual_seed(seed)
        lora = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                            "gate_proj", "up_proj", "down_proj"]}
        model, processor = ScoreModel.from_pretrained(str(policy), **({"lora": lora} if lora_scores else {}))
        model.save_pretrained(str(out / name), processor)
        scores.append(str(out / name))
    rows = [{"prompt": f"How should I store item number {i} at home? " * prompt_repeat, "response_0": "Keep it locked away.",
             "response_1": "Leave it where the kids play.", "is_response_0_safe": True, "is_response_1_safe": False,
             "better_response_id": 0, "safer_response_id": 0} for i in range(16)]
    prompts = out / "prompts.json"
    prompts.write_text(json.dumps(rows))
    return str(policy), scores[0], scores[1], str(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]),
                        help="checkout whose train_ppo_lag.py is measured")
    parser.add_argument("--batch", type=int, default=4, help="prompts per rollout (one PPO minibatch)")
    parser.add_argument("--new_tokens", type=int, default=32, help="sampled tokens per response")
    parser.add_argument("--vocab_size", type=int, default=49152, help="model vocabulary (SmolLM2: 49152)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--extra", default="", help="extra train_ppo_lag options in one string, e.g. "
                        "'--rollout_micro_batch_size 1'")
    parser.add_argument("--prompt_repeat", type=int, default=6, help="repeats of the prompt sentence (6: 84 "
                        "tokens; 48: ~600, like LLaVA-1.5's 576 image tokens + a question)")
    parser.add_argument("--roles", default="separate", choices=["separate", "three_bases", "one_base"],
                        help="separate: six fully fine-tuned / frozen models (the default trainer); three_bases: LoRA "
                        "r 16 roles on the actor's, the reward model's and the cost model's bases; one_base: LoRA "
                        "reward and cost models on the actor's base, so one base holds all six roles")
    args = parser.parse_args()
    sys.path.insert(0, args.repo)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    import train_ppo_lag
    from data import collate, encode_example, load_prompts
    from modeling import get_tokenizer
    from utils import make_optimizer, parse_args, quiet_transformers

    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        policy, rm, cm, prompts_file = build(Path(tmp), args.vocab_size, lora_scores=args.roles == "one_base",
                                             prompt_repeat=args.prompt_repeat)
        if args.roles != "separate":
            args.extra += " --lora_r 16 --lora_alpha 32"
        ppo_args = parse_args(train_ppo_lag.Args, [
            "--actor_model_name_or_path", policy, "--reward_model_name_or_path", rm, "--cost_model_name_or_path", cm,
            "--per_device_prompt_batch_size", str(args.batch), "--per_device_train_batch_size", str(args.batch),
            "--max_new_tokens", str(args.new_tokens), "--dtype", "float32", *shlex.split(args.extra)])
        roles, processor, family = train_ppo_lag.load_roles(ppo_args, torch.device("cpu"), None)
        optimizers = {name: make_optimizer(m, 1e-5, (0.9, 0.95), 0.0, "constant", 0.0, 10)
                      for name, m in roles.trained().items()}
        rows, _ = load_prompts(prompts_file)
        pad = get_tokenizer(processor).pad_token_id
        batch = collate([encode_example(processor, family, r["question"], r["image"], None, 4096)
                         for r in rows[:args.batch]], pad, "left")
        figures = {}
        for step in (1, 2):
            torch.manual_seed(step)
            if step == 2:
                reset_peak()
                figures["rss_before_step_mb"] = rss_mb()
            start = time.perf_counter()
            r = train_ppo_lag.rollout(roles, processor, family, batch, ppo_args)
            train_ppo_lag.advantage_step(r, 1.0, ppo_args)
            train_ppo_lag.ppo_update(roles.trained(), optimizers, r, family, ppo_args)
            if step == 2:
                figures["step_seconds"] = round(time.perf_counter() - start, 2)
                figures["peak_rss_during_step_mb"] = rss_mb("VmHWM")
        figures["step_peak_above_before_mb"] = figures["peak_rss_during_step_mb"] - figures["rss_before_step_mb"]
        figures.update(roles=args.roles, repo=args.repo, batch=args.batch, new_tokens=args.new_tokens,
                       prompt_tokens=int(batch["input_ids"].shape[1]), vocab_size=args.vocab_size, extra=args.extra)
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
