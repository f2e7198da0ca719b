"""How much GPU memory a stage of Safe RLHF-V needs, planned before any weight is read (`--dry_run`).

  1. build_on_meta(config): the model built from its config on the meta device (no weights read), its parameters
     counted by part (vision tower, projector, language model: embeddings, layers, lm_head), its linear shapes
     (hence the LoRA parameters of any r and target list, and what bitsandbytes quantizes)
  2. the byte model: weights by storage (fp32 4 B, bf16 2 B, 8-bit, 4-bit), gradients, AdamW states, adapters,
     activations of a training forward/backward (with or without gradient checkpointing), the KV cache of
     generation, DDP / FSDP2
  3. plan_roles(...): one plan per role (SFT policy, reward / cost model; PPO's six roles on separate bases, on three
     bases, one per score model, or on ONE base) and per GPU, against a budget
  4. plan_from_args(args, stage): the same from the parsed options of train_sft / train_rm / train_cm /
     train_ppo_lag / train_dpo (options are read with getattr and defaults, so it works whether or not LoRA /
     FSDP options exist yet); format_plan(plan) -> the printed table

Every figure is an estimate of the bytes torch allocates; what each assumes is written next to it (and printed
under the table). Weights, gradients and optimizer states are exact counts (tests/test_memory_plan.py checks them
against the bytes torch really allocates, for full fine-tuning and for peft LoRA); activations follow per-token
coefficients measured with saved-tensor hooks on Llama-architecture layers (also re-measured by the tests).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import lru_cache
from pathlib import Path

from families import LORA_TARGETS, detect_family

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bundled copies of public configs (no weights), used when a hub id cannot be resolved offline.
BUNDLED_CONFIGS = Path(__file__).resolve().parent / "configs"

# ---- bytes per parameter ----------------------------------------------------------------------------------
# bitsandbytes, as modeling.quantization_config sets it up:
#   8-bit (LLM.int8, Linear8bitLt): int8 weight (1 B/param) + one fp32 scale per output row (SCB, 4 B/row).
#   4-bit (nf4, Linear4bit, no double quantization): 0.5 B/param (two per byte) + one fp32 absmax per block of 64
#   (4/64 = 0.0625 B/param), i.e. 0.5625 B/param, + a 16-entry fp32 code table (64 B) per linear.
# Only the nn.Linear weights of the language model's decoder layers are quantized; embeddings, norms, lm_head,
# the vision tower, the projector, biases and score heads stay in --dtype (families.SKIP_QUANTIZATION).
NF4_BLOCK = 64
ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq in fp32 (the 'step' scalars are negligible)

# ---- activations ------------------------------------------------------------------------------------------
# Bytes saved for backward per token per decoder layer = c_h * hidden + c_i * intermediate + c_kv * (kv heads x
# head dim) + 4 * heads (SDPA's fp32 logsumexp); measured with torch.autograd.graph.saved_tensors_hooks (unique
# storages, parameters excluded) on Llama layers, transformers 5 + SDPA (flash / memory-efficient kernels: no
# seq x seq term), and re-measured by tests/test_memory_plan.py. Mistral and Qwen2 decoder layers have the same
# structure. Keys: (LoRA?, compute bytes).
#   full fine-tuning, fp32 compute (CPU)                           32 h + 16 i + 8 kv
#   full fine-tuning, fp32 master weights under bf16 autocast      30 h +  8 i + 4 kv   (fp32 residual stream,
#                                                                  RMSNorm in fp32, bf16 copies for every linear)
#   LoRA on a frozen base, bf16 compute                            24 h +  8 i + 4 kv   (+ r x compute bytes per
#   LoRA on a frozen base, fp32 compute                            24 h + 16 i + 8 kv    adapted linear)
# (4 i = gate, up, act(gate), act(gate) * up; 2 kv = K and V kept by attention; a frozen linear keeps no input.)
ACT_COEFFS = {(False, 4): (32, 16, 8), (False, 2): (30, 8, 4), (True, 4): (24, 16, 8), (True, 2): (24, 8, 4)}
LOGSOFTMAX_CHUNK = 64  # modeling.token_log_probs: the fp32 log-softmax is taken 64 positions at a time
# In a training forward + backward, per logit of one chunk: its recomputed fp32 log-softmax and gradient, less
# what is freed on the way (measured with CpuPeakBytes: 6.2 B in fp32, 7.1 B under bf16).
LOGSOFTMAX_CHUNK_TRAIN_BYTES = 7
# A trained vision tower (--freeze_vision_tower false) keeps, per patch and layer, c_h * vision hidden + c_i *
# vision intermediate + 4 * vision heads (measured the same way on CLIP layers; Qwen2-VL's vision blocks have the
# same pre-norm attention + MLP structure). Key: compute bytes (fp32; fp32 masters under bf16 autocast). Outside
# its layers it keeps the fp32 pixel values (for the patch embedding's gradient) and VISION_EMBED_BYTES x hidden
# per patch (embeddings, pre-norm). A frozen tower keeps nothing: its weights and its input need no gradient.
VISION_ACT_COEFFS = {4: (24, 12), 2: (16, 6)}
VISION_EMBED_BYTES = 8
# SFT (and PTX) cross-entropy over every position, per logit at the peak of its backward (measured: 11.3 B under
# bf16, 11.6 B in fp32): the fp32 log-softmax cross-entropy keeps, its fp32 gradient and the gradient flowing
# into the logits. (The scripts drop the logits before the backward: holding them costs compute bytes more, 14.1
# B per logit measured under bf16.)
SFT_HEAD_BYTES = 12
# The CUDA caching allocator rounds blocks up and cannot always reuse freed ones (fragmentation): reserved memory
# runs above the peak of allocated tensors. Not measurable on a CPU; planned as this share of the peak (PyTorch's
# expandable_segments setting narrows it) and to be checked by scripts/gpu_rehearsal.py, which prints
# max_memory_reserved next to max_memory_allocated.
ALLOCATOR_MARGIN = 0.05


# ==========================================================================================================
# 1. Parameter counts from a config, on the meta device
# ==========================================================================================================


@dataclasses.dataclass
class ModelCounts:
    """Parameter counts of one model (a policy: backbone + lm_head) by part, and its language-model geometry."""

    name: str
    family: str  # llava, llava_next, llava_onevision, qwen2_vl, qwen2_5_vl or text
    total: int  # unique parameters (a tied lm_head counted once, in embeddings)
    vision_tower: int
    projector: int  # multi_modal_projector (LLaVA), visual.merger (Qwen), + LLaVA-NeXT's image_newline
    embeddings: int
    layers: int  # the decoder layers
    lm_other: int  # the language model's final norm (and anything else outside its layers)
    lm_head: int  # 0 when tied to the embeddings
    other: int  # anything not recognised (0 for the supported families)
    tied_embeddings: bool
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    vision_hidden_size: int
    image_tokens: int  # image tokens of one image at the processor's usual size (see image_tokens_for)
    lm_linears: dict  # suffix (q_proj, ...) -> list of (in_features, out_features) over the decoder layers
    lm_linear_bias: int  # bias parameters of those linears (Qwen2's q/k/v)
    max_layer_params: int  # parameters of the largest decoder layer (FSDP2's unit)
    config_source: str = ""
    vision_layers: int = 0
    vision_intermediate_size: int = 0
    vision_heads: int = 0
    vision_patches: int = 0  # patches the vision tower encodes for one image (see vision_patches_for)
    vision_patch_values: int = 0  # pixel values per patch: 3 x patch^2 (x 2 frames for Qwen's temporal patches)

    @property
    def lm_linear_weights(self) -> int:
        """Parameters bitsandbytes quantizes: the weights of the decoder layers' nn.Linear modules."""
        return sum(i * o for shapes in self.lm_linears.values() for i, o in shapes)

    @property
    def lm_linear_rows(self) -> int:
        return sum(o for shapes in self.lm_linears.values() for _, o in shapes)

    @property
    def lm_linear_count(self) -> int:
        return sum(len(shapes) for shapes in self.lm_linears.values())

    @property
    def lm_linear_blocks(self) -> int:
        """nf4 blocks of 64 over the quantized weights (one fp32 absmax each)."""
        return sum(math.ceil(i * o / NF4_BLOCK) for shapes in self.lm_linears.values() for i, o in shapes)

    @property
    def score_backbone(self) -> int:
        """Parameters of the score model's backbone: the policy without its (untied) lm_head."""
        return self.total - self.lm_head

    def lora_params(self, r: int, target_modules=LORA_TARGETS) -> int:
        """LoRA parameters of rank r on the targeted linears of the language model: r * (in + out) each (A is r x in,
        B is out x r; no bias). Never the vision tower, the projector or the lm_head."""
        if r <= 0:
            return 0
        targets = _target_list(target_modules)
        unknown = [t for t in targets if t not in self.lm_linears]
        if unknown:
            raise ValueError(f"LoRA targets {unknown} are not linear layers of the language model of {self.name} "
                             f"(its linears: {', '.join(sorted(self.lm_linears))})")
        return sum(r * (i + o) for t in targets for i, o in self.lm_linears[t])

    def summary(self) -> str:
        b = lambda n: f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
        return (f"{b(self.total)} parameters: vision tower {b(self.vision_tower)}, projector {b(self.projector)}, "
                f"embeddings {b(self.embeddings)}, decoder layers {b(self.layers)} ({self.num_layers} x "
                f"{b(self.max_layer_params)}), lm_head {b(self.lm_head) if self.lm_head else 'tied'}")


