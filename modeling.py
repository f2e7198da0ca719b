"""The models of Safe RLHF-V: loading a policy of every supported family, the score model, and generation.

  1. policies and processors: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL or any text causal LM, from a hub id or a
     local directory (safetensors only, no remote code unless asked), optionally 8-bit / 4-bit, vision tower frozen;
     forward_kwargs, the one way every forward receives a batch
  2. the score model: the backbone + a linear head read at the last real token (reward model, cost model and both
     critics are all this one class), saved as a self-describing directory
  3. generation for rollouts and evaluation: placeholders and pad never sampled, response_mask, `ended`

Adding a model family means adding its facts to families.py and its loading here (and data/encoding.py if its
chat template needs it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from families import IMAGE_KEYS, QWEN_FAMILIES, SKIP_QUANTIZATION, detect_family
from lora import AdapterBackbone, add_lora, adapter_base, apply_adapter, is_adapter, unwrap_adapters
from utils import get_tokenizer, notice_once, torch_dtype, write_json

# bitsandbytes is imported by peft, and peft by transformers.trainer_utils (which from_pretrained and the schedulers
# reach), so every run imports it, quantized or not. On a CPU with AVX512-BF16 its import logs "Failed to load CPU
# gemm_4bit_forward from kernels-community: No module named 'kernels'..." and falls back to its own 4-bit kernel:
# not an error, but it reads as one on every run. Drop exactly that record, nothing else of bitsandbytes'.
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: BNB_KERNELS_NOTICE not in record.getMessage())
# An 8-bit base under bf16 logs "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 ..." at every
# matmul (about 224 lines per generated token at 7B, estimated from the layer count): true, and worth reading once
# per run, not per call.
_BNB_SEEN: set[str] = set()
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda record: not record.getMessage().startswith("MatMul8bitLt:")
    or (record.getMessage() not in _BNB_SEEN and not _BNB_SEEN.add(record.getMessage())))


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """A sharded model with all its weights gathered (in its compute dtype) for a loop of forwards, e.g. generate():
    one all-gather per unit up front instead of one per unit per token, and no collective inside the loop, where
    ranks that stop at different lengths would wait on each other forever. A no-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            # FSDP2's own setting: units reshard after forward, except the root (gathered again for backward)
            unit.set_reshard_after_forward(unit is not model or getattr(model, "_frozen_root", False), recurse=False)


# ---- 1. Policies and processors for every family -----------------------------------------------------------


