"""The models of Safe RLHF-V: loading a policy of every supported family, the score model, and generation.

  1. policies and processors: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL or any text causal LM, from a hub id or a
     local directory (safetensors only, no remote code unless asked), optionally 8-bit / 4-bit, vision tower frozen;
     forward_kwargs, the one way every forward receives a batch
  2. the score model: the backbone + a linear head read at the last real token (reward model, cost model and both
     critics are all this one class), saved as a self-describing directory
  3. generation for rollouts and evaluation: placeholders and pad never sampled, response_mask, `ended`

Adding a model family means editing this file (and data/encoding.py if its chat template needs it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from utils import torch_dtype, write_json


# ---- 1. Policies and processors for every family -----------------------------------------------------------


VLM_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
FAMILIES = VLM_FAMILIES + ("text",)
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# Modules left unquantized by bitsandbytes: the vision tower and projector are small and precision-sensitive.
# transformers matches these from the start of the full module name (as regexes) or as suffixes, hence ".*".
SKIP_QUANTIZATION = [r".*vision_tower", r".*multi_modal_projector", r".*visual", "lm_head", "score_head"]
# The image tensors of a batch (LLaVA: pixel_values; LLaVA-NeXT: + image_sizes; Qwen: + image_grid_thw).
IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")


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
    for key in (*IMAGE_KEYS, "mm_token_type_ids"):
        if key in batch:
            kwargs[key] = batch[key]
    if family not in QWEN_FAMILIES:
        kwargs["position_ids"] = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return kwargs


# ---- 2. Score model: reward model, cost model, reward critic, cost critic ----------------------------------


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
        """(scores per token (B, L), end scores at the last non-pad token (B,)), both float32: the head runs in fp32
        outside any autocast (a bf16 head would give rewards a resolution of 0.03 at |r| = 5, and spurious ties)."""
        hidden = self.backbone(**forward_kwargs(batch, self.family), use_cache=False).last_hidden_state
        with torch.autocast(hidden.device.type, enabled=False):
            scores = self.score_head(hidden.float()).squeeze(-1)
        end_index = last_token_index(batch["attention_mask"])
        end_scores = scores.gather(1, end_index.unsqueeze(1)).squeeze(1)
        return scores, end_scores


# ---- 3. Generation (rollouts and evaluation) ---------------------------------------------------------------


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