def _target_list(target_modules) -> list[str]:
    if isinstance(target_modules, str):
        target_modules = target_modules.split(",")
    return [t.strip() for t in target_modules if t and t.strip()]


def _load_config(config_or_path, trust_remote_code: bool = False):
    """A transformers config from a config object, a dict, a folder / config.json, a score-model or LoRA-adapter
    folder (adapter_config.json: its base model), or a hub id (the bundled copy under infra/configs when the
    hub cannot be reached). Returns (config, where it came from)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config_or_path, PretrainedConfig):
        return config_or_path, getattr(config_or_path, "_name_or_path", "") or config_or_path.model_type
    if isinstance(config_or_path, dict):
        data = dict(config_or_path)
        return AutoConfig.for_model(data.pop("model_type"), **data), "dict"
    path = Path(str(config_or_path))
    if path.name == "config.json" and path.is_file():
        path = path.parent
    if path.is_dir() and not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base:
            config, source = _load_config(base, trust_remote_code)
            return config, f"{source} (base of the adapter {path})"
    try:
        return AutoConfig.from_pretrained(str(path if path.is_dir() else config_or_path),
                                          trust_remote_code=trust_remote_code), str(config_or_path)
    except (OSError, ValueError) as error:
        fixture = BUNDLED_CONFIGS / Path(str(config_or_path)).name
        if (fixture / "config.json").is_file():
            return AutoConfig.from_pretrained(str(fixture)), f"{config_or_path} (bundled config {fixture})"
        raise SystemExit(f"memory plan: cannot read the config of {config_or_path!r} ({error})") from None


def image_tokens_for(config, family: str, max_pixels: int = 0) -> int:
    """Image tokens one image puts into the sequence:
    LLaVA-1.5: (336 / 14)^2 = 576 (the CLS feature is dropped);
    LLaVA-NeXT (anyres): the 576 of the base image + the largest grid of image_grid_pinpoints at 24 x 24 tokens per
      336-px tile + one newline token per row (unpadding only removes tokens), e.g. 576 + 2304 + 48 = 2928;
    Qwen2(.5)-VL: max_pixels / (28 x 28) (14-px patches merged 2 x 2); without --max_pixels we assume 1024 tokens (a
      1024 x 784-px image); the processor's own default allows up to 16384."""
    if family == "text":
        return 0
    vision = config.vision_config
    if family in ("llava", "llava_next", "llava_onevision"):  # (OneVision's anyres_max_9 may pool a grid of > 9 tiles)
        side = vision.image_size // vision.patch_size
        base = side * side
        if family == "llava":
            return base
        best = 0
        for height, width in getattr(config, "image_grid_pinpoints", None) or []:
            rows, cols = height // vision.patch_size, width // vision.patch_size
            best = max(best, rows * cols + rows)
        return base + best
    merge = getattr(vision, "spatial_merge_size", 2) * getattr(vision, "patch_size", 14)
    return max(1, max_pixels // (merge * merge)) if max_pixels else 1024


def vision_patches_for(config, family: str, image_tokens: int) -> int:
    """Patches the vision tower encodes for one image: LLaVA (side^2 + CLS) per 336-px tile, LLaVA-NeXT on the base
    image and every tile of its largest grid (LLaVA-OneVision alike, SigLIP without a CLS patch); Qwen2(.5)-VL 4
    patches per image token (merged 2 x 2)."""
    if family == "text":
        return 0
    vision = config.vision_config
    if family in ("llava", "llava_next", "llava_onevision"):
        side = vision.image_size // vision.patch_size
        tiles = 1
        if family != "llava":
            tiles += max((h // vision.image_size) * (w // vision.image_size)
                         for h, w in getattr(config, "image_grid_pinpoints", None) or [[0, 0]])
        return tiles * (side * side + (family != "llava_onevision"))  # CLIP adds a CLS patch, SigLIP does not
    return image_tokens * getattr(vision, "spatial_merge_size", 2) ** 2


@lru_cache(maxsize=16)
def _counts_cached(key: str, trust_remote_code: bool) -> ModelCounts:
    return _build_on_meta(key, trust_remote_code)


def build_on_meta(config_or_path, trust_remote_code: bool = False) -> ModelCounts:
    """Build the model (a policy: AutoModelForImageTextToText, or AutoModelForCausalLM for a text LM) from its config
    on the meta device (shapes only: no weights are read or allocated) and count its parameters by part."""
    if isinstance(config_or_path, (str, Path)):
        return _counts_cached(str(config_or_path), trust_remote_code)
    return _build_on_meta(config_or_path, trust_remote_code)


def _build_on_meta(config_or_path, trust_remote_code: bool) -> ModelCounts:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config, source = _load_config(config_or_path, trust_remote_code)
    family = detect_family(config)
    model_cls = AutoModelForCausalLM if family == "text" else AutoModelForImageTextToText
    with torch.device("meta"):
        model = model_cls.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config()

    parts = dict(vision_tower=0, projector=0, embeddings=0, layers=0, lm_other=0, lm_head=0, other=0)
    per_layer: dict[int, int] = {}
    for name, param in model.named_parameters():  # tied weights are listed once
        n = param.numel()
        if ".merger." in name or "multi_modal_projector" in name or "image_newline" in name:
            parts["projector"] += n
        elif "vision_tower" in name or ".visual." in name or name.startswith("visual."):
            parts["vision_tower"] += n
        elif name.startswith("lm_head."):
            parts["lm_head"] += n
        elif "embed_tokens" in name:
            parts["embeddings"] += n
        elif ".layers." in name:
            parts["layers"] += n
            index = int(name.split(".layers.")[1].split(".")[0])
            per_layer[index] = per_layer.get(index, 0) + n
        elif "language_model" in name or name.startswith("model."):
            parts["lm_other"] += n
        else:
            parts["other"] += n
    linears: dict[str, list] = {}
    bias = 0
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.Linear) and ".layers." in name and "vision_tower" not in name
                and "visual" not in name and "multi_modal_projector" not in name):
            linears.setdefault(name.rsplit(".", 1)[-1], []).append((module.in_features, module.out_features))
            bias += module.out_features if module.bias is not None else 0
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    vision = getattr(config, "vision_config", None)
    vision_hidden = (getattr(vision, "embed_dim", None) or getattr(vision, "hidden_size", 0)) if vision else 0
    vision_geometry = {}
    if vision is not None:
        vision_geometry = dict(
            vision_layers=getattr(vision, "depth", None) or vision.num_hidden_layers,
            vision_intermediate_size=(getattr(vision, "intermediate_size", None)
                                      or int(vision_hidden * getattr(vision, "mlp_ratio", 4))),
            vision_heads=getattr(vision, "num_heads", None) or vision.num_attention_heads,
            vision_patches=vision_patches_for(config, family, image_tokens_for(config, family)),
            vision_patch_values=3 * vision.patch_size ** 2 * getattr(vision, "temporal_patch_size", 1))
    total = sum(p.numel() for p in model.parameters())
    tied = parts["lm_head"] == 0
    return ModelCounts(
        name=str(config_or_path) if isinstance(config_or_path, (str, Path)) else source, family=family, total=total,
        tied_embeddings=tied, hidden_size=text.hidden_size, num_layers=text.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate_size=text.intermediate_size, vocab_size=text.vocab_size, vision_hidden_size=vision_hidden,
        image_tokens=image_tokens_for(config, family), lm_linears=linears, lm_linear_bias=bias,
        max_layer_params=max(per_layer.values()) if per_layer else 0, config_source=source, **vision_geometry,
        **parts)


