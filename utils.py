"""Shared pieces of the Safe RLHF-V stages (SFT, reward model, cost model, PPO-Lagrangian, evaluation).

Only what two or more stages need lives here:
  1. arguments, run logging and torchrun helpers,
  2. loading a policy (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL or a text causal LM) and its processor,
  3. the score model (reward model, cost model and both critics are all this one class),
  4. chat formatting and collation (one function turns image + question [+ response] into model inputs),
  5. data: BeaverTails-V pairwise rows (hub, local parquet, JSONL), PKU-SafeRLHF text rows, SFT examples,
     each row validated with errors that name the file, row and field,
  6. the SFT cross-entropy (it is also the PTX term of PPO-Lagrangian) and the masked mean,
  7. training plumbing (data loaders that resume mid-epoch, optimizer + schedule, generation for rollouts),
  8. checkpoints (atomic, exact resume) and the non-finite guard.

The method these follow is in the README and, in more detail, in the paper (Ji et al., NeurIPS 2025).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import random
import sys
import typing
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# ----------------------------------------------------------------------------------------------------------
# 1. Arguments, logging, distributed
# ----------------------------------------------------------------------------------------------------------


def arg(default, help: str):
    """A dataclass field with a help string (shown by --help together with its default)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def parse_args(cls, argv: list[str] | None = None, description: str | None = None):
    """argparse generated from a dataclass: one --option per field, help text and default shown."""
    parser = argparse.ArgumentParser(
        description=description or cls.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(cls)  # resolves the string annotations of `from __future__ import annotations`
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        ftype = hints[f.name]
        if ftype is bool:
            parser.add_argument(f"--{f.name}", type=_str2bool, nargs="?", const=True, default=default, help=help_text)
        elif ftype in (int, float, str):
            parser.add_argument(f"--{f.name}", type=ftype, default=default, help=help_text)
        else:  # optional str / int / float, or a list
            origin = getattr(ftype, "__args__", (str,))
            base = next((t for t in origin if t in (int, float, str)), str)
            if isinstance(default, list):
                parser.add_argument(f"--{f.name}", type=base, nargs="*", default=default, help=help_text)
            else:
                parser.add_argument(f"--{f.name}", type=base, default=default, help=help_text)
    return cls(**vars(parser.parse_args(argv)))


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Works unchanged under `torchrun` (NCCL on GPU, gloo on CPU) and alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def seed_everything(seed: int, rank: int = 0) -> None:
    """Per-rank seeds so that ranks draw different samples but a run is reproducible."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunLog:
    """The files every stage writes to --output_dir: args.json, metrics.jsonl (one object per logged step) and
    summary.json. Only rank 0 writes; every write is flushed so a crash loses nothing already logged."""

    def __init__(self, output_dir: str, args, rank: int = 0, resume: bool = False):
        self.output_dir = Path(output_dir)
        self.rank = rank
        self.lines = 0  # records written so far (a checkpoint stores it, resume truncates to it)
        if rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if not resume:  # a fresh run into an old folder must not mix its metrics with the old ones
                (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
            args_dict = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
            # Secrets never reach a file: any option whose name says key/token/secret is masked.
            for name in args_dict:
                if name.lower().endswith(("api_key", "_token", "secret", "password")):
                    args_dict[name] = "***" if args_dict[name] else args_dict[name]
            write_json(self.output_dir / "args.json", args_dict)

    def metrics(self, record: dict) -> None:
        self.lines += 1
        if self.rank == 0:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")

    def truncate(self, n_lines: int) -> None:
        """On resume: keep the first n_lines records (those logged up to the checkpoint), drop what a killed run
        logged after it."""
        path = self.output_dir / "metrics.jsonl"
        if self.rank == 0 and path.is_file():
            lines = [line for line in path.read_text().splitlines() if line.strip()][:n_lines]
            path.write_text("".join(line + "\n" for line in lines))
        self.lines = n_lines

    def summary(self, record: dict) -> None:
        if self.rank == 0:
            write_json(self.output_dir / "summary.json", record)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(path, obj) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(_jsonable(obj), f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# 2. Models: policy + processor for every family
# ----------------------------------------------------------------------------------------------------------

VLM_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
FAMILIES = VLM_FAMILIES + ("text",)
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# Modules left unquantized by bitsandbytes: the vision tower and projector are small and precision-sensitive.
# transformers matches these from the start of the full module name (as regexes) or as suffixes, hence ".*".
SKIP_QUANTIZATION = [r".*vision_tower", r".*multi_modal_projector", r".*visual", "lm_head", "score_head"]


def detect_family(config) -> str:
    """The family of a transformers config: one of FAMILIES (every causal LM that is not a VLM is "text")."""
    model_type = getattr(config, "model_type", "")
    if model_type in VLM_FAMILIES:
        return model_type
    if hasattr(config, "vision_config"):
        raise ValueError(
            f"unsupported vision-language model type {model_type!r}; supported: {', '.join(VLM_FAMILIES)} "
            "(or any text-only causal LM)"
        )
    return "text"


def _no_video_processor(processor_cls):
    """Qwen2(.5)-VL processors insist on a video processor, whose import needs torchvision. We never feed videos,
    so this subclass has only the image processor and the tokenizer; it saves under the original class name, so
    the saved directory stays a normal Qwen processor directory."""
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnlyProcessor.__name__ = processor_cls.__name__
    ImageOnlyProcessor.__qualname__ = processor_cls.__qualname__
    return ImageOnlyProcessor


def processor_class(family: str):
    import transformers

    return {
        "llava": transformers.LlavaProcessor,
        "llava_next": transformers.LlavaNextProcessor,
        "qwen2_vl": _no_video_processor(transformers.Qwen2VLProcessor),
        "qwen2_5_vl": _no_video_processor(transformers.Qwen2_5_VLProcessor),
        "text": transformers.AutoTokenizer,
    }[family]


def load_processor(path: str, family: str | None = None, trust_remote_code: bool = False):
    """The processor (a tokenizer for text LMs) of a checkpoint. Padding side is set per batch by our collators."""
    from transformers import AutoConfig

    if family is None:
        family = detect_family(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    processor = processor_class(family).from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = get_tokenizer(processor)
    if tokenizer.pad_token_id is None:  # e.g. Llama tokenizers: pad with EOS, masks keep it out of every loss
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def get_tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def torch_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    if name == "auto":  # bf16 on GPU (the paper's setting), fp32 on CPU
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def quantization_config(quantization: str):
    """bitsandbytes 8-bit or 4-bit (nf4) loading that leaves the vision tower and projector unquantized."""
    if quantization in ("", "none", None):
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_QUANTIZATION)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
            llm_int8_skip_modules=SKIP_QUANTIZATION,
        )
    raise ValueError(f"--quantization must be none, 8bit or 4bit, got {quantization!r}")


def vision_tower(model) -> nn.Module | None:
    """The vision encoder of a VLM (without the projector, which trains), or None for a text LM."""
    base = getattr(model, "model", model)
    if hasattr(base, "vision_tower"):  # LLaVA, LLaVA-NeXT
        return base.vision_tower
    if hasattr(base, "visual"):  # Qwen2(.5)-VL: the patch merger inside `visual` is the projector
        return base.visual
    return None


def freeze_vision_tower(model) -> None:
    tower = vision_tower(model)
    if tower is None:
        return
    for name, param in tower.named_parameters():
        if not name.startswith("merger."):  # Qwen's projector lives inside `visual`; it keeps training
            param.requires_grad_(False)


def _load_weights(model_cls, path: str, dtype: str, device, quantization: str, trust_remote_code: bool):
    """from_pretrained with our safe defaults: safetensors only, remote code only if asked, optional bitsandbytes."""
    quant = quantization_config(quantization)
    model = model_cls.from_pretrained(
        path,
        dtype=torch_dtype(dtype, device),
        quantization_config=quant,
        device_map={"": torch.device(device)} if quant is not None else None,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    return model if quant is not None else model.to(device)


def load_policy(
    path: str,
    dtype: str = "auto",
    device: torch.device | str = "cpu",
    quantization: str = "none",
    freeze_vision: bool = True,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
):
    """Load a policy (a causal LM with its LM head) and its processor from a hub id or a local directory.

    Returns (model, processor, family). Safetensors only; no remote code unless asked for.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    family = detect_family(config)
    model_cls = AutoModelForCausalLM if family == "text" else AutoModelForImageTextToText
    model = _load_weights(model_cls, path, dtype, device, quantization, trust_remote_code)
    if freeze_vision:
        freeze_vision_tower(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    processor = load_processor(path, family, trust_remote_code)
    return model, processor, family


def never_sample_ids(processor) -> list[int]:
    """Tokens a rollout must never sample: image/video placeholders (the processor expands them, a sampled one
    breaks the next forward) and the pad token (after the first EOS everything is padding)."""
    tokenizer = get_tokenizer(processor)
    ids = {tokenizer.pad_token_id}
    for name in ("image_token", "video_token"):
        token = getattr(processor, name, None)
        if token is not None:
            ids.add(tokenizer.convert_tokens_to_ids(token))
    eos = tokenizer.eos_token_id
    return sorted(i for i in ids if i is not None and i >= 0 and i != eos)


def forward_kwargs(batch: dict, family: str) -> dict:
    """Model inputs from a collated batch. Every forward (policy, reference, reward, cost, both critics) goes
    through here so all of them see the same image inputs.

    Position ids: for Qwen the model derives 3-D rope positions from the attention mask and mm_token_type_ids;
    for the others we pass cumsum(mask) - 1, so left padding gives the same positions as right padding."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    for key in ("pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids"):
        if key in batch:
            kwargs[key] = batch[key]
    if family not in QWEN_FAMILIES:
        kwargs["position_ids"] = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return kwargs


# ----------------------------------------------------------------------------------------------------------
# 3. Score model: reward model, cost model, reward critic, cost critic
# ----------------------------------------------------------------------------------------------------------

SCORE_HEAD_FILE = "score_head.safetensors"
SCORE_CONFIG_FILE = "score_config.json"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token of each row, for left and right padding alike. (**FIX** over the released
    code, which reads position -1 of a right-padded batch, i.e. a pad token for every shorter sequence.)"""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=-1)


class ScoreModel(nn.Module):
    """Backbone (the whole VLM or LM, without LM head) + a linear head hidden -> 1.

    forward() gives a score per token (B, L) and the sequence score at the last non-pad token (B,). Created from a
    policy checkpoint (new head) or from a score checkpoint; save_pretrained() writes a self-describing directory
    (backbone config + safetensors, score_head.safetensors, score_config.json, processor) that from_pretrained()
    reloads with one call.
    """

    def __init__(self, backbone: nn.Module, family: str, hidden_size: int, score_config: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.family = family
        self.score_config = dict(score_config or {})
        self.score_head = nn.Linear(hidden_size, 1)
        # A small head keeps initial scores near 0, so the first pairwise losses are near log 2.
        nn.init.normal_(self.score_head.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.score_head.bias)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: str = "auto",
        device: torch.device | str = "cpu",
        quantization: str = "none",
        freeze_vision: bool = True,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
    ) -> tuple["ScoreModel", Any]:
        """Load a score model and its processor. A policy checkpoint gets a freshly initialised head."""
        from transformers import AutoConfig, AutoModel
        from safetensors.torch import load_file

        path = str(path)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        family = detect_family(config)
        hidden_size = (config.text_config if family != "text" else config).hidden_size
        head_file = Path(path) / SCORE_HEAD_FILE
        if head_file.is_file():  # a saved score model: backbone + head
            backbone = _load_weights(AutoModel, path, dtype, device, quantization, trust_remote_code)
            score_config = json.loads((Path(path) / SCORE_CONFIG_FILE).read_text())
            model = cls(backbone, family, hidden_size, score_config)
            model.score_head.load_state_dict(load_file(str(head_file)))
        else:  # a policy checkpoint: keep its base model, drop the LM head
            policy, _, family = load_policy(
                path, dtype, device, quantization, freeze_vision=False, trust_remote_code=trust_remote_code
            )
            model = cls(policy.model, family, hidden_size, {"initialised_from": path})
            del policy
        model.score_head.to(device)
        if freeze_vision:
            freeze_vision_tower(model.backbone)
        if gradient_checkpointing:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        processor = load_processor(path, family, trust_remote_code)
        return model, processor

    def save_pretrained(self, path: str, processor=None, extra_config: dict | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(path), safe_serialization=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.score_head.state_dict().items()},
                  str(path / SCORE_HEAD_FILE))
        self.score_config.update(extra_config or {})
        write_json(path / SCORE_CONFIG_FILE, {"family": self.family, **self.score_config})
        if processor is not None:
            processor.save_pretrained(str(path))

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores per token (B, L), end scores at the last non-pad token (B,)), both float32."""
        hidden = self.backbone(**forward_kwargs(batch, self.family), use_cache=False).last_hidden_state
        scores = self.score_head(hidden.to(self.score_head.weight.dtype)).squeeze(-1).float()
        end_index = last_token_index(batch["attention_mask"])
        end_scores = scores.gather(1, end_index.unsqueeze(1)).squeeze(1)
        return scores, end_scores


# ----------------------------------------------------------------------------------------------------------
# 4. Chat formatting and collation
# ----------------------------------------------------------------------------------------------------------

IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")


def chat_messages(question: str, has_image: bool, response: str | None = None, family: str = "llava") -> list:
    """The conversation: user content = [image, text question]; assistant content = the response text."""
    if family == "text":
        messages = [{"role": "user", "content": question}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        return messages
    user = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": user}]
    if response is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return messages


def _encode_prompt(processor, family: str, question: str, image) -> dict:
    prompt_text = processor.apply_chat_template(
        chat_messages(question, image is not None, family=family), add_generation_prompt=True, tokenize=False
    )
    if image is not None:
        enc = processor(images=[image], text=[prompt_text], return_tensors="pt", add_special_tokens=False)
    else:
        enc = get_tokenizer(processor)([prompt_text], return_tensors="pt", add_special_tokens=False)
    return dict(enc)


def encode_example(
    processor,
    family: str,
    question: str,
    image: Image.Image | None = None,
    response: str | None = None,
    max_length: int | None = None,
    stats: Counter | None = None,
    add_eos: bool = True,
) -> dict:
    """Model inputs for one (image or none, question, response or none) through the processor's chat template.

    Prompt-only (response=None): the user turn with the generation prompt appended, for rollouts.
    Prompt + response: response tokens (tokenised on their own, then EOS) follow the prompt, and `response_mask`
    marks exactly them, so the SFT loss, the score and every PPO mean see the response and nothing else.
    Too long: the question is truncated from the left (its end, usually the actual ask, is kept) and
    stats["truncated_question"] is counted; if the response alone does not fit it is cut on the right
    (stats["truncated_response"], and then there is no EOS).
    """
    tokenizer = get_tokenizer(processor)
    response_ids = []
    if response is not None:
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if add_eos else [])
    enc = _encode_prompt(processor, family, question, image)
    if max_length is not None and enc["input_ids"].shape[1] + len(response_ids) > max_length:
        question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
        overhead = enc["input_ids"].shape[1] - len(question_ids)  # template + image tokens
        if overhead + len(response_ids) > max_length - 1 and response is not None:
            keep = max(1, max_length - overhead - 1)
            response_ids = response_ids[:keep]
            if stats is not None:
                stats["truncated_response"] += 1
        budget = max_length - len(response_ids)
        for _ in range(8):  # decode/encode is not exactly invertible; shrink until it fits
            if enc["input_ids"].shape[1] <= budget:
                break
            over = enc["input_ids"].shape[1] - budget
            question_ids = question_ids[over:]
            question = tokenizer.decode(question_ids, skip_special_tokens=True)
            enc = _encode_prompt(processor, family, question, image)
        if enc["input_ids"].shape[1] > budget:
            raise ValueError(f"cannot fit the prompt into max_length={max_length}: the template and image need "
                             f"{overhead} tokens; raise --max_length")
        if stats is not None:
            stats["truncated_question"] += 1
    prompt_ids = enc["input_ids"][0]
    n_prompt, n_response = prompt_ids.shape[0], len(response_ids)
    example = {
        "input_ids": torch.cat([prompt_ids, torch.tensor(response_ids, dtype=torch.long)]),
        "attention_mask": torch.ones(n_prompt + n_response, dtype=torch.long),
        "response_mask": torch.cat([torch.zeros(n_prompt, dtype=torch.bool), torch.ones(n_response, dtype=torch.bool)]),
    }
    if "mm_token_type_ids" in enc:  # Qwen: 0 (text) over the response too
        example["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"][0], torch.zeros(n_response, dtype=torch.long)])
    for key in IMAGE_KEYS:
        if key in enc:
            example[key] = enc[key]
    return example


def _pad(sequences: list[torch.Tensor], value, side: str) -> torch.Tensor:
    length = max(s.shape[0] for s in sequences)
    out = torch.full((len(sequences), length), value, dtype=sequences[0].dtype)
    for i, s in enumerate(sequences):
        if side == "left":
            out[i, length - s.shape[0]:] = s
        else:
            out[i, : s.shape[0]] = s
    return out


def collate(examples: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad encoded examples into a batch and carry each family's image tensors: `pixel_values` (LLaVA: one per
    image; LLaVA-NeXT: patches padded to the batch maximum, `image_sizes` says which are real; Qwen: patches
    concatenated with `image_grid_thw`) and Qwen's `mm_token_type_ids`. Labels are -100 outside the response."""
    batch = {
        "input_ids": _pad([e["input_ids"] for e in examples], pad_token_id, padding_side),
        "attention_mask": _pad([e["attention_mask"] for e in examples], 0, padding_side),
        "response_mask": _pad([e["response_mask"] for e in examples], False, padding_side),
    }
    batch["labels"] = batch["input_ids"].masked_fill(~batch["response_mask"], -100)
    if any("mm_token_type_ids" in e for e in examples):
        batch["mm_token_type_ids"] = _pad(
            [e.get("mm_token_type_ids", torch.zeros_like(e["input_ids"])) for e in examples], 0, padding_side
        )
    with_images = [e for e in examples if "pixel_values" in e]
    if with_images:
        pixel_values = [e["pixel_values"] for e in with_images]
        if "image_sizes" in with_images[0] and pixel_values[0].dim() == 5:  # LLaVA-NeXT: (1, patches, 3, h, w)
            n = max(p.shape[1] for p in pixel_values)
            pixel_values = [F.pad(p, (0, 0, 0, 0, 0, 0, 0, n - p.shape[1])) for p in pixel_values]
        batch["pixel_values"] = torch.cat(pixel_values)
        for key in ("image_sizes", "image_grid_thw"):
            if key in with_images[0]:
                batch[key] = torch.cat([e[key] for e in with_images])
    return batch


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def collate_pairs(first: list[dict], second: list[dict], pad_token_id: int) -> dict:
    """A preference batch: rows 0..B-1 are the `first` responses (chosen / higher-cost), rows B..2B-1 the `second`
    ones, so a score model scores a whole batch of pairs in one forward."""
    return collate(first + second, pad_token_id, "right")


