"""LoRA adapters (peft): a trained role as an adapter on a frozen base, and one frozen base shared by several roles.

  - lora_config / add_lora: adapters on the language model's attention and MLP projections (families.LORA_TARGETS,
    the one definition), the projector trained in full; trained parameters are fp32 master weights
  - apply_adapter: an adapter folder loaded onto its base, merged for use or kept trainable to resume
  - SharedBase + PolicyView / AdapterBackbone: PPO's six roles as adapters on one frozen base (the reference is the
    base with the adapters disabled: no second copy); each view switches the active adapter for its call

modeling.load_policy and ScoreModel.from_pretrained load adapter folders through these; merging for export lives
in infra/checkpoint.save_merged.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from families import PROJECTORS, QWEN_FAMILIES, VISION_TOWERS, lora_target_regex


ADAPTER_CONFIG_FILE = "adapter_config.json"


def lora_config(family: str, lora: dict, train_vision: bool = False):
    """peft LoraConfig: adapters on the language model's `target_modules` only (never the vision tower); the
    projector (and, when the vision tower trains, the tower) is trained in full as peft's modules_to_save."""
    from peft import LoraConfig

    pattern = lora_target_regex(lora["target_modules"])
    save = []
    if family in PROJECTORS:
        save = [VISION_TOWERS[family]] if train_vision else []
        if not (train_vision and family in QWEN_FAMILIES):  # Qwen's projector lives inside `visual`
            save.append(PROJECTORS[family])
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=pattern,
                      modules_to_save=save or None)


def add_lora(model, family: str, lora: dict, adapter_name: str = "default", train_vision: bool = False):
    """`model` (a policy, or a score model's backbone) with a new LoRA adapter: a peft model whose only trainable
    parameters are the adapter and the projector copy, in fp32 (master weights) over a base in any dtype."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(family, lora, train_vision), adapter_name=adapter_name)
    fp32_masters(peft_model.parameters())
    return peft_model


def fp32_masters(params) -> None:
    """Trained parameters in fp32 (master weights), whatever dtype the base they sit on is held in."""
    for param in params:
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def reload_adapter_weights(peft_model, path, adapter_name: str) -> None:
    """The saved weights of adapter `adapter_name` (folder `path`) loaded again, into its parameters as they are
    now. peft loads an adapter into parameters in the base's dtype (the copy of the projector, modules_to_save, is
    made from the base): on a bf16 base the saved fp32 master weights are rounded, and fp32_masters cannot bring
    them back. Called after fp32_masters, this makes a resumed run continue from exactly the saved weights."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, load_peft_weights(str(path), device="cpu"), adapter_name=adapter_name)


def is_adapter(path) -> bool:
    return (Path(str(path)) / ADAPTER_CONFIG_FILE).is_file()


def adapter_base(path) -> str:
    """The base model an adapter folder was trained on (base_model_name_or_path of its adapter_config.json)."""
    base = json.loads((Path(str(path)) / ADAPTER_CONFIG_FILE).read_text()).get("base_model_name_or_path")
    if not base:
        raise SystemExit(f"error: {path}/{ADAPTER_CONFIG_FILE} names no base_model_name_or_path")
    return base