# ==========================================================================================================
# 2. The byte model
# ==========================================================================================================


def base_bytes(counts: ModelCounts, kind: str, dtype_bytes: int, quantization: str = "none") -> float:
    """Bytes of a frozen base (kind policy: with its lm_head; score: the backbone) in --dtype, or with the decoder
    layers' linear weights quantized (8-bit: 1 B/param + an fp32 scale per output row; 4-bit nf4: 0.5 B/param + an
    fp32 absmax per block of 64 + a 16-entry fp32 code table per linear) and the rest in --dtype."""
    params = counts.total if kind == "policy" else counts.score_backbone
    if quantization in ("", "none", None):
        return params * dtype_bytes
    q = counts.lm_linear_weights
    rest = (params - q) * dtype_bytes
    if quantization == "8bit":
        return rest + q + 4 * counts.lm_linear_rows
    if quantization == "4bit":
        return rest + q / 2 + 4 * counts.lm_linear_blocks + 64 * counts.lm_linear_count
    raise ValueError(f"quantization must be none, 8bit or 4bit, got {quantization!r}")


def kv_cache_bytes(counts: ModelCounts, batch: int, tokens: int, kv_bytes: int) -> int:
    """2 (K and V) x layers x kv heads x head dim x tokens x batch x bytes."""
    return 2 * counts.num_layers * counts.num_kv_heads * counts.head_dim * tokens * batch * kv_bytes


def layer_activation_bytes_per_token(counts: ModelCounts, lora: bool, compute_bytes: int, lora_r: int = 0,
                                     lora_targets: int = 0) -> float:
    """Bytes saved for backward per token by one decoder layer (ACT_COEFFS)."""
    c_h, c_i, c_kv = ACT_COEFFS[(lora, compute_bytes)]
    kv = counts.num_kv_heads * counts.head_dim
    extra = lora_r * lora_targets * compute_bytes if lora else 0  # x @ A (r wide) kept for B's backward
    return c_h * counts.hidden_size + c_i * counts.intermediate_size + c_kv * kv + 4 * counts.num_heads + extra