def model_config(path: str, trust_remote_code: bool = False):
    """The transformers config of a checkpoint. A folder that does not exist, or a hub id that cannot be reached,
    stops the run with one line saying which (not a traceback from the hub client)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except OSError as e:
        text = str(path)
        local = (text.startswith((".", "/", "~")) or text.count("/") > 1 or Path(text).exists()
                 or (Path(text).parent != Path(".") and Path(text).parent.is_dir()))
        where = "no such local model folder" if not Path(text).exists() and local else (
            "could not read its config" if Path(text).exists() else "not a local folder, and not reachable as a hub id")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: cannot load the model {text!r}: {where} ({first})")


def _no_video_processor(processor_cls):
    """Qwen2(.5)-VL processors (and LLaVA-OneVision's: _onevision_without_video) insist on a video processor, whose
    import needs torchvision. We never feed videos, so this subclass has only the image processor and the tokenizer;
    it saves under the original class name, so the saved directory stays a normal Qwen processor directory."""
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


def _onevision_without_video():
    """LLaVA-OneVision's processor without its video processor (as _no_video_processor): its image options are
    parameters of __init__, so that they are saved with the processor and read back."""
    from transformers import LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(LlavaOnevisionProcessor):
        def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                     video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
            self.num_image_tokens = num_image_tokens
            self.vision_feature_select_strategy = vision_feature_select_strategy
            self.image_token = getattr(tokenizer, "image_token", None) or image_token
            self.video_token = getattr(tokenizer, "video_token", None) or video_token
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.vision_aspect_ratio = vision_aspect_ratio
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnlyProcessor.__name__ = LlavaOnevisionProcessor.__name__
    ImageOnlyProcessor.__qualname__ = LlavaOnevisionProcessor.__qualname__
    return ImageOnlyProcessor


def processor_class(family: str):
    import transformers

    if family == "llava_onevision":
        return _onevision_without_video()
    return {
        "llava": transformers.LlavaProcessor,
        "llava_next": transformers.LlavaNextProcessor,
        "qwen2_vl": _no_video_processor(transformers.Qwen2VLProcessor),
        "qwen2_5_vl": _no_video_processor(transformers.Qwen2_5_VLProcessor),
        "text": transformers.AutoTokenizer,
    }[family]


def load_processor(path: str, family: str | None = None, trust_remote_code: bool = False, max_pixels: int = 0,
                   min_pixels: int = 0, verbose: bool = True):
    """The processor (a tokenizer for text LMs) of a checkpoint. Padding side is set per batch by our collators.

    max_pixels / min_pixels (Qwen2(.5)-VL only; 0 = the checkpoint's own limits): every image is resized to between
    these many pixels, so one huge image cannot blow up the number of vision tokens. A tokenizer without a pad token
    (Llama, Mistral) gets pad = EOS, said once on the console: masks keep padding out of every loss and score."""
    if family is None:
        family = detect_family(model_config(path, trust_remote_code))
    processor = processor_class(family).from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = get_tokenizer(processor)
    if tokenizer.pad_token_id is None:  # e.g. Llama tokenizers: pad with EOS, masks keep it out of every loss
        tokenizer.pad_token = tokenizer.eos_token
        notice_once(f"{path}: the tokenizer has no pad token; padding with EOS ({tokenizer.eos_token!r}). Padding is "
                     "masked everywhere, and everything after a response's first EOS is padding.", verbose)
    if max_pixels or min_pixels:
        if family not in QWEN_FAMILIES:
            notice_once(f"--max_pixels / --min_pixels apply to Qwen2(.5)-VL only; ignored for {family}", verbose)
        else:
            image_processor = processor.image_processor
            size = dict(image_processor.size)
            if max_pixels:
                size["longest_edge"] = max_pixels
            if min_pixels:
                size["shortest_edge"] = min_pixels
            if size["shortest_edge"] > size["longest_edge"]:
                raise ValueError(f"--min_pixels {size['shortest_edge']} exceeds --max_pixels {size['longest_edge']}")
            image_processor.size = size
            for name, value in (("max_pixels", size["longest_edge"]), ("min_pixels", size["shortest_edge"])):
                if hasattr(image_processor, name):
                    setattr(image_processor, name, value)
    return processor


def free_frozen_8bit_inputs() -> None:
    """bitsandbytes' 8-bit matmuls (MatMul8bitLt on CUDA, MatMul8bitFp on a CPU in training mode) keep their input A as
    a plain attribute of the autograd node, outside saved_tensors, whenever anything needs a gradient: so
    activation checkpointing cannot free it, and an 8-bit base keeps every linear layer's input alive through
    the whole forward (about 13 GiB for a LLaVA-1.5-7B reward model: estimated, not measured). Their backward
    reads A only for the weight's gradient, which a frozen 8-bit base never needs: drop it then. Idempotent;
    numerics unchanged."""
    from bitsandbytes.autograd import _functions as bnb_functions

    for function in (bnb_functions.MatMul8bitLt, bnb_functions.MatMul8bitFp):
        forward = function.forward
        if getattr(forward, "frees_frozen_inputs", False):
            continue

        def lean_forward(ctx, A, B, out=None, bias=None, state=None, _forward=forward):
            output = _forward(ctx, A, B, out, bias, state)  # (bitsandbytes.matmul always passes its state)
            if not ctx.needs_input_grad[1]:  # frozen weight: backward needs state.CB only
                if hasattr(ctx, "tensors"):
                    ctx.tensors = (None, None, None)
                if hasattr(ctx, "A"):
                    ctx.A = None
            return output

        lean_forward.frees_frozen_inputs = True
        function.forward = staticmethod(lean_forward)


def quantization_config(quantization: str, compute_dtype: torch.dtype = torch.float32):
    """bitsandbytes 8-bit or 4-bit (nf4) loading that leaves the vision tower and projector unquantized; 4-bit
    matmuls run in `compute_dtype` (the run's --dtype: bf16, or fp16 on a T4/V100)."""
    if quantization in ("", "none", None):
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_QUANTIZATION)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=SKIP_QUANTIZATION)
    raise ValueError(f"--quantization must be none, 8bit or 4bit, got {quantization!r}")


def is_quantized(model) -> bool:
    """Does `model` (a policy, a peft model, a score model or a role on a shared base) compute with bitsandbytes
    8-bit / 4-bit linears?"""
    return any(type(m).__name__ in ("Linear8bitLt", "Linear4bit") for m in model.modules())


def saved_quantization(path: str, trust_remote_code: bool = False) -> str | None:
    """"8bit" or "4bit" when the checkpoint was saved from a bitsandbytes-quantized model (its config.json carries
    a quantization_config), else None."""
    saved = getattr(model_config(path, trust_remote_code), "quantization_config", None)
    if saved is None:
        return None
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    if saved.get("load_in_4bit"):
        return "4bit"
    if saved.get("load_in_8bit"):
        return "8bit"
    raise SystemExit(f"error: {path}/config.json: quantization_config {saved.get('quant_method')!r} is not a "
                     "bitsandbytes 8-bit or 4-bit one; load the full-precision checkpoint")


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


def keep_image_path_in_graph(model: nn.Module) -> nn.Module:
    """For a trained VLM: a batch without an image gives its projector (and a trained vision tower) no gradient at
    all, while another rank's batch with an image gives it one. Under DDP or FSDP2 the ranks then reduce different
    sets of gradients, a collective mismatch: gloo aborts ("Received data size doesn't match"), NCCL hangs or mixes
    up buckets. This forward hook on the VLM's inner model (the module with the vision encoder and the language
    model, below the LM head) adds 0 * (the sum of those trained parameters) to its output when the batch has no
    image and gradients are being taken: the output is the same, and those parameters get their true gradient, 0,
    on every rank (as DDP's find_unused_parameters would count them, without its search of the graph). The sum is
    taken at call time, over the parameters the module holds then (FSDP2's gathered ones). Returns the model."""
    for module in model.modules():
        vlm = hasattr(module, "language_model") and (hasattr(module, "vision_tower") or hasattr(module, "visual"))
        if vlm and not hasattr(module, "lm_head") and not getattr(module, "_keeps_image_path", False):
            module.register_forward_hook(_touch_image_path, with_kwargs=True)
            module._keeps_image_path = True
    return model


def _touch_image_path(module, args, kwargs, output):
    if (kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None
            or not (module.training and torch.is_grad_enabled())):
        return output
    unused = [p for name, p in module.named_parameters() if p.requires_grad and not name.startswith("language_model.")]
    if unused:
        zero = torch.stack([p.sum().float() for p in unused]).sum() * 0.0
        output.last_hidden_state = output.last_hidden_state + zero.to(output.last_hidden_state.dtype)
    return output


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant (works with frozen inputs and DDP). transformers 5 calls it
    activation_checkpointing_enable; the old gradient_checkpointing_enable name warns that it is deprecated."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def _load_weights(model_cls, path: str, dtype: str, device, quantization: str, trust_remote_code: bool):
    """from_pretrained with our safe defaults: safetensors only, remote code only if asked, optional bitsandbytes.
    On the meta device (--fsdp, every rank but 0: infra.parallel.load_device) only the structure is built, no weight
    is read or allocated; infra.parallel.shard_model gives each rank its shard of rank 0's weights."""
    if torch.device(device).type == "meta":
        return model_cls.from_pretrained(path, dtype=torch_dtype(dtype, "cpu"), device_map="meta", use_safetensors=True,
                                         trust_remote_code=trust_remote_code)
    # A checkpoint saved from a quantized model holds bitsandbytes codes, not weights: it loads as it was saved
    # (quantization_config=None would read the int8 codes as weights, silently wrong, and a 4-bit one not at all).
    saved = saved_quantization(path, trust_remote_code)
    if saved == "4bit":  # measured: the block scales (absmax) of a layer wider than 64 come back reordered
        raise SystemExit(f"error: {path} is saved 4bit-quantized (bitsandbytes): transformers 5.23 reloads its block "
                         "scales in the wrong order (wrong logits); load the full-precision checkpoint with "
                         "--quantization 4bit instead")
    if saved is not None and quantization not in ("", "none", None, saved):
        raise SystemExit(f"error: {path} is saved {saved}-quantized, --quantization {quantization} asks for another "
                         "form: load the full-precision checkpoint to quantize it differently")
    if saved is not None and quantization in ("", "none", None):
        notice_once(f"{path} is saved {saved}-quantized (bitsandbytes): loaded as such")
    quant = None if saved is not None else quantization_config(quantization, torch_dtype(dtype, device))
    if "8bit" in (saved, quantization):
        free_frozen_8bit_inputs()
    quantized = saved is not None or quant is not None
    model = model_cls.from_pretrained(
        path,
        dtype=torch_dtype(dtype, device),
        **({} if saved is not None else {"quantization_config": quant}),
        device_map={"": torch.device(device)} if quantized else None,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    return model if quantized else model.to(device)


def load_policy(path: str, dtype: str = "auto", device: torch.device | str = "cpu", quantization: str = "none",
                freeze_vision: bool = True, gradient_checkpointing: bool = False, trust_remote_code: bool = False,
                max_pixels: int = 0, min_pixels: int = 0, lora: dict | None = None, trainable_adapter: bool = False):
    """Load a policy (a causal LM with its LM head) and its processor from a hub id or a local directory.

    Returns (model, processor, family). Safetensors only; no remote code unless asked for. max_pixels / min_pixels:
    see load_processor. LoRA (section 4):
      - `path` may be a LoRA adapter folder (adapter_config.json naming its base): the base is loaded and the
        adapter applied, merged into the weights for use (unmerged on a quantized base), or kept as a trainable
        adapter with trainable_adapter=True (resuming a LoRA run);
      - lora (infra.cli.lora_options): a new trainable adapter on top of what `path` holds (a LoRA folder is merged
        first), the base frozen: a peft model whose trainable parameters are the adapter and the projector.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    load = dict(dtype=dtype, device=device, quantization=quantization, freeze_vision=freeze_vision,
                gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code,
                max_pixels=max_pixels, min_pixels=min_pixels)
    if is_adapter(path):
        base, processor, family = load_policy(adapter_base(path), **load)
        model = apply_adapter(base, path, trainable=trainable_adapter and lora is None,
                              merge=not trainable_adapter or lora is not None, quantized=quantization != "none")
    else:
        config = model_config(path, trust_remote_code)
        family = detect_family(config)
        model_cls = AutoModelForCausalLM if family == "text" else AutoModelForImageTextToText
        model = _load_weights(model_cls, path, dtype, device, quantization, trust_remote_code)
        if freeze_vision:
            freeze_vision_tower(model)
        if gradient_checkpointing:
            enable_checkpointing(model)
            model.config.use_cache = False
        processor = load_processor(path, family, trust_remote_code, max_pixels, min_pixels)
    if lora is not None:
        model = add_lora(model, family, lora, train_vision=not freeze_vision)
        model.peft_config["default"].base_model_name_or_path = str(path)  # what loads back the weights under it
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


def hidden_size_of(config) -> int:
    return (config.text_config if hasattr(config, "text_config") else config).hidden_size


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

    adapter_model = None  # the peft model holding this score model's LoRA adapter (None: a full model)

    def set_adapter_model(self, peft_model) -> None:
        object.__setattr__(self, "adapter_model", peft_model)  # not a submodule: its base holds the backbone

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "auto", device: torch.device | str = "cpu",
                        quantization: str = "none", freeze_vision: bool = True, gradient_checkpointing: bool = False,
                        trust_remote_code: bool = False, max_pixels: int = 0, min_pixels: int = 0,
                        lora: dict | None = None, trainable_adapter: bool = False) -> tuple["ScoreModel", Any]:
        """Load a score model and its processor. A policy checkpoint gets a freshly initialised head.

        LoRA: `path` may be a LoRA score model (adapter + score head on a policy or on a full score model): merged
        for use, or its adapter kept trainable (trainable_adapter, or lora given: a critic continues the adapter of
        the score model it starts from). lora on a full score model or a policy: a new adapter, base frozen."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = str(path)
        load = dict(dtype=dtype, device=device, quantization=quantization, freeze_vision=freeze_vision,
                    gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code,
                    max_pixels=max_pixels, min_pixels=min_pixels)
        head_file = Path(path) / SCORE_HEAD_FILE
        score_config = json.loads((Path(path) / SCORE_CONFIG_FILE).read_text()) if head_file.is_file() else None
        if is_adapter(path) and head_file.is_file():  # a LoRA score model: its base, its adapter, its head
            base_path = adapter_base(path)
            keep = trainable_adapter or lora is not None
            if (Path(base_path) / SCORE_HEAD_FILE).is_file():  # adapter on a full score model's backbone
                base, processor = cls.from_pretrained(base_path, **load)
                inner = apply_adapter(base.backbone, path, trainable=keep, merge=not keep,
                                      quantized=quantization != "none")
                model = cls(unwrap_adapters(inner), base.family, base.score_head.in_features, score_config)
            else:  # adapter on a policy: the backbone is the policy without its LM head
                policy, processor, family = load_policy(base_path, **load)
                inner = apply_adapter(policy, path, trainable=keep, merge=not keep, quantized=quantization != "none")
                model = cls(unwrap_adapters(inner).model, family, hidden_size_of(policy.config), score_config)
            if hasattr(inner, "peft_config"):
                model.set_adapter_model(inner)
            model.score_head.load_state_dict(load_file(str(head_file)))
            model.score_head.to(device)
            return model, processor
        if head_file.is_file():  # a saved score model: backbone + head
            config = model_config(path, trust_remote_code)
            family = detect_family(config)
            backbone = _load_weights(AutoModel, path, dtype, device, quantization, trust_remote_code)
            if freeze_vision:
                freeze_vision_tower(backbone)
            if gradient_checkpointing:
                enable_checkpointing(backbone)
            peft_model = None
            if lora is not None:
                peft_model = add_lora(backbone, family, lora, train_vision=not freeze_vision)
                peft_model.peft_config["default"].base_model_name_or_path = path
                backbone = unwrap_adapters(peft_model)
            model = cls(backbone, family, hidden_size_of(config), score_config)
            model.score_head.load_state_dict(load_file(str(head_file)))
            processor = load_processor(path, family, trust_remote_code, max_pixels, min_pixels)
        else:  # a policy checkpoint (or a LoRA policy): keep its base model, drop the LM head
            policy, processor, family = load_policy(path, **load, lora=lora)
            peft_model = policy if lora is not None else None
            inner = unwrap_adapters(policy)
            model = cls(inner.model, family, hidden_size_of(inner.config), {"initialised_from": path})
            del policy, inner
        if peft_model is not None:
            model.set_adapter_model(peft_model)
        model.score_head.to(device)
        return model, processor

    def save_pretrained(self, path: str, processor=None, extra_config: dict | None = None,
                        head: dict | None = None) -> None:
        """A score-model folder: the full backbone, or (LoRA) the adapter naming its base; then the head, the score
        config and the processor. head: the head's full weights when the caller has written the backbone itself
        (a sharded model: infra.checkpoint.save_sharded streams its weights one tensor at a time)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if head is None:  # (else the backbone is already in path)
            head = self.score_head.state_dict()
            if self.adapter_model is not None:
                self.adapter_model.save_pretrained(str(path))
                self.score_config["lora"] = True
            elif isinstance(self.backbone, AdapterBackbone):  # a critic on a shared base: its adapter
                self.backbone.base.save(self.backbone.adapter, path)
                self.score_config["lora"] = True
            else:
                self.backbone.save_pretrained(str(path), safe_serialization=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, str(path / SCORE_HEAD_FILE))
        self.score_config.update(extra_config or {})
        write_json(path / SCORE_CONFIG_FILE, {"family": self.family, **self.score_config})
        if processor is not None:
            processor.save_pretrained(str(path))

    def merged(self) -> "ScoreModel":
        """A full score model with the adapter merged into the backbone (for --merge_lora); self if not LoRA."""
        if self.adapter_model is None:
            return self
        import copy

        inner = copy.deepcopy(self.adapter_model).merge_and_unload()
        backbone = inner.model if hasattr(inner, "lm_head") else inner
        out = ScoreModel(backbone, self.family, self.score_head.in_features,
                         {k: v for k, v in self.score_config.items() if k != "lora"})
        out.score_head.load_state_dict(self.score_head.state_dict())
        return out

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


def sampling_log_softmax(logits: torch.Tensor, temperature: float, suppress: torch.Tensor) -> torch.Tensor:
    """THE sampling distribution of every rollout and evaluation (its only definition), as log-probabilities:
    log softmax(logits / T) over the vocabulary without the never-sampled ids `suppress` (never_sample_ids), in fp32.
    OnPolicySampling records pi_old with it while sampling; token_log_probs computes pi_old, pi_ref and pi_theta
    with it, so the PPO ratio and the KL compare the distribution the tokens were actually drawn from."""
    scaled = logits.float() / temperature
    if suppress.numel():
        scaled = scaled.index_fill(-1, suppress, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                    never_sampled: list[int] | tuple = (), chunk_size: int = 64,
                    with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(tokens) under the sampling distribution (sampling_log_softmax). logits (B, N, V) are those of the N
    positions that predict tokens (B, N) (REFERENCE section 3.1-3.3).

    Memory: the fp32 log-softmax is computed `chunk_size` positions at a time; with autograd on, each chunk is
    recomputed in the backward (activation checkpointing) instead of being kept, so beyond the logits themselves
    one chunk of (B, chunk, V) fp32 is alive, not (B, N, V). with_entropy: also the per-token entropy (B, N) of
    the same distribution, computed without autograd (a diagnostic; it never enters a loss)."""
    from torch.utils.checkpoint import checkpoint

    suppress = torch.tensor(sorted(never_sampled), dtype=torch.long, device=logits.device)

    def chunk_log_probs(chunk: torch.Tensor, chunk_tokens: torch.Tensor) -> torch.Tensor:
        return sampling_log_softmax(chunk, temperature, suppress).gather(-1, chunk_tokens.unsqueeze(-1)).squeeze(-1)

    pieces, entropies = [], []
    # split, not slicing: the backward of N/64 slices would make a zero-filled full-size gradient for each slice
    # (16 B per fp32 logit at the peak, measured); split's backward concatenates the chunks' gradients once (9 B)
    for chunk, chunk_tokens in zip(logits.split(chunk_size, 1), tokens.split(chunk_size, 1)):
        if torch.is_grad_enabled() and chunk.requires_grad:
            pieces.append(checkpoint(chunk_log_probs, chunk, chunk_tokens, use_reentrant=False))
        else:
            pieces.append(chunk_log_probs(chunk, chunk_tokens))
        if with_entropy:
            with torch.no_grad():
                log_p = sampling_log_softmax(chunk.detach(), temperature, suppress)
                entropies.append(-torch.where(log_p.isfinite(), log_p.exp() * log_p, 0.0).sum(-1))
    log_probs = torch.cat(pieces, 1)
    return (log_probs, torch.cat(entropies, 1)) if with_entropy else log_probs


class OnPolicySampling:
    """The one logits processor of every rollout and evaluation: it removes the never-sampled tokens (placeholders
    and pad: never_sample_ids) and, when sampling, records log pi(a_t) of every sampled token under the distribution
    it was sampled from (sampling_log_softmax): at step t it receives the token chosen at step t-1 and reads its
    log-prob from the previous step's log-softmax. token_log_probs computes it with the same function, so that pi_old
    from the sampling pass equals a fresh forward's (bit for bit where the logits agree: the step-0 KL to an
    identical reference is exactly 0). Only (B,) numbers are kept per step. (top_p < 1 truncates the distribution
    further: not recorded, and train_ppo_lag refuses it.) One processor, not SuppressTokens + a recorder: half the
    per-step overhead of transformers' processor list."""

    def __init__(self, never_sampled: list[int] | tuple, temperature: float = 1.0, record: bool = True):
        self.never_sampled = sorted(never_sampled)
        self.temperature = temperature
        self.record = record
        self.suppress: torch.Tensor | None = None  # the never-sampled ids on the scores' device (first step)
        self.previous: torch.Tensor | None = None  # the last step's log-softmax, (B, vocab) fp32
        self.columns: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.suppress is None or self.suppress.device != scores.device:
            self.suppress = torch.tensor([i for i in self.never_sampled if i < scores.shape[-1]], dtype=torch.long,
                                         device=scores.device)
        if self.record:
            if self.previous is not None:
                self.columns.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
            self.previous = sampling_log_softmax(scores, self.temperature, self.suppress)
        if self.suppress.numel():  # what transformers samples from next (after its temperature warper)
            scores = scores.index_fill(-1, self.suppress, float("-inf"))
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """(B, new tokens) log-probs, given the tokens sampled at the last step."""
        self.columns.append(self.previous.gather(-1, last_tokens.unsqueeze(-1)).squeeze(-1))
        log_probs, self.previous, self.columns = torch.stack(self.columns, 1), None, []
        return log_probs


def sampling_config(processor, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                    do_sample: bool = True, compile: bool = False):
    """The generation config of every rollout and evaluation, built from scratch: only the options we expose.
    Whatever the checkpoint's generation_config.json carries (Qwen2-VL-Instruct: repetition_penalty, top_k; others:
    no_repeat_ngram_size, min_length, ...) would change the sampled tokens without changing the log-probs PPO uses,
    i.e. make the rollouts off-policy; generate() below also hides the checkpoint's config while it samples.
    compile: a static KV cache and a torch.compile'd decode step (compiled once per batch shape; pays off over
    many rollouts of the same shapes, see benchmarks/bench_ppo.py)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    tokenizer = get_tokenizer(processor)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=0) if do_sample else {}
    if compile:
        compile_config = CompileConfig(mode="default" if not torch.cuda.is_available() else "reduce-overhead")
        compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless told
        sampling.update(cache_implementation="static", compile_config=compile_config)
    # (the never-sampled tokens are removed by generate()'s OnPolicySampling processor, not by suppress_tokens)
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1, repetition_penalty=1.0,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling)


def rollout_cache(model, batch_size: int, length: int):
    """--compile: one static KV cache per model and batch size, reset and reused by every rollout, so that the
    compiled decode step (and, on CUDA, its recorded graphs) always sees the same cache tensors at the same
    addresses. A longer rollout (`length` positions) replaces it by a longer one, once."""
    from transformers import StaticCache

    caches = model.__dict__.setdefault("_rollout_caches", {})  # not a submodule, not in any state dict
    cache = caches.get(batch_size)
    if cache is None or cache.get_max_length() < length:
        length = max(length, cache.get_max_length() if cache is not None else 0)
        cache = caches[batch_size] = StaticCache(config=model.config.get_text_config(decoder=True),
                                                 max_cache_len=length)
    else:
        cache.reset()
    return cache


@torch.no_grad()
def generate(model, processor, family: str, prompt_batch: dict, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, do_sample: bool = True, compile: bool = False) -> dict:
    """Sample responses for a left-padded prompt batch (step 1 of the rollout recipe).

    On-policy by construction: tokens are drawn from sampling_log_softmax and nothing else (the checkpoint's own
    generation config is set aside: sampling_config). Everything after the first EOS is padding. Returns the full
    batch (prompt + response) ready for any forward: input_ids, attention_mask, response_mask (real response tokens,
    EOS included), Qwen's mm_token_type_ids extended over the response with 0, the same image tensors, `ended`
    (whether each response emitted EOS) and, when sampling, `sampling_log_probs` (B, L-1): log pi(a_t) of each
    response token under the sampling distribution, in the per-action layout of train_ppo_lag.policy_log_probs (0
    outside the response)."""
    from transformers import GenerationConfig, LogitsProcessorList

    tokenizer = get_tokenizer(processor)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    kwargs = forward_kwargs(prompt_batch, family)
    kwargs.pop("position_ids", None)  # generate derives positions from the attention mask
    recorder = OnPolicySampling(never_sample_ids(processor), temperature, record=do_sample)
    holder = unwrap_adapters(model)  # under a peft wrapper, the transformers model's config is the one generate reads
    checkpoint_config = holder.generation_config
    holder.generation_config = GenerationConfig()  # generate() fills unset options from it: leave nothing to fill
    config = sampling_config(processor, max_new_tokens, temperature, top_p, do_sample, compile)
    if compile:  # our own static cache, reused: transformers would build a new one (new addresses) every call
        config.cache_implementation = None
        kwargs["past_key_values"] = rollout_cache(holder, prompt_batch["input_ids"].shape[0],
                                                  prompt_batch["input_ids"].shape[1] + max_new_tokens)
    try:  # (a sharded model, --fsdp, is gathered whole first: no collective per token, see unsharded above)
        with unsharded(model):
            sequences = model.generate(**kwargs, generation_config=config,
                                       logits_processor=LogitsProcessorList([recorder]))
    finally:
        holder.generation_config = checkpoint_config
    prompt_len = prompt_batch["input_ids"].shape[1]
    response = sequences[:, prompt_len:]
    is_eos = response == eos
    # real response tokens: up to and including the first EOS
    after_first_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    response_mask = ~after_first_eos
    response = response.masked_fill(after_first_eos, pad)
    batch = {k: v for k, v in prompt_batch.items() if k in IMAGE_KEYS + ("has_image",)}
    batch["input_ids"] = torch.cat([prompt_batch["input_ids"], response], 1)
    batch["attention_mask"] = torch.cat([prompt_batch["attention_mask"], response_mask.long()], 1)
    batch["response_mask"] = torch.cat([torch.zeros_like(prompt_batch["input_ids"], dtype=torch.bool), response_mask], 1)
    if "mm_token_type_ids" in prompt_batch:
        batch["mm_token_type_ids"] = torch.cat([prompt_batch["mm_token_type_ids"], torch.zeros_like(response)], 1)
    batch["ended"] = is_eos.any(-1)
    if do_sample:
        sampled = recorder.finish(sequences[:, -1]).masked_fill(after_first_eos, 0.0)
        batch["sampling_log_probs"] = torch.cat(
            [sampled.new_zeros(sampled.shape[0], prompt_len - 1), sampled], 1)
    return batch


def response_texts(processor, batch: dict) -> list[str]:
    """Decoded responses (EOS and padding removed)."""
    tokenizer = get_tokenizer(processor)
    texts = []
    for ids, mask in zip(batch["input_ids"], batch["response_mask"]):
        texts.append(tokenizer.decode(ids[mask], skip_special_tokens=True))
    return texts
