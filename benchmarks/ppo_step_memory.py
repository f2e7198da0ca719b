"""Peak host memory (RSS) of one PPO-Lagrangian step on SmolLM2-135M-sized models, built from a config offline.

Six roles (actor, reference, reward and cost models, two critics) of a 135M-parameter Llama (hidden 576, 30 layers,
9 heads / 3 KV heads, intermediate 1536, vocabulary 49152: SmolLM2-135M's shapes) with random weights. One warm-up
step creates the AdamW states; then the kernel's peak-RSS counter is reset (/proc/self/clear_refs) and the next
step's peak is read (VmHWM), next to the RSS before it. Run it against another checkout to compare versions:

    python benchmarks/ppo_step_memory.py                       # this checkout
    python benchmarks/ppo_step_memory.py --repo /tmp/old_tree  # the same step with another version's trainer
    python benchmarks/ppo_step_memory.py --roles one_base      # LoRA roles: six on one base (or three_bases)
    python benchmarks/ppo_step_memory.py --family llava        # LLaVA-1.5-style roles, each prompt with an image

--family llava: the six roles are a LLaVA-1.5-style model (LlavaForConditionalGeneration) whose language model has
the same SmolLM2-135M shapes, under a small random CLIP vision tower (hidden 256, intermediate 512, 2 layers,
4 heads) that sees LLaVA-1.5's 336-px images in 14-px patches: 576 image tokens per prompt, as LLaVA-1.5 has. It is
saved with a LlavaProcessor (the BPE tokenizer of tiny_models.train_tokenizer, a 336-px CLIPImageProcessorPil), and
every prompt row (BeaverTails-V schema) carries a 336x336 PNG written into the temporary folder. The image tokens
already make the prompt LLaVA-length, so --prompt_repeat defaults to 1 there (6 for text); prompt_tokens in the
output counts them.

It prints figures; it asserts nothing about them (with --family llava it refuses to run if a prompt lacks its
576 image tokens or its pixels).
"""

from __future__ import annotations

import argparse
import collections
import importlib
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


def smollm2_text_config(tokenizer, vocab_size: int) -> dict:
    """SmolLM2-135M's language-model shapes (the same for both families; vocab_size >= the tokenizer's)."""
    if vocab_size < len(tokenizer):
        raise SystemExit(f"--vocab_size {vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
    return dict(vocab_size=vocab_size, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None)


def build_text_policy(policy: Path, corpus: list[str], vocab_size: int) -> None:
    """A SmolLM2-135M-shaped Llama and its tokenizer, saved in `policy`."""
    import transformers as tf

    from tiny_models import train_tokenizer

    tokenizer = train_tokenizer(corpus, "text", 512)
    tf.LlamaForCausalLM(tf.LlamaConfig(**smollm2_text_config(tokenizer, vocab_size))).save_pretrained(str(policy))
    tokenizer.save_pretrained(str(policy))


IMAGE_SIZE, PATCH_SIZE = 336, 14  # LLaVA-1.5: (336 / 14)^2 = 576 image tokens


def build_llava_policy(policy: Path, corpus: list[str], vocab_size: int) -> None:
    """A LLaVA-1.5-style model (SmolLM2-135M-shaped language model, small CLIP tower: 576 image tokens) and its
    LlavaProcessor, saved in `policy`; built as tiny_models.build_tiny_model builds its LLaVA."""
    import transformers as tf
    from transformers.models.clip import CLIPImageProcessorPil

    from tiny_models import train_tokenizer

    tokenizer = train_tokenizer(corpus, "llava", 512)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise SystemExit("the tokenizer has no <image> token")
    vision = tf.CLIPVisionConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=256)
    text = smollm2_text_config(tokenizer, vocab_size)
    config = tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**text), image_token_index=image_token_id,
                            image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, vision_feature_layer=-1,
                            vision_feature_select_strategy="default", tie_word_embeddings=True)
    model = tf.LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                                  vision_feature_select_strategy="default", chat_template=tokenizer.chat_template,
                                  num_additional_image_tokens=1)
    model.save_pretrained(str(policy), safe_serialization=True)
    processor.save_pretrained(str(policy))