def training_activation_bytes(counts: ModelCounts, *, kind: str, batch: int, seq: int, response: int,
                              image_tokens: int, lora: bool, compute_bytes: int, residual_bytes: int,
                              checkpointing: bool, lora_r: int = 0, lora_targets: int = 0, head: str = "ppo",
                              autocast_copy_params: int = 0, vision_trained: bool = False) -> dict:
    """Activation bytes of one training forward + backward (the peak while backpropagating), by term:
      layers: without checkpointing every layer keeps `layer_activation_bytes_per_token` per token; with
        checkpointing (non-reentrant, per decoder layer) each layer keeps only its input (residual stream: fp32 for
        full fine-tuning with fp32 masters, --dtype over a frozen base), plus one layer's full set, recomputed
        during the backward;
      head: the policy in PPO computes logits for the response positions only (logits_to_keep): kept in the compute
        dtype and their gradient (2 x batch x response x vocab x bytes), plus one chunk of the fp32 log-softmax,
        recomputed in the backward (batch x 64 x vocab x LOGSOFTMAX_CHUNK_TRAIN_BYTES; measured); SFT computes
        logits for every position and its cross-entropy peaks at batch x seq x vocab x SFT_HEAD_BYTES (measured);
      vision: a trained vision tower keeps VISION_ACT_COEFFS per patch and layer for one image per sequence (a frozen
        one keeps nothing);
      projector: its input (vision features) and its two hidden activations for every image token;
      autocast copies: under bf16 autocast, torch caches a bf16 copy of every fp32 weight that requires grad for the
        whole autocast region (2 B per trainable linear parameter; its backward keeps them): big for full
        fine-tuning, tiny for adapters."""
    tokens = batch * seq
    per_layer = layer_activation_bytes_per_token(counts, lora, compute_bytes, lora_r, lora_targets)
    if checkpointing:
        layers = counts.num_layers * residual_bytes * counts.hidden_size * tokens + per_layer * tokens
    else:
        layers = counts.num_layers * per_layer * tokens
    vocab = counts.vocab_size
    if kind == "score":
        head_bytes = tokens * counts.hidden_size * 4
    elif head == "sft":
        head_bytes = tokens * vocab * SFT_HEAD_BYTES
    else:
        head_bytes = (2 * batch * response * vocab * compute_bytes
                      + batch * min(LOGSOFTMAX_CHUNK, response) * vocab * LOGSOFTMAX_CHUNK_TRAIN_BYTES)
    projector = batch * image_tokens * (counts.vision_hidden_size + 2 * counts.hidden_size) * compute_bytes
    norms = tokens * counts.hidden_size * (residual_bytes + 4 + compute_bytes)  # embeddings output, final norm
    vision = 0
    if vision_trained and image_tokens:
        c_h, c_i = VISION_ACT_COEFFS[compute_bytes]
        per_patch = c_h * counts.vision_hidden_size + c_i * counts.vision_intermediate_size + 4 * counts.vision_heads
        vision = batch * (counts.vision_patches * (counts.vision_layers * per_patch
                                                   + VISION_EMBED_BYTES * counts.vision_hidden_size)
                          + counts.vision_patches * counts.vision_patch_values * 4)
    return dict(layers=layers, head=head_bytes, projector=projector, vision=vision, other=norms,
                autocast_copies=2 * autocast_copy_params if compute_bytes == 2 else 0)


def inference_transient_bytes(counts: ModelCounts, *, kind: str, batch: int, seq: int, response: int,
                              compute_bytes: int, residual_bytes: int) -> float:
    """Peak of a forward without gradients (reference log-probs, reward / cost scores, critic values in the rollout):
    one decoder layer's live tensors (gate, up, act of width intermediate; q, k, v, attention output; two copies of
    the residual stream) + the head (the reference's response logits and one fp32 log-softmax chunk, or a score
    model's fp32 hidden states)."""
    tokens = batch * seq
    kv = counts.num_kv_heads * counts.head_dim
    layer = tokens * ((3 * counts.intermediate_size + 2 * counts.hidden_size + 2 * kv) * compute_bytes
                      + 2 * counts.hidden_size * residual_bytes)
    if kind == "score":
        head = tokens * counts.hidden_size * 4
    else:
        vocab = counts.vocab_size
        head = batch * response * vocab * compute_bytes + 2 * batch * LOGSOFTMAX_CHUNK * vocab * 4
    return layer + head


# ==========================================================================================================
# 3. Plans
# ==========================================================================================================


@dataclasses.dataclass
class Setup:
    """What a plan depends on. Sizes are per GPU (per rank)."""

    stage: str = "ppo"  # sft, rm, cm or ppo
    algo: str = "ppo_lag"  # ppo: no cost critic (a cost model only if cost_model)
    dtype: str = "bfloat16"  # compute dtype (autocast) and storage of frozen bases
    quantization: str = "none"  # frozen bases (full fine-tuning) or every base (LoRA)
    lora_r: int = 0  # 0 = full fine-tuning of every trained role
    lora_target_modules: tuple = LORA_TARGETS
    sharing: str = "auto"  # PPO: separate, per_score_model (three bases) or one_base; auto: see resolve_sharing
    world_size: int = 1
    fsdp: bool = False  # FSDP2 (else DDP when world_size > 1)
    gradient_checkpointing: bool = False
    freeze_vision_tower: bool = True
    train_batch: int = 2  # sequences per training forward (SFT batch, 2 x pairs for RM/CM, PPO train batch)
    rollout_batch: int = 2  # PPO: prompts per generation
    scoring_batch: int = 2  # PPO: rows per scoring forward (rollout_micro_batch_size, or the prompt batch)
    image_tokens: int = 576
    prompt_tokens: int = 100  # text tokens of the prompt (the image tokens come on top)
    response_tokens: int = 512
    max_length: int = 0  # 0 = no cap on image + prompt + response
    ptx_batch: int = 0  # PPO with --ptx_data: SFT sequences per PTX batch (backpropagated before the actor's loss)
    gpu_memory_gb: float | None = None  # GiB per GPU (None: the visible CUDA device, else no budget)
    runtime_overhead_gb: float = 1.0  # CUDA context, cuBLAS/NCCL workspaces (the allocator's margin: ALLOCATOR_MARGIN)
    ddp_bucket_view: bool = False  # DDP(gradient_as_bucket_view=True) shares grads with its buckets

    @property
    def seq(self) -> int:
        total = self.image_tokens + self.prompt_tokens + self.response_tokens
        return min(total, self.max_length) if self.max_length else total


@dataclasses.dataclass
class RolePlan:
    name: str
    base: str  # the base it lives on ("actor base", "reward base", ... or its own)
    trained: bool
    lora: bool
    weights: float = 0  # the base (counted on the first role that uses it) or the full model
    adapters: float = 0  # LoRA A/B + the role's own projector copy + score head (fp32)
    grads: float = 0
    optimizer: float = 0
    activations: float = 0  # trained: training forward/backward; frozen: the peak of its no-grad forward
    kv_cache: float = 0
    trainable_params: int = 0
    detail: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)

    @property
    def static(self) -> float:
        return self.weights + self.adapters + self.optimizer


@dataclasses.dataclass
class MemoryPlan:
    setup: Setup
    counts: ModelCounts
    roles: list
    sharing: str
    parallel: str  # single, ddp or fsdp2
    phases: dict  # phase -> bytes per GPU (before the runtime overhead)
    peak_phase: str
    peak: float  # bytes per GPU, allocator margin and runtime overhead included
    budget: float | None
    assumptions: list
    model_name: str = ""

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak <= self.budget

    @property
    def headroom(self) -> float | None:
        return None if self.budget is None else self.budget - self.peak

    def to_dict(self) -> dict:
        return {"model": self.model_name, "stage": self.setup.stage, "sharing": self.sharing,
                "parallel": self.parallel, "world_size": self.setup.world_size,
                "roles": [{k: v for k, v in dataclasses.asdict(r).items()} for r in self.roles],
                "phases": self.phases, "peak_phase": self.peak_phase, "peak_bytes": self.peak,
                "budget_bytes": self.budget, "fits": self.fits, "assumptions": self.assumptions}