# ----------------------------------------------------------------------------------------------------------
# 5. Data: BeaverTails-V pairs, PKU-SafeRLHF pairs, SFT examples
# ----------------------------------------------------------------------------------------------------------


class DataError(ValueError):
    """A bad input file or row. The message names the file, the row index and the field."""

    def __init__(self, source: str, row: int | None, field: str | None, problem: str, reason: str = "invalid"):
        where = str(source) + (f", row {row}" if row is not None else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}")
        self.reason = reason


BEAVERTAILS_V_FIELDS = (
    "question", "image", "category", "response_1", "response_2", "more_helpful_response_id", "safer_response_id",
    "is_response_1_safe", "is_response_2_safe",
)
PKU_FIELDS = (
    "prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe", "better_response_id",
    "safer_response_id",
)


def _id12(value, source, row, field) -> int:
    if isinstance(value, bool) or str(value).strip() not in ("1", "2"):
        raise DataError(source, row, field, f"must be \"1\" or \"2\", got {value!r}", "bad_response_id")
    return int(str(value).strip())


def _safe_flag(value, source, row, field) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
        return value.strip().lower() == "yes"
    raise DataError(source, row, field, f"must be \"yes\" or \"no\", got {value!r}", "bad_safety_label")


def _text(value, source, row, field) -> str:
    if not isinstance(value, str):
        raise DataError(source, row, field, f"must be a string, got {type(value).__name__}", "bad_text")
    if not value.strip():
        raise DataError(source, row, field, "is empty", "empty_text")
    return value