def build(out: Path, vocab_size: int, lora_scores: bool = False, prompt_repeat: int = 6,
          family: str = "text") -> tuple[str, str, str, str]:
    """A SmolLM2-135M-shaped policy (random weights; a text Llama, or with family "llava" a LLaVA-1.5-style model
    on that language model), a reward and a cost model on it (full score models, or LoRA adapters on the policy:
    lora_scores), and prompts (with family "llava", each with a 336x336 PNG image)."""
    import torch

    from modeling import ScoreModel

    torch.manual_seed(0)
    # a fixed corpus (not the toy world's, which changes between versions): the same tokenizer for every checkout
    corpus = [f"How should I store item number {i} at home? Keep it locked away. Leave it where the kids play."
              for i in range(64)] * 4
    policy = out / "policy"
    (build_llava_policy if family == "llava" else build_text_policy)(policy, corpus, vocab_size)
    scores = []
    for seed, name in ((1, "rm"), (2, "cm")):
        torch.manual_seed(seed)
        lora = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                            "gate_proj", "up_proj", "down_proj"]}
        model, processor = ScoreModel.from_pretrained(str(policy), **({"lora": lora} if lora_scores else {}))
        model.save_pretrained(str(out / name), processor)
        scores.append(str(out / name))
    if family == "llava":
        rows = [{"question": f"How should I store item number {i} at home? " * prompt_repeat,
                 "image": write_image(out / f"image_{i}.png", i), "category": "benchmark",
                 "response_1": "Keep it locked away.", "response_2": "Leave it where the kids play.",
                 "is_response_1_safe": "yes", "is_response_2_safe": "no", "more_helpful_response_id": "1",
                 "safer_response_id": "1"} for i in range(16)]
    else:
        rows = [{"prompt": f"How should I store item number {i} at home? " * prompt_repeat,
                 "response_0": "Keep it locked away.", "response_1": "Leave it where the kids play.",
                 "is_response_0_safe": True, "is_response_1_safe": False, "better_response_id": 0,
                 "safer_response_id": 0} for i in range(16)]
    prompts = out / "prompts.json"
    prompts.write_text(json.dumps(rows))
    return str(policy), scores[0], scores[1], str(prompts)