def resolve_sharing(setup: Setup, reward_is_adapter_on_actor: bool = False) -> str:
    """separate without LoRA; with LoRA: one_base when the reward and cost models are LoRA adapters on the actor's
    base, else per_score_model (three bases: the actor's, holding the reference, and one per score model, holding
    its critic)."""
    if setup.stage != "ppo":
        return "separate"
    if setup.sharing != "auto":
        return setup.sharing
    if setup.lora_r <= 0:
        return "separate"
    return "one_base" if reward_is_adapter_on_actor else "per_score_model"


def default_gpu_memory() -> float | None:
    """Total memory of the visible CUDA device, in bytes (None without CUDA)."""
    try:
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    except Exception:  # noqa: BLE001 - a broken CUDA setup is no reason to fail a dry run
        return None
    return None


def plan_roles(setup: Setup, counts: ModelCounts, reward_counts: ModelCounts | None = None,
               cost_counts: ModelCounts | None = None, reward_is_adapter_on_actor: bool = False,
               model_name: str = "") -> MemoryPlan:
    """The memory plan of a stage for the model `counts` (PPO: the actor; reward_counts / cost_counts: the score
    models' architectures, default the actor's)."""
    if setup.stage not in ("sft", "rm", "cm", "ppo", "dpo"):
        raise ValueError(f"stage must be sft, rm, cm, ppo or dpo, got {setup.stage!r}")
    if setup.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {setup.dtype!r}")
    p = DTYPE_BYTES[setup.dtype]
    lora = setup.lora_r > 0
    quant = setup.quantization if setup.quantization not in ("", None) else "none"
    targets = _target_list(setup.lora_target_modules)
    world = max(1, setup.world_size)
    parallel = "fsdp2" if setup.fsdp else ("ddp" if world > 1 else "single")
    shard = world if setup.fsdp else 1
    sharing = resolve_sharing(setup, reward_is_adapter_on_actor)
    assumptions: list[str] = []
    if sharing != "separate" and not lora:
        assumptions.append(f"sharing {sharing} needs LoRA (--lora_r > 0); planned as separate bases")
        sharing = "separate"
    reward_counts, cost_counts = reward_counts or counts, cost_counts or counts

    def vision_trainable(c):
        return 0 if setup.freeze_vision_tower else c.vision_tower

    def trainable_full(c, kind):
        n = c.total - (c.vision_tower if setup.freeze_vision_tower else 0)
        return n - c.lm_head + c.hidden_size + 1 if kind == "score" else n

    def autocast_copy_params(role, c, kind):
        """Trainable fp32 parameters autocast casts to bf16 (and caches): those of linear layers; an embedding is
        cast only where it is tied to the lm_head."""
        if role.lora:
            return role.trainable_params
        embeddings = c.embeddings if (kind == "score" or not c.tied_embeddings) else 0
        return max(0, role.trainable_params - embeddings)

    def adapter_params(c, kind):
        """A LoRA role's own parameters: adapters + its projector copy (trained) + a score head."""
        head = c.hidden_size + 1 if kind == "score" else 0
        return c.lora_params(setup.lora_r, targets) + c.projector + head + vision_trainable(c)

    roles: list[RolePlan] = []
    bases_seen: set[str] = set()

    def add_role(name, c, kind, trained, base_name, frozen_quant=quant, full_weights=False):
        """full_weights: a role without LoRA that owns its weights (trained: fp32 masters; frozen: --dtype/quant)."""
        role = RolePlan(name=name, base=base_name, trained=trained, lora=lora and not full_weights)
        if full_weights:
            if trained:
                params = c.total if kind == "policy" else c.score_backbone + c.hidden_size + 1
                role.weights = params * 4  # fp32 master weights (vision tower included)
                role.trainable_params = trainable_full(c, kind)
            else:
                head = (c.hidden_size + 1) * 4 if kind == "score" else 0  # score heads stay fp32
                role.weights = base_bytes(c, kind, p, frozen_quant) + head
                if frozen_quant != "none":
                    role.notes.append(f"{frozen_quant}: decoder-layer linears quantized, the rest in {setup.dtype}")
        else:  # LoRA: the base (once) + the role's own adapter
            if base_name not in bases_seen:
                bases_seen.add(base_name)
                role.weights = base_bytes(c, "policy" if kind == "policy" or sharing == "one_base" else kind, p, quant)
            else:
                role.notes.append(f"on the {base_name} (counted once)")
            if name == "reference":  # the actor's base with the adapter disabled: nothing of its own
                role.lora = False
            elif not trained and kind == "score" and sharing != "one_base":
                role.adapters = (c.hidden_size + 1) * 4  # the score model itself is the base; its head
                role.lora = False
            else:
                own = adapter_params(c, kind)
                if trained:  # fp32 masters: LoRA matrices, the projector copy, the head
                    role.adapters = own * 4
                    role.trainable_params = own
                else:  # a frozen adapter: LoRA matrices in fp32 (peft upcasts them), its projector copy in --dtype
                    role.adapters = own * 4 - (c.projector + vision_trainable(c)) * (4 - p)
        if trained:
            role.grads = role.trainable_params * 4
            if parallel == "ddp" and not setup.ddp_bucket_view:
                role.grads *= 2
                role.notes.append("DDP gradient buckets (a second fp32 copy of the gradients)")
            role.optimizer = role.trainable_params * ADAMW_STATE_BYTES
        if shard > 1:
            role.weights, role.grads, role.optimizer, role.adapters = (
                role.weights / shard, role.grads / shard, role.optimizer / shard, role.adapters / shard)
        roles.append(role)
        return role

    seq = setup.seq
    response = min(setup.response_tokens, seq)
    residual_full = 4  # fp32 masters
    residual_lora = p

    def train_act(role, c, kind, head):
        is_lora = role.lora
        copies = autocast_copy_params(role, c, kind)
        acts = training_activation_bytes(
            c, kind=kind, batch=setup.train_batch, seq=seq, response=response, image_tokens=setup.image_tokens,
            lora=is_lora, compute_bytes=p, residual_bytes=residual_lora if is_lora else residual_full,
            checkpointing=setup.gradient_checkpointing, lora_r=setup.lora_r, lora_targets=len(targets), head=head,
            autocast_copy_params=max(0, copies), vision_trained=not setup.freeze_vision_tower)
        role.activations = sum(acts.values())
        if head == "ppo" and setup.ptx_batch:  # its own forward + backward, before the actor's: the larger counts
            ptx = training_activation_bytes(
                c, kind=kind, batch=setup.ptx_batch, seq=seq, response=seq, image_tokens=setup.image_tokens,
                lora=is_lora, compute_bytes=p, residual_bytes=residual_lora if is_lora else residual_full,
                checkpointing=setup.gradient_checkpointing, lora_r=setup.lora_r, lora_targets=len(targets),
                head="sft", autocast_copy_params=max(0, copies), vision_trained=not setup.freeze_vision_tower)
            role.detail["ptx_activations"] = ptx
            role.activations = max(role.activations, sum(ptx.values()))
        role.detail["activations"] = acts

    def infer_act(role, c, kind):
        role.activations = inference_transient_bytes(
            c, kind=kind, batch=setup.scoring_batch, seq=seq, response=response, compute_bytes=p,
            residual_bytes=p if not role.trained or role.lora else 4)

    if setup.stage == "dpo":  # the policy on 2B sequences (logits from the first response position on, as PPO's
        # actor), and without LoRA a frozen reference copy in --dtype (LoRA: the adapter disabled, nothing more)
        role = add_role("policy", counts, "policy", True, "base", full_weights=not lora)
        train_act(role, counts, "policy", "ppo")
        if not lora:
            ref = add_role("reference", counts, "policy", False, "reference base", full_weights=True)
            infer_act(ref, counts, "policy")
    elif setup.stage in ("sft", "rm", "cm"):
        kind = "policy" if setup.stage == "sft" else "score"
        name = {"sft": "policy", "rm": "reward model", "cm": "cost model"}[setup.stage]
        role = add_role(name, counts, kind, True, "base", full_weights=not lora)
        train_act(role, counts, kind, "sft" if kind == "policy" else "score")
        if quant != "none" and not lora:
            assumptions.append(f"--quantization {quant} without LoRA is refused by train_{setup.stage}.py (a quantized "
                               "model cannot be fully fine-tuned); planned as if unquantized")
    else:
        with_cost_critic = setup.algo == "ppo_lag"
        if sharing == "separate":
            actor = add_role("actor", counts, "policy", True, "actor base", full_weights=not lora)
            ref = add_role("reference", counts, "policy", False, "reference base", full_weights=True)
            rm = add_role("reward model", reward_counts, "score", False, "reward base", full_weights=True)
            rc = add_role("reward critic", reward_counts, "score", True, "reward critic base", full_weights=not lora)
            cm = add_role("cost model", cost_counts, "score", False, "cost base", full_weights=True)
            cc = (add_role("cost critic", cost_counts, "score", True, "cost critic base", full_weights=not lora)
                  if with_cost_critic else None)
        elif sharing == "per_score_model":
            actor = add_role("actor", counts, "policy", True, "actor base")
            ref = add_role("reference", counts, "policy", False, "actor base")
            rm = add_role("reward model", reward_counts, "score", False, "reward base")
            rc = add_role("reward critic", reward_counts, "score", True, "reward base")
            cm = add_role("cost model", cost_counts, "score", False, "cost base")
            cc = add_role("cost critic", cost_counts, "score", True, "cost base") if with_cost_critic else None
        elif sharing == "one_base":
            actor = add_role("actor", counts, "policy", True, "one base")
            ref = add_role("reference", counts, "policy", False, "one base")
            rm = add_role("reward model", counts, "score", False, "one base")
            rc = add_role("reward critic", counts, "score", True, "one base")
            cm = add_role("cost model", counts, "score", False, "one base")
            cc = add_role("cost critic", counts, "score", True, "one base") if with_cost_critic else None
        else:
            raise ValueError(f"sharing must be auto, separate, per_score_model or one_base, got {sharing!r}")
        # rollout: generation (KV cache), then scoring forwards; update: the three trained roles, one after another
        prompt = setup.image_tokens + setup.prompt_tokens
        actor.kv_cache = kv_cache_bytes(counts, setup.rollout_batch, prompt + response, p)
        train_act(actor, counts, "policy", "ppo")
        train_act(rc, reward_counts, "score", "score")
        if cc is not None:
            train_act(cc, cost_counts, "score", "score")
        for role, c, kind in ((ref, counts, "policy"), (rm, reward_counts, "score"), (cm, cost_counts, "score")):
            infer_act(role, c, kind)
        if quant != "none" and not lora:
            assumptions.append(f"{quant} applies to the frozen roles only (reference, reward model, cost model); the "
                               "trained roles hold fp32 masters")

    # ---- phases (bytes per GPU)
    static = sum(r.static for r in roles)
    grads = sum(r.grads for r in roles)
    trained = [r for r in roles if r.trained]
    working = 0.0
    if setup.fsdp:
        # FSDP2 (MixedPrecisionPolicy param_dtype = --dtype): the root unit (embeddings, lm_head, vision tower,
        # projector, norms) stays gathered through forward + backward; two decoder layers gathered at a time
        # (current + prefetch); one layer's unsharded fp32 gradient before its reduce-scatter.
        root = counts.total - counts.layers
        working = (root + 2 * counts.max_layer_params) * p + counts.max_layer_params * 4
        frozen = " (frozen roles too)" if setup.stage == "ppo" else ""
        assumptions.append(f"FSDP2 over {world} GPUs shards every role's weights, gradients and AdamW states{frozen}, "
                           f"with MixedPrecisionPolicy(param_dtype={setup.dtype}, reduce_dtype=float32) "
                           "instead of autocast (autocast would cache a bf16 copy of every gathered fp32 weight); "
                           f"working set {working / GiB:.2f} GiB: the root unit + 2 gathered decoder layers + one "
                           "layer's unsharded fp32 gradient; checkpoints are gathered one tensor at a time (rank "
                           "0's host holds at most one 2 GiB shard of them, infra.checkpoint.stream_weights)"
                           + (f"; generation gathers the whole actor in {setup.dtype} "
                              f"({counts.total * p / GiB:.2f} GiB: one all-gather, no collective per token)"
                              if setup.stage == "ppo" else ""))
        for r in trained:  # no autocast copies under FSDP2's mixed precision
            acts = r.detail.get("activations", {})
            r.activations -= acts.get("autocast_copies", 0)
            acts["autocast_copies"] = 0
    phases = {}
    if setup.stage == "ppo":
        actor = roles[0]
        gen_copies = 0 if (p == 4 or setup.fsdp) else autocast_copy_params(actor, counts, "policy") * 2
        prefill = inference_transient_bytes(counts, kind="policy", batch=setup.rollout_batch,
                                            seq=setup.image_tokens + setup.prompt_tokens, response=1,
                                            compute_bytes=p, residual_bytes=4 if not actor.lora else p)
        # FSDP2: generate() holds the whole actor gathered in --dtype (modeling.unsharded: no collective per token)
        gathered = counts.total * p if setup.fsdp else 0
        actor.detail["generation"] = dict(kv_cache=actor.kv_cache, autocast_copies=gen_copies, prefill=prefill,
                                          gathered_actor=gathered)
        phases["generation"] = static + actor.kv_cache + gen_copies + prefill + max(working, gathered)
        scoring = [r for r in roles if r.name != "actor"]
        scoring_peak = max(inference_transient_bytes(
            counts if r.name == "reference" else (reward_counts if "reward" in r.name else cost_counts),
            kind="policy" if r.name == "reference" else "score", batch=setup.scoring_batch, seq=seq,
            response=response, compute_bytes=p, residual_bytes=p if (r.lora or not r.trained) else 4)
            for r in scoring)
        phases["scoring"] = static + scoring_peak + working
    phases["training"] = static + grads + max(r.activations for r in trained) + working
    peak_phase = max(phases, key=phases.get)
    overhead = setup.runtime_overhead_gb * GiB
    peak = phases[peak_phase] * (1 + ALLOCATOR_MARGIN) + overhead
    budget = setup.gpu_memory_gb * GiB if setup.gpu_memory_gb else None

    assumptions += [
        f"compute {setup.dtype}; trained parameters fp32 with AdamW (2 fp32 states, 16 B per trained parameter with "
        "the gradient); frozen bases in " + (f"{setup.dtype}" if quant == "none" else f"{quant} (decoder linears) + "
                                             f"{setup.dtype}"),
        "quantized bytes: 8-bit 1 B/param + 4 B per output row; 4-bit nf4 0.5 B/param + 4 B per 64-block = "
        "0.5625 B/param (no double quantization); embeddings, norms, lm_head, vision tower, projector stay in "
        "--dtype",
        f"sequence {setup.image_tokens} image + {setup.prompt_tokens} prompt + {response} response = {seq} tokens"
        + (f" (capped by --max_length {setup.max_length})" if setup.max_length and seq < setup.image_tokens +
           setup.prompt_tokens + setup.response_tokens else "")
        + f"; training batch {setup.train_batch}" + (f", rollout batch {setup.rollout_batch}, scoring batch "
                                                      f"{setup.scoring_batch}" if setup.stage == "ppo" else ""),
        "activations: per-token per-layer coefficients measured with saved-tensor hooks (memory_plan.ACT_COEFFS), "
        + ("gradient checkpointing: the layer inputs + one recomputed layer" if setup.gradient_checkpointing
           else "no gradient checkpointing"),
        "peak = max over phases (generation: static + KV cache; scoring: static + one no-grad forward; training: "
        "static + all gradients + the largest trained role's activations; trained roles are backpropagated one "
        f"after another), + {ALLOCATOR_MARGIN:.0%} allocator margin (fragmentation of the CUDA caching allocator; "
        f"not measurable on a CPU) + {setup.runtime_overhead_gb:g} GiB runtime overhead (CUDA context, workspaces)",
    ]
    if lora:
        assumptions.append(f"LoRA r={setup.lora_r} on {','.join(targets)} of the language model "
                           f"({counts.lora_params(setup.lora_r, targets) / 1e6:.2f} M per adapter); each LoRA role "
                           f"also trains its own copy of the projector ({counts.projector / 1e6:.2f} M, peft "
                           "modules_to_save) and, for score roles, its head")
    if not lora and p == 2 and not setup.fsdp:
        assumptions.append("full fine-tuning under bf16 autocast: torch caches a bf16 copy of each fp32 linear weight "
                           "for the whole autocast region, 2 B per trained parameter, counted in the activations of "
                           "each trained role (and in the generation phase for the actor; with checkpointing it is a "
                           "forward-time peak, so adding it to all gradients is conservative)")
    if parallel == "ddp":
        assumptions.append(f"DDP over {world} GPUs replicates every role on every GPU (more GPUs add throughput, not "
                           "room)")
    return MemoryPlan(setup=setup, counts=counts, roles=roles, sharing=sharing, parallel=parallel, phases=phases,
                      peak_phase=peak_phase, peak=peak, budget=budget, assumptions=assumptions,
                      model_name=model_name or counts.name)