def apply_adapter(base, path, trainable: bool = False, merge: bool = True, quantized: bool = False,
                  adapter_name: str = "default"):
    """`base` with the adapter of folder `path`: merged into the weights (merge, for use; not on a quantized base,
    whose weights cannot take it exactly), or as a peft model (trainable: to resume training it)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base, str(path), adapter_name=adapter_name, is_trainable=trainable)
    if merge and not quantized:
        merged = peft_model.merge_and_unload()
        merged.requires_grad_(True)  # as any loaded model; the caller freezes what it does not train
        return merged
    if trainable:
        fp32_masters(peft_model.parameters())
        reload_adapter_weights(peft_model, path, adapter_name)
    return peft_model


def refuse_adapter_on_quantized_base(path: str, option: str, lora_r: int, quantization: str) -> None:
    """A new LoRA run (--lora_r) on a --quantization base cannot start from a LoRA adapter folder: that adapter
    stays unmerged on the quantized base (apply_adapter), peft makes one adapter active at a time, and the frozen
    reference (the base with adapters disabled) would disable it too, so the run would start from, and be held to,
    the base instead of that policy (measured with train_dpo.py: a step-1 reward margin != 0). One line instead."""
    if lora_r and quantization not in ("", "none", None) and is_adapter(path):
        raise SystemExit(f"{option} {path} is a LoRA adapter: on a --quantization {quantization} base it cannot be "
                         "merged, and the reference (the base with adapters disabled) would not be that policy; "
                         "merge it first (train_sft.py --merge_lora writes <output_dir>/merged) and pass the merged "
                         "folder")


def unwrap_adapters(model):
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SharedBase:
    """One frozen base model (a policy, or a full score model's backbone), loaded once from `path`, holding named
    LoRA adapters, each a PPO role: the roles are views (PolicyView, AdapterBackbone) that switch the active
    adapter for their call. Adapter `None` is the base itself (adapters disabled): the reference policy, or a frozen
    score model whose backbone is the base. Trainable flags are set once per adapter and kept across switches
    (peft's set_adapter would reset them). With gradient checkpointing, a role's backward must come before the
    next role's forward (ppo_update backpropagates each role right after its forward)."""

    def __init__(self, model, path: str, family: str, label: str):
        self.model = model  # the plain model until the first adapter, then its peft wrapper
        self.path, self.family, self.label = str(path), family, label
        self.trainable: dict[str, bool] = {}
        self.roles: list[str] = []  # for the log: which roles live on this base

    def add(self, name: str, path: str | None, lora: dict | None, trainable: bool, train_vision: bool = False) -> None:
        """Adapter `name`: loaded from the adapter folder `path`, or fresh from the lora options (B = 0: it starts as
        the base). Trained adapters (and their copy of the projector) are fp32 master weights."""
        from peft import PeftModel, get_peft_model

        if not hasattr(self.model, "peft_config"):
            self.model.requires_grad_(False)
            self.model = (PeftModel.from_pretrained(self.model, str(path), adapter_name=name, is_trainable=trainable)
                          if path is not None else
                          get_peft_model(self.model, lora_config(self.family, lora, train_vision), adapter_name=name))
        elif path is not None:
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
        else:
            self.model.add_adapter(name, lora_config(self.family, lora, train_vision))
        self.model.peft_config[name].base_model_name_or_path = self.path  # what loads back the weights under it
        self.trainable[name] = trainable
        self._restore_flags()
        fp32_masters(self.parameters(name))  # requires_grad is set: a frozen adapter stays as loaded
        if trainable and path is not None:
            reload_adapter_weights(self.model, path, name)

    def parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of adapter `name` (its LoRA matrices and its copy of the fully trained modules)."""
        return [p for n, p in self.model.named_parameters() if f".{name}." in n]

    def _restore_flags(self) -> None:
        names = list(self.trainable)
        for n, p in self.model.named_parameters():
            owner = next((a for a in names if f".{a}." in n), None)
            p.requires_grad_(owner is not None and self.trainable[owner])

    def active(self, name: str | None):
        """A context in which the base computes with adapter `name` (None: the base alone, every adapter off)."""
        if not hasattr(self.model, "peft_config"):
            return contextlib.nullcontext()
        if name is None:
            return self.model.disable_adapter()
        if self.model.active_adapter != name:
            self.model.set_adapter(name)
            self._restore_flags()
        return contextlib.nullcontext()

    def save(self, name: str, path) -> None:
        """Adapter `name` as a standard peft folder (adapter_config.json + adapter_model.safetensors) at `path`."""
        import shutil
        import tempfile

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path) as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[name])
            folder = Path(tmp) / name if name != "default" else Path(tmp)
            for file in folder.iterdir():
                if file.is_file():
                    shutil.move(str(file), str(path / file.name))


class PolicyView(nn.Module):
    """A policy role on a SharedBase: the actor (its adapter) or the reference (adapter None: the base itself, so
    no second copy, and the first rollout's KL to the actor is exactly 0). Its parameters are its adapter's only."""

    def __init__(self, base: SharedBase, adapter: str | None):
        super().__init__()
        object.__setattr__(self, "base", base)  # not a submodule: the base belongs to every role
        self.adapter = adapter
        self.own = nn.ParameterList(base.parameters(adapter) if adapter else [])

    @property
    def config(self):
        return unwrap_adapters(self.base.model).config

    @property
    def device(self):
        return unwrap_adapters(self.base.model).device

    @property
    def generation_config(self):
        return unwrap_adapters(self.base.model).generation_config

    @generation_config.setter
    def generation_config(self, value):
        unwrap_adapters(self.base.model).generation_config = value

    def forward(self, *args, **kwargs):
        with self.base.active(self.adapter):
            return self.base.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.base.active(self.adapter):
            return self.base.model.generate(*args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.model.train(mode)
        return self

    def save_pretrained(self, path, **kwargs) -> None:
        self.base.save(self.adapter, path)


class AdapterBackbone(nn.Module):
    """The backbone of a score role on a SharedBase (the base's model without its LM head), computing with adapter
    `adapter` (None: the base itself). ScoreModel(AdapterBackbone(...), ...) is then a reward / cost model or a
    critic that shares its weights with the other roles."""

    def __init__(self, base: SharedBase, adapter: str | None):
        super().__init__()
        object.__setattr__(self, "base", base)
        self.adapter = adapter
        self.own = nn.ParameterList(base.parameters(adapter) if adapter else [])

    def forward(self, **kwargs):
        inner = unwrap_adapters(self.base.model)
        inner = inner.model if hasattr(inner, "lm_head") else inner  # a policy base: its model without the LM head
        with self.base.active(self.adapter):
            return inner(**kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.model.train(mode)
        return self