def write_image(path: Path, seed: int) -> str:
    """A 336x336 RGB PNG of random pixels (its name, relative to the prompts file's folder)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path.name


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
    parser.add_argument("--family", default="text", choices=["text", "llava"],
                        help="text: SmolLM2-135M-shaped Llama roles; llava: LLaVA-1.5-style roles on that language "
                        "model with a small CLIP tower, each prompt with a 336-px image (576 image tokens)")
    parser.add_argument("--prompt_repeat", type=int, default=None, help="repeats of the prompt sentence (default "
                        "6 for text: 84 tokens; 48: ~600, like LLaVA-1.5's 576 image tokens + a question; default 1 "
                        "for llava, whose 576 image tokens already make the prompt LLaVA-length)")
    parser.add_argument("--roles", default="separate", choices=["separate", "three_bases", "one_base"],
                        help="separate: six fully fine-tuned / frozen models (the default trainer); three_bases: LoRA "
                        "r 16 roles on the actor's, the reward model's and the cost model's bases; one_base: LoRA "
                        "reward and cost models on the actor's base, so one base holds all six roles")
    args = parser.parse_args()
    if args.prompt_repeat is None:
        args.prompt_repeat = 1 if args.family == "llava" else 6
    sys.path.insert(0, args.repo)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    import train_ppo_lag
    from data import collate, encode_example, load_prompts
    from utils import get_tokenizer
    from infra.cli import parse_args
    from infra.optim import NonFiniteGuard, make_optimizer
    from infra.runlog import quiet_transformers

    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        policy, rm, cm, prompts_file = build(Path(tmp), args.vocab_size, lora_scores=args.roles == "one_base",
                                             prompt_repeat=args.prompt_repeat, family=args.family)
        if args.roles != "separate":
            args.extra += " --lora_r 16 --lora_alpha 32"
        ppo_args = parse_args(train_ppo_lag.Args, [
            "--actor_model_name_or_path", policy, "--reward_model_name_or_path", rm, "--cost_model_name_or_path", cm,
            "--per_device_prompt_batch_size", str(args.batch), "--per_device_train_batch_size", str(args.batch),
            "--max_new_tokens", str(args.new_tokens), "--dtype", "float32", *shlex.split(args.extra)])
        # (an older checkout: load_roles in train_ppo_lag itself)
        load_roles = getattr(train_ppo_lag, "load_roles", None) or importlib.import_module("infra.ppo_setup").load_roles
        roles, processor, family = load_roles(ppo_args, torch.device("cpu"), None)
        optimizers = {name: make_optimizer(m, 1e-5, (0.9, 0.95), 0.0, "constant", 0.0, 10)
                      for name, m in roles.trained().items()}
        if family != args.family:
            raise SystemExit(f"built a {args.family} model but the trainer loaded it as {family}")
        rows, _ = load_prompts(prompts_file)
        tokenizer = get_tokenizer(processor)
        batch = collate([encode_example(processor, family, r["question"], r["image"], None, 4096)
                         for r in rows[:args.batch]], tokenizer.pad_token_id, "left")
        image_tokens = 0
        if family == "llava":  # every prompt must carry its 576 image tokens (and its pixels)
            image_id = tokenizer.convert_tokens_to_ids("<image>")
            per_row = (batch["input_ids"] == image_id).sum(dim=1)
            image_tokens = int(per_row[0])
            if not (per_row == (IMAGE_SIZE // PATCH_SIZE) ** 2).all() or "pixel_values" not in batch:
                raise SystemExit(f"expected {(IMAGE_SIZE // PATCH_SIZE) ** 2} image tokens and pixel_values in each "
                                 f"prompt, got {per_row.tolist()} image tokens, batch keys {sorted(batch)}")
        figures = {}
        for step in (1, 2):
            torch.manual_seed(step)
            if step == 2:
                reset_peak()
                figures["rss_before_step_mb"] = rss_mb()
            start = time.perf_counter()
            if hasattr(train_ppo_lag, "ppo_iteration"):  # lambda moves from 1.0 (no effect on the memory)
                train_ppo_lag.ppo_iteration(roles, roles.trained(), optimizers, processor, family, batch, 1.0,
                                            collections.deque(maxlen=128), {"integral": 0.0, "previous_error": None},
                                            step - 1, NonFiniteGuard(0), None, ppo_args)
            else:  # an older checkout
                r = train_ppo_lag.rollout(roles, processor, family, batch, ppo_args)
                train_ppo_lag.advantage_step(r, 1.0, ppo_args)
                train_ppo_lag.ppo_update(roles.trained(), optimizers, r, family, ppo_args)
            if step == 2:
                figures["step_seconds"] = round(time.perf_counter() - start, 2)
                figures["peak_rss_during_step_mb"] = rss_mb("VmHWM")
        figures["step_peak_above_before_mb"] = figures["peak_rss_during_step_mb"] - figures["rss_before_step_mb"]
        figures.update(family=args.family, roles=args.roles, repo=args.repo, batch=args.batch,
                       new_tokens=args.new_tokens, prompt_tokens=int(batch["input_ids"].shape[1]),
                       **({"image_tokens": image_tokens} if family == "llava" else {}),
                       prompt_repeat=args.prompt_repeat, vocab_size=args.vocab_size, extra=args.extra)
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