class CpuPeakBytes:
    """On a CPU, what torch.cuda.max_memory_allocated says on a GPU: the most bytes of tensor storage allocated
    inside the `with` block and alive at once (a TorchDispatchMode that counts each new storage until it is freed;
    the autograd backward of a CPU tensor runs on the calling thread, so it is counted too). The tests check the
    plan's terms with it; scripts/gpu_rehearsal.py --cpu_smoke prints it beside the plan.

        with CpuPeakBytes() as peak:
            loss.backward()
        peak.peak  # bytes"""

    def __init__(self):
        self.live, self.current, self.peak = {}, 0, 0
        self._mode = None

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def _count(self, out):
        import weakref

        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._count(out)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


# ==========================================================================================================
# 4. From the parsed options of a stage; the printed table
# ==========================================================================================================


def _adapter_base(path: str) -> str | None:
    file = Path(str(path)) / "adapter_config.json"
    if file.is_file():
        return json.loads(file.read_text()).get("base_model_name_or_path")
    return None


def _same_model(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve() if Path(a).exists() and Path(b).exists() else a == b
    except OSError:
        return a == b


def plan_from_args(args, stage: str, *, gpu_memory_gb: float | None = None, world_size: int | None = None,
                   image_tokens: int | None = None, prompt_tokens: int | None = None,
                   response_tokens: int | None = None, sharing: str | None = None,
                   runtime_overhead_gb: float = 1.0) -> MemoryPlan:
    """The plan of a stage (sft, rm, cm, ppo, dpo) from its parsed Args. Options are read with getattr and defaults, so
    this works with or without --lora_r / --fsdp. Keyword arguments override what the options do not say:
    gpu_memory_gb (default: the visible CUDA device, else no budget), world_size (default $WORLD_SIZE or 1),
    image_tokens (default: the model's, see image_tokens_for), prompt_tokens (text tokens of a prompt, default 100),
    response_tokens (default: --max_new_tokens, else 512), sharing (PPO; default --lora_sharing if it exists, else
    auto)."""
    get = lambda name, default: getattr(args, name, default)
    if stage == "ppo":
        path = get("actor_model_name_or_path", None)
    else:
        path = get("model_name_or_path", None)
    if not path:
        raise SystemExit(f"memory plan: no model path in the options of stage {stage!r}")
    trust = bool(get("trust_remote_code", False))
    counts = build_on_meta(path, trust)
    reward_counts = cost_counts = None
    notes = []
    on_actor = False
    if stage == "ppo":
        def score_counts(option):
            score_path = get(option, "")
            if not score_path:
                return None
            try:
                return build_on_meta(score_path, trust)
            except SystemExit:
                notes.append(f"{option} {score_path!r} cannot be read yet: assumed the actor's architecture")
                return None
        reward_counts, cost_counts = score_counts("reward_model_name_or_path"), score_counts("cost_model_name_or_path")
        actor_base = _adapter_base(path) or path
        on_actor = all(_same_model(_adapter_base(get(o, "")), actor_base)
                       for o in ("reward_model_name_or_path", "cost_model_name_or_path") if get(o, ""))
    dtype = get("dtype", "auto")
    if dtype == "auto":
        dtype = "bfloat16"
        notes.append("--dtype auto planned as bfloat16 (its GPU meaning; on CPU the scripts run fp32)")
    targets = get("lora_target_modules", LORA_TARGETS) or LORA_TARGETS
    family_tokens = image_tokens_for(_load_config(path, trust)[0], counts.family, int(get("max_pixels", 0) or 0))
    if counts.family in ("qwen2_vl", "qwen2_5_vl") and not get("max_pixels", 0) and image_tokens is None:
        notes.append("Qwen image tokens assumed 1024 per image (set --max_pixels to bound them; the processor's "
                     "default allows up to 16384)")
    if stage == "ppo":
        train_batch = int(get("per_device_train_batch_size", 2))
        rollout_batch = int(get("per_device_prompt_batch_size", 2))
        scoring_batch = int(get("rollout_micro_batch_size", 0) or rollout_batch)
    else:
        per_device = int(get("per_device_batch_size", 8 if stage == "sft" else 4))
        train_batch = per_device if stage == "sft" else 2 * per_device  # RM/CM/DPO: chosen and rejected, one forward
        rollout_batch = scoring_batch = train_batch
    setup = Setup(
        stage=stage, algo=get("algo", "ppo_lag"), dtype=dtype, quantization=get("quantization", "none") or "none",
        lora_r=int(get("lora_r", 0) or 0), lora_target_modules=tuple(_target_list(targets)),
        sharing=sharing or get("lora_sharing", None) or "auto",
        world_size=int(world_size or os.environ.get("WORLD_SIZE", 1)), fsdp=bool(get("fsdp", False)),
        gradient_checkpointing=bool(get("gradient_checkpointing", stage in ("rm", "cm"))),
        freeze_vision_tower=bool(get("freeze_vision_tower", True)), train_batch=train_batch,
        rollout_batch=rollout_batch, scoring_batch=scoring_batch,
        image_tokens=family_tokens if image_tokens is None else image_tokens,
        prompt_tokens=100 if prompt_tokens is None else prompt_tokens,
        response_tokens=int(response_tokens or get("max_new_tokens", 512) or 512),
        max_length=0 if stage == "ppo" else int(get("max_length", 0) or 0),
        ptx_batch=int(get("per_device_train_batch_size", 2)) if stage == "ppo" and get("ptx_data", "") else 0,
        gpu_memory_gb=gpu_memory_gb if gpu_memory_gb is not None else (
            (default_gpu_memory() or 0) / GiB or None),
        runtime_overhead_gb=runtime_overhead_gb)
    max_prompt = int(get("max_length", 0) or 0)
    if stage == "ppo" and max_prompt and setup.image_tokens + setup.prompt_tokens > max_prompt:
        notes.append(f"prompts are truncated to --max_length {max_prompt}")
    plan = plan_roles(setup, counts, reward_counts, cost_counts, reward_is_adapter_on_actor=on_actor, model_name=path)
    plan.assumptions = notes + plan.assumptions
    return plan


def _gib(value: float) -> str:
    return "-" if not value else ("<0.01" if value < 0.005 * GiB else f"{value / GiB:.2f}")


def format_plan(plan: MemoryPlan) -> str:
    """A readable table: per role weights, adapters, gradients, optimizer states, activations, KV cache (GiB per
    GPU), then the per-GPU total against the budget, and the assumptions."""
    s = plan.setup
    where = {"single": "1 GPU", "ddp": f"{s.world_size} GPUs (DDP)", "fsdp2": f"{s.world_size} GPUs (FSDP2)"}
    sharing = {"separate": "every role on its own weights",
               "per_score_model": "three bases: actor+reference, reward model+reward critic, cost model+cost critic",
               "one_base": "one base holds all six roles (LoRA adapters)"}[plan.sharing]
    mode = f"LoRA r={s.lora_r}" if s.lora_r > 0 else "full fine-tuning"
    quant = "" if s.quantization in ("none", "", None) else f", {s.quantization} bases"
    lines = [
        f"memory plan: {s.stage}" + (f" ({s.algo})" if s.stage == "ppo" else "") + f" of {plan.model_name} "
        f"[{plan.counts.family}] on {where[plan.parallel]}, {mode}{quant}, {s.dtype}"
        + (", gradient checkpointing" if s.gradient_checkpointing else ""),
        f"  model: {plan.counts.summary()}",
    ]
    if s.stage == "ppo":
        lines.append(f"  sharing: {sharing}")
    header = f"  {'role':<14}{'base':<20}{'weights':>9}{'adapters':>10}{'grads':>9}{'optim':>9}{'activ.':>9}{'KV':>8}"
    lines += ["", header + "   (GiB per GPU)", "  " + "-" * (len(header) - 2)]
    for r in plan.roles:
        base = r.base + (" (off)" if r.name == "reference" and plan.sharing != "separate" else "")
        lines.append(f"  {r.name:<14}{base:<20}{_gib(r.weights):>9}{_gib(r.adapters):>10}{_gib(r.grads):>9}"
                     f"{_gib(r.optimizer):>9}{_gib(r.activations):>9}{_gib(r.kv_cache):>8}"
                     + ("  trained" if r.trained else ""))
    total = lambda attr: sum(getattr(r, attr) for r in plan.roles)
    lines.append("  " + "-" * (len(header) - 2))
    lines.append(f"  {'sum':<34}{_gib(total('weights')):>9}{_gib(total('adapters')):>10}{_gib(total('grads')):>9}"
                 f"{_gib(total('optimizer')):>9}")
    lines.append("")
    lines.append("  phases (GiB per GPU, before runtime overhead): "
                 + ", ".join(f"{k} {v / GiB:.2f}" for k, v in plan.phases.items()))
    verdict = ("no budget (no CUDA device visible; pass gpu_memory_gb)" if plan.budget is None else
               f"of {plan.budget / GiB:.1f} GiB: " + ("FITS" if plan.fits else "DOES NOT FIT")
               + f" ({abs(plan.headroom) / GiB:.2f} GiB {'free' if plan.fits else 'over'})")
    lines.append(f"  per GPU: peak {plan.peak / GiB:.2f} GiB ({plan.peak_phase} phase, +{ALLOCATOR_MARGIN:.0%} "
                 f"allocator margin, +{s.runtime_overhead_gb:g} GiB runtime) {verdict}")
    lines.append("  assumptions:")
    lines += [f"    - {a}" for a in plan.assumptions]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m infra.memory_plan CONFIG [stage] [--key value ...] -> a plan from Setup fields
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Print a memory plan from a config (no weights read).")
    parser.add_argument("config", help="model folder, config.json or hub id")
    for field in dataclasses.fields(Setup):
        kind = {"bool": lambda v: v.lower() in ("1", "true", "yes"), "int": int, "float": float}.get(
            str(field.type).split(" ")[0].replace("'", ""), str)
        if field.name == "lora_target_modules":
            kind = lambda v: tuple(_target_list(v))
        if field.name == "gpu_memory_gb":
            kind = float
        parser.add_argument(f"--{field.name}", type=kind, default=None)
    options = parser.parse_args(sys.argv[1:])
    values = {k: v for k, v in vars(options).items() if k != "config" and v is not None}
    print(format_plan(plan_roles(Setup(**values), build_on_meta(options.config), model_name=options.config)))