def _rate(value, source, row, field, low, high):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not number.is_integer() or not low <= number <= high:
        raise DataError(source, row, field, f"must be an integer in [{low}, {high}], got {value!r}", "bad_rate")
    return int(number)


def load_image(value, source, row, base_dir: Path | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image, an HF Image struct {bytes, path}, raw bytes or a path (relative paths are
    resolved against the data file's folder)."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str) or (isinstance(value, dict) and value.get("path")):
            path = Path(value if isinstance(value, str) else value["path"])
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise DataError(source, row, "image", f"file not found: {path}", "missing_image")
            image = Image.open(path)
        else:
            raise DataError(source, row, "image", f"no image (got {type(value).__name__})", "missing_image")
        image.load()
        return image.convert("RGB")
    except DataError:
        raise
    except Exception as e:  # PIL raises several types for corrupt data
        raise DataError(source, row, "image", f"unreadable image ({type(e).__name__}: {e})", "unreadable_image")


def validate_pair_row(raw: dict, source: str, row: int, base_dir: Path | None = None, with_image: bool = True) -> dict:
    """One BeaverTails-V (or PKU-SafeRLHF) row -> a normalised pair dict, or DataError naming the bad field."""
    if "better_response_id" in raw:  # PKU-SafeRLHF text schema: ids 0/1, booleans
        missing = [f for f in PKU_FIELDS if f not in raw]
        if missing:
            raise DataError(source, row, missing[0], "missing field (PKU-SafeRLHF schema)", "missing_field")
        ids = {}
        for field in ("better_response_id", "safer_response_id"):
            if str(raw[field]) not in ("0", "1") or isinstance(raw[field], bool):
                raise DataError(source, row, field, f"must be 0 or 1, got {raw[field]!r}", "bad_response_id")
            ids[field] = int(raw[field]) + 1
        for field in ("prompt", "response_0", "response_1"):
            _text(raw[field], source, row, field)
        for field in ("is_response_0_safe", "is_response_1_safe"):
            _safe_flag(raw[field], source, row, field)
        if raw["response_0"].strip() == raw["response_1"].strip():
            raise DataError(source, row, "response_1", "identical to response_0", "identical_responses")
        raw = {
            "question": raw["prompt"], "image": None, "category": raw.get("category", "text"),
            "response_1": raw["response_0"], "response_2": raw["response_1"],
            "more_helpful_response_id": str(ids["better_response_id"]), "safer_response_id": str(ids["safer_response_id"]),
            "is_response_1_safe": raw["is_response_0_safe"], "is_response_2_safe": raw["is_response_1_safe"],
        }
        with_image = False
    for field in BEAVERTAILS_V_FIELDS:
        if field not in raw and not (field == "image" and not with_image) and not (field == "category"):
            raise DataError(source, row, field, "missing field", "missing_field")
    pair = {
        "question": _text(raw["question"], source, row, "question"),
        "category": str(raw.get("category") or "uncategorized"),
        "responses": (_text(raw["response_1"], source, row, "response_1"),
                      _text(raw["response_2"], source, row, "response_2")),
        "more_helpful": _id12(raw["more_helpful_response_id"], source, row, "more_helpful_response_id"),
        "safer": _id12(raw["safer_response_id"], source, row, "safer_response_id"),
        "is_safe": (_safe_flag(raw["is_response_1_safe"], source, row, "is_response_1_safe"),
                    _safe_flag(raw["is_response_2_safe"], source, row, "is_response_2_safe")),
        "harmless_rate": tuple(_rate(raw.get(f"response_{k}_harmless_rate"), source, row,
                                     f"response_{k}_harmless_rate", -3, 3) for k in (1, 2)),
        "source": f"{source}:{row}",
    }
    if pair["responses"][0].strip() == pair["responses"][1].strip():
        raise DataError(source, row, "response_2", "identical to response_1", "identical_responses")
    for k in (0, 1):
        rate = pair["harmless_rate"][k]
        if rate is not None and (rate >= 0) != pair["is_safe"][k]:
            raise DataError(source, row, f"response_{k + 1}_harmless_rate",
                            f"rate {rate} contradicts is_response_{k + 1}_safe (rate >= 0 iff safe)", "inconsistent_safety")
    pair["image"] = load_image(raw.get("image"), source, row, base_dir) if with_image else None
    return pair


class SkipCounter(Counter):
    """Rows skipped under --skip_invalid, counted by reason; printed and written into summary.json."""

    def report(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in sorted(self.items())) or "none"


def _read_records(path: Path) -> list[dict]:
    """Raw rows of a .jsonl, .json (list) or .parquet file."""
    if not path.is_file():
        raise DataError(path, None, None, "file not found", "missing_file")
    if path.suffix == ".parquet":
        import datasets

        ds = datasets.Dataset.from_parquet(str(path))
        if "image" in ds.column_names:
            ds = ds.cast_column("image", datasets.Image(decode=False))  # decode ourselves, with row-level errors
        return list(ds)
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:  # raised (or skipped) by _validate_all, like any bad row
                    rows.append(DataError(path, len(rows), None, f"not valid JSON ({e})", "bad_json"))
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(path, None, None, f"not valid JSON ({e})", "bad_json")
        if not isinstance(data, list):
            raise DataError(path, None, None, "expected a JSON list of rows", "bad_json")
        return data
    raise DataError(path, None, None, "unsupported file type (use .parquet, .jsonl or .json)", "bad_file")


def _split_files(root: Path, split: str, categories: list[str] | None) -> list[Path]:
    """`<root>/<category>/<split>.parquet` (the hub layout; `<root>/data/...` works too)."""
    if (root / "data").is_dir() and not any(root.glob(f"*/{split}.parquet")):
        root = root / "data"
    available = sorted(p.parent.name for p in root.glob(f"*/{split}.parquet"))
    if not available:
        raise DataError(root, None, None, f"no <category>/{split}.parquet files found", "missing_file")
    wanted = categories or available
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DataError(root, None, "category", f"unknown categories {unknown}; available: {available}", "missing_file")
    return [root / c / f"{split}.parquet" for c in wanted]


def _validate_all(records, source, validate, skip_invalid: bool, skips: SkipCounter, **kwargs) -> list[dict]:
    out = []
    for i, raw in enumerate(records):
        try:
            if isinstance(raw, DataError):
                raise raw
            if not isinstance(raw, dict):
                raise DataError(source, i, None, f"row must be an object, got {type(raw).__name__}", "bad_row")
            out.append(validate(raw, source, i, **kwargs))
        except DataError as e:
            if not skip_invalid:
                raise
            skips[e.reason] += 1
    return out


def load_pairs(
    source: str,
    split: str = "train",
    categories: list[str] | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> tuple[list[dict], SkipCounter]:
    """Preference pairs from (a) a hub id (one config per category, through `datasets`), (b) a local directory in
    the hub layout `<category>/{train,evaluation}.parquet`, (c) a BeaverTails-V JSONL file with image paths
    relative to it, or a PKU-SafeRLHF .json/.jsonl file (text only). Returns (pairs, skips by reason)."""
    skips = SkipCounter()
    path = Path(source)
    pairs: list[dict] = []
    if path.is_dir():
        for file in _split_files(path, split, categories):
            pairs += _validate_all(_read_records(file), str(file), validate_pair_row, skip_invalid, skips,
                                   base_dir=file.parent)
    elif path.is_file() or path.suffix in (".jsonl", ".json", ".parquet"):
        records = _read_records(path)
        pairs = _validate_all(records, str(path), validate_pair_row, skip_invalid, skips, base_dir=path.parent)
        if categories:
            pairs = [p for p in pairs if p["category"] in categories]
    else:  # a hub id: the same rows through `datasets` (needs network access to the hub)
        import datasets

        names = categories or datasets.get_dataset_config_names(source)
        for name in names:
            ds = datasets.load_dataset(source, name=name, split=split).cast_column("image", datasets.Image(decode=False))
            pairs += _validate_all(list(ds), f"{source}/{name}/{split}", validate_pair_row, skip_invalid, skips)
    if not pairs:
        raise DataError(source, None, None, f"no valid rows in split {split!r}"
                        + (f" (skipped: {skips.report()})" if skips else ""), "empty_dataset")
    if limit and limit < len(pairs):  # a seeded random subset, so every category is represented
        keep = sorted(random.Random(0).sample(range(len(pairs)), len(pairs))[:limit])  # nested: N < M => subset
        pairs = [pairs[i] for i in keep]
    return pairs, skips


def reward_pair(pair: dict) -> dict:
    """Reward pair: chosen = response_{more_helpful_response_id}, rejected = the other."""
    better = pair["more_helpful"] - 1
    return {"image": pair["image"], "question": pair["question"], "category": pair["category"],
            "chosen": pair["responses"][better], "rejected": pair["responses"][1 - better]}


def cost_pair(pair: dict, sign_source: str = "rate") -> dict:
    """Cost pair: the higher-cost side is the response that is NOT safer_response_id. Each side carries its safety
    sign s = -harmless_rate (sign_source="rate", harmful -> s > 0, a refusal rated 0 -> s = 0), or s = +-1 from the
    binary label (sign_source="binary", and whenever no rate exists, as in PKU-SafeRLHF)."""
    safer = pair["safer"] - 1
    signs = []
    for k in (1 - safer, safer):  # (higher cost, safer)
        rate = pair["harmless_rate"][k]
        if sign_source == "rate" and rate is not None:
            signs.append(float(-rate))
        else:
            signs.append(-1.0 if pair["is_safe"][k] else 1.0)
    return {"image": pair["image"], "question": pair["question"], "category": pair["category"],
            "higher_cost": pair["responses"][1 - safer], "safer": pair["responses"][safer],
            "higher_cost_sign": signs[0], "safer_sign": signs[1],
            "higher_cost_is_safe": pair["is_safe"][1 - safer], "safer_is_safe": pair["is_safe"][safer]}


def validate_sft_row(raw: dict, source: str, row: int, base_dir: Path | None = None) -> dict:
    for field in ("question", "response"):
        if field not in raw:
            raise DataError(source, row, field, "missing field", "missing_field")
    image = raw.get("image")
    return {"question": _text(raw["question"], source, row, "question"),
            "response": _text(raw["response"], source, row, "response"),
            "category": str(raw.get("category") or "uncategorized"),
            "image": None if image is None else load_image(image, source, row, base_dir)}


def load_sft(source: str, skip_invalid: bool = False, limit: int | None = None) -> tuple[list[dict], SkipCounter]:
    """SFT examples (question, response, optional image path relative to the file) from .jsonl/.json/.parquet."""
    path = Path(source)
    skips = SkipCounter()
    rows = _validate_all(_read_records(path), str(path), validate_sft_row, skip_invalid, skips, base_dir=path.parent)
    if not rows:
        raise DataError(source, None, None, "no valid rows" + (f" (skipped: {skips.report()})" if skips else ""),
                        "empty_dataset")
    return (rows[:limit] if limit else rows), skips


def load_prompts(source: str, split: str = "train", categories: list[str] | None = None, skip_invalid: bool = False,
                 limit: int | None = None) -> tuple[list[dict], SkipCounter]:
    """PPO / evaluation prompts (image, question, category): the user turns of preference pairs, or of an SFT file
    (any file whose rows have a `response` field and no pair fields)."""
    path = Path(source)
    if path.is_file() and path.suffix in (".jsonl", ".json", ".parquet"):
        first = _read_records(path)[:1]
        if first and isinstance(first[0], dict) and "response" in first[0]:
            rows, skips = load_sft(source, skip_invalid, limit)
            return [{k: r[k] for k in ("image", "question", "category")} for r in rows], skips
    pairs, skips = load_pairs(source, split, categories, skip_invalid, limit)
    return [{k: p[k] for k in ("image", "question", "category")} for p in pairs], skips


# ----------------------------------------------------------------------------------------------------------
# 6. Losses shared by stages
# ----------------------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is true (padding never counts). dim=None: over all masked elements."""
    values = values.masked_fill(~mask.bool(), 0)  # not values * mask: a NaN in the padding must not leak in
    mask = mask.to(values.dtype)
    if dim is None:
        return values.sum() / mask.sum().clamp(min=1)
    return values.sum(dim) / mask.sum(dim).clamp(min=1)


def gather_log_probs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log pi(token_t) for t = 1..L-1, from the logits at position t-1. Shape (B, L-1)."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Supervised cross-entropy on response tokens only (labels are -100 elsewhere): the mean over all response
    tokens of the batch of -log pi(y_t | x, y_<t). It is also PPO-Lagrangian's PTX term (REFERENCE section 3.8)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------------------------------------
# 7. Training plumbing shared by the stages
# ----------------------------------------------------------------------------------------------------------


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start part-way through an epoch (`skip` samples), for exact resume without
    re-encoding the skipped batches. The order depends only on (seed, epoch)."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return super().__len__() - self.skip


def make_loader(items: list, batch_size: int, collate_fn, shuffle: bool, seed: int, rank: int = 0,
                world_size: int = 1, drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over an in-memory list; under torchrun each rank reads its own shard. Call
    `loader.sampler.set_epoch(epoch)` every epoch; set `loader.sampler.skip` to resume inside an epoch. Its own
    generator keeps it from consuming the global RNG (which must replay exactly on resume)."""
    from torch.utils.data import DataLoader

    sampler = ResumableSampler(items, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                               drop_last=drop_last)
    return DataLoader(items, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed))


def make_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                   scheduler: str, warmup_ratio: float, total_steps: int):
    """AdamW over the trainable parameters + a transformers learning-rate schedule (constant_with_warmup, cosine,
    linear, constant) with warmup_ratio * total_steps warmup steps."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    warmup = math.ceil(warmup_ratio * total_steps)
    return optimizer, get_scheduler(scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def autocast(device: torch.device):
    """bf16 autocast on GPU (the paper's setting); a no-op on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def quiet_transformers() -> None:
    """No per-load progress bars or warnings from transformers (our own tqdm bars say what happens)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


@torch.no_grad()
def generate(model, processor, family: str, prompt_batch: dict, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, do_sample: bool = True) -> dict:
    """Sample responses for a left-padded prompt batch (steps 1 of the rollout recipe).

    Image/video placeholders and the pad token are never sampled; everything after the first EOS is padding.
    Returns the full batch (prompt + response) ready for any forward: input_ids, attention_mask, response_mask
    (real response tokens, EOS included), Qwen's mm_token_type_ids extended over the response with 0, the same
    image tensors, and `ended` (whether each response emitted EOS)."""
    tokenizer = get_tokenizer(processor)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    kwargs = forward_kwargs(prompt_batch, family)
    kwargs.pop("position_ids", None)  # generate derives positions from the attention mask
    sequences = model.generate(
        **kwargs, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None, top_k=0 if do_sample else None, suppress_tokens=never_sample_ids(processor),
        eos_token_id=eos, pad_token_id=pad, use_cache=True)
    prompt_len = prompt_batch["input_ids"].shape[1]
    response = sequences[:, prompt_len:]
    is_eos = response == eos
    # real response tokens: up to and including the first EOS
    after_first_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    response_mask = ~after_first_eos
    response = response.masked_fill(after_first_eos, pad)
    batch = {k: v for k, v in prompt_batch.items() if k in IMAGE_KEYS}
    batch["input_ids"] = torch.cat([prompt_batch["input_ids"], response], 1)
    batch["attention_mask"] = torch.cat([prompt_batch["attention_mask"], response_mask.long()], 1)
    batch["response_mask"] = torch.cat([torch.zeros_like(prompt_batch["input_ids"], dtype=torch.bool), response_mask], 1)
    if "mm_token_type_ids" in prompt_batch:
        batch["mm_token_type_ids"] = torch.cat([prompt_batch["mm_token_type_ids"], torch.zeros_like(response)], 1)
    batch["ended"] = is_eos.any(-1)
    return batch


def response_texts(processor, batch: dict) -> list[str]:
    """Decoded responses (EOS and padding removed)."""
    tokenizer = get_tokenizer(processor)
    texts = []
    for ids, mask in zip(batch["input_ids"], batch["response_mask"]):
        texts.append(tokenizer.decode(ids[mask], skip_special_tokens=True))
    return texts


# ----------------------------------------------------------------------------------------------------------
# 8. Checkpoints (atomic, exact resume) and the non-finite guard
# ----------------------------------------------------------------------------------------------------------
# A checkpoint is a folder <output_dir>/checkpoints/checkpoint-<step>: every trained model in Hugging Face format
# (loaded back through the same from_pretrained path), optimizer and scheduler states (optimizers.pt, read with
# weights_only=True), RNG states (rng.pt) and trainer_state.json (step, data position, lambda, cost window, ...).
# It is written into "<name>.tmp" and renamed when complete, so a crash mid-write leaves the previous one intact.

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"


def rng_state() -> dict:
    """Python, numpy and torch RNG states (CUDA too when present)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteError(RuntimeError):
    """Raised instead of writing a checkpoint that holds NaN or inf weights."""


def all_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters() if p.dtype.is_floating_point)


def save_model(model: nn.Module, path, processor=None) -> None:
    """A policy or a score model in Hugging Face format (safetensors), with its processor."""
    model = getattr(model, "module", model)  # DDP
    if isinstance(model, ScoreModel):
        model.save_pretrained(str(path), processor)
    else:
        model.save_pretrained(str(path), safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(str(path))


def save_checkpoint(output_dir, step: int, models: dict, optimizers: dict, trainer_state: dict, processor=None,
                    keep_last: int = 2) -> Path:
    """Write checkpoint-<step> atomically (rank 0 only) and keep the newest `keep_last` ones.
    models: name -> module; optimizers: name -> (optimizer, scheduler)."""
    import shutil

    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    for name, model in models.items():
        if not all_finite(getattr(model, "module", model)):
            raise NonFiniteError(f"refusing to checkpoint step {step}: {name} holds non-finite weights")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, model in models.items():
        save_model(model, tmp / name, processor)
    torch.save({name: {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
                for name, (opt, sched) in optimizers.items()}, tmp / "optimizers.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    write_json(tmp / "trainer_state.json", {"step": step, **trainer_state})
    pause = float(os.environ.get("SAFE_RLHF_V_PAUSE_IN_SAVE", "0"))  # test hook: a window to kill mid-write
    if pause and os.environ.get("SAFE_RLHF_V_PAUSE_AT_STEP", str(step)) == str(step):
        (tmp / "PAUSED").touch()
        import time
        time.sleep(pause)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if not p.name.endswith(".tmp"))[:-keep_last]:
        shutil.rmtree(old)
    return final


def find_checkpoint(resume_from: str, output_dir) -> Path | None:
    """--resume_from: '' = start fresh; 'auto' = the newest complete checkpoint in output_dir (or fresh if none);
    otherwise a checkpoint folder, which must exist."""
    if not resume_from:
        return None
    if resume_from == "auto":
        root = Path(output_dir) / CHECKPOINT_DIR
        done = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*")
                      if not p.name.endswith(".tmp") and (p / "trainer_state.json").is_file())
        return done[-1] if done else None
    path = Path(resume_from)
    if not (path / "trainer_state.json").is_file():
        raise SystemExit(f"--resume_from {resume_from}: not a complete checkpoint (no trainer_state.json)")
    return path


def load_checkpoint(path, optimizers: dict) -> dict:
    """Restore optimizer and scheduler states and the RNG states; return trainer_state. (Models are loaded by the
    caller from path/<name> through the usual from_pretrained.) Call it last, right before the loop resumes."""
    path = Path(path)
    states = torch.load(path / "optimizers.pt", weights_only=True)
    for name, (opt, sched) in optimizers.items():
        opt.load_state_dict(states[name]["optimizer"])
        sched.load_state_dict(states[name]["scheduler"])
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


class NonFiniteGuard:
    """Skips updates whose loss or gradient norm is NaN/inf: counts them (`nonfinite_steps`) and stops the run with
    a clear message after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int, total: int = 0):
        self.max_consecutive = max_consecutive
        self.total = total
        self.consecutive = 0

    def finite(self, *values, step: int) -> bool:
        if all(math.isfinite(float(v.detach()) if isinstance(v, torch.Tensor) else float(v)) for v in values):
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        print(f"step {step}: non-finite loss or gradient norm, update skipped "
              f"({self.consecutive} in a row, {self.total} in all)", file=sys.stderr)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise SystemExit(f"stopping: {self.consecutive} non-finite updates in a row (step {step}). The last "
                             "checkpoint holds finite weights; lower the learning rate or check the data.")
        return False


def injected_fault(step: int) -> float:
    """Test hook: NaN at the steps listed in SAFE_RLHF_V_INJECT_NAN (e.g. "3,4,5"), else 0.0 (added to a loss)."""
    steps = os.environ.get("SAFE_RLHF_V_INJECT_NAN", "")
    return float("nan") if steps and str(step) in steps.split(",") else 0.0
