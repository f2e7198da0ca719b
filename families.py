"""The supported model families and what differs between them: the one definition of each fact (modeling, lora,
data and the memory plan read it from here). Imports no project module.

A family is a transformers `model_type` of a vision-language model, or "text" for every causal LM without vision.
"""

from __future__ import annotations

import re

VLM_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
FAMILIES = VLM_FAMILIES + ("text",)
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")  # images as patches with a grid (image_grid_thw), no fixed image size

# The image tensors of a batch (LLaVA: pixel_values; LLaVA-NeXT and -OneVision: + image_sizes; Qwen: + image_grid_thw).
IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")

# Module names: the vision encoder (frozen by default, never LoRA-adapted) and the projector (trained in full).
# Qwen's projector, the patch merger, lives inside `visual`.
VISION_TOWERS = {"llava": "vision_tower", "llava_next": "vision_tower", "llava_onevision": "vision_tower",
                 "qwen2_vl": "visual", "qwen2_5_vl": "visual"}
PROJECTORS = {"llava": "multi_modal_projector", "llava_next": "multi_modal_projector",
              "llava_onevision": "multi_modal_projector", "qwen2_vl": "merger", "qwen2_5_vl": "merger"}

# Modules left unquantized by bitsandbytes: the vision tower and projector are small and precision-sensitive.
# transformers matches these from the start of the full module name (as regexes) or as suffixes, hence ".*".
SKIP_QUANTIZATION = [r".*vision_tower", r".*multi_modal_projector", r".*visual", "lm_head", "score_head"]

# LoRA adapts the language model's attention and MLP projections (the same names in Llama, Mistral, Qwen2).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_regex(target_modules=LORA_TARGETS) -> str:
    """The peft `target_modules` regex: the language model's `target_modules` linears only. A plain list would also
    match the CLIP vision tower of LLaVA (its attention has q_proj/k_proj/v_proj), which LoRA must never touch, and
    the projector, which trains in full."""
    names = "|".join(re.escape(t) for t in target_modules)
    return rf"^(?!.*(vision_tower|visual\.|multi_modal_projector)).*\.({names})$"


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
