"""Optimisation plumbing shared by SFT, RM, CM and PPO: AdamW + schedule, gradient clipping, the training dtype, the
non-finite guard that skips (and counts) a NaN/inf update on every rank alike, and the optimizer step that ends an
accumulation (optimizer_step)."""

from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn

from infra.parallel import any_rank, average_gradients, is_sharded
from utils import torch_dtype


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the model's gradients to a global norm of max_norm (0 = no clipping) and return that norm before
    clipping, as a plain tensor (under FSDP the norm is computed over all shards: the same as on one rank)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def make_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                   scheduler: str, warmup_ratio: float, total_steps: int):
    """AdamW (fused where the device has the kernel) over the trainable parameters + a transformers learning-rate
    schedule (constant_with_warmup, cosine, linear, constant) with warmup_ratio * total_steps warmup steps."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    try:  # one fused kernel for all parameters (CPU and CUDA): ~10x faster steps than the per-tensor loop here
        optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
    warmup = math.ceil(warmup_ratio * total_steps)
    return optimizer, get_scheduler(scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def total_optimizer_steps(batches_per_epoch: int, accumulation: int, epochs: int, max_steps: int = 0) -> int:
    """The optimizer steps of a supervised stage (SFT, RM, CM): one per `accumulation` batches (at least one per
    epoch), over all epochs, capped at max_steps (0 = no cap)."""
    total = max(1, batches_per_epoch // accumulation) * epochs
    return min(total, max_steps) if max_steps else total


def training_dtype(name: str, device) -> torch.dtype:
    """The compute dtype of a training run (--dtype). Its trained models are loaded in fp32 (master weights, so
    that an update of 5e-7 is not rounded away as it is in bf16) and run under autocast(device, this dtype)."""
    dtype = torch_dtype(name, device)
    if dtype == torch.float16:
        raise SystemExit("--dtype float16 is not supported for training (fp16 gradients need loss scaling); use "
                         "bfloat16, or float32")
    return dtype


def refuse_quantized_training(quantization: str, lora_r: int = 0) -> None:
    """Full fine-tuning trains every weight: a bitsandbytes-quantized model would train only its unquantized parts.
    With LoRA (--lora_r) the quantized base stays frozen and the adapters train (QLoRA)."""
    if quantization not in ("", "none", None) and not lora_r:
        raise SystemExit(f"--quantization {quantization}: a quantized model cannot be fully fine-tuned (only its "
                         "unquantized parts, the projector and the score head, would train); train LoRA adapters on "
                         "the quantized base instead (--lora_r 16, say), or drop --quantization.")


def trained_dtype(args) -> str:
    """The dtype a trained model is loaded in: fp32 master weights for full fine-tuning; with LoRA the frozen base
    is held in --dtype and only the adapters (and fully trained parts) are fp32."""
    return args.dtype if getattr(args, "lora_r", 0) else "float32"


class NonFiniteError(RuntimeError):
    """Raised instead of writing a checkpoint that holds NaN or inf weights."""


def all_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters() if p.dtype.is_floating_point)


class NonFiniteGuard:
    """Skips updates whose loss or gradient norm is NaN/inf: counts them (`nonfinite_steps`) and stops the run with
    a clear message after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int, total: int = 0, consecutive: int = 0):
        self.max_consecutive = max_consecutive
        self.total = total
        self.consecutive = consecutive  # checkpointed too: a resumed run stops where the uninterrupted one would

    def finite(self, *values, step: int) -> bool:
        """Are the loss and gradient norms finite, on every rank? (Under DDP the ranks must agree: one rank skipping
        an update that the others take would make their weights drift apart.)"""
        local = all(math.isfinite(float(v.detach()) if isinstance(v, torch.Tensor) else float(v)) for v in values)
        if not any_rank(not local):
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


def optimizer_step(models: dict, optimizers: dict, max_grad_norm: float, guard: NonFiniteGuard, loss,
                   step: int) -> dict:
    """The end of a gradient accumulation, for one trained model or several on one decision (PPO's actor and
    critics): average over the ranks the gradients of a model outside DDP and FSDP (a LoRA role on a shared base;
    a no-op on one rank), clip each model's gradients to max_grad_norm (0 = no clipping), then, if the loss and every
    gradient norm are finite on every rank, step every optimizer (else the update is skipped, counted and logged as
    step `step`: NonFiniteGuard); every scheduler steps and every gradient is zeroed either way.

    models: name -> the module as it trains (DDP-wrapped, sharded or bare: that decides the averaging), clipped in
    this order; optimizers: name -> (optimizer, scheduler), stepped in this order. Returns name -> the gradient norm
    before clipping (a tensor, as clip_gradients returns it)."""
    for model in models.values():
        if not isinstance(model, nn.parallel.DistributedDataParallel) and not is_sharded(model):
            average_gradients(model)
    norms = {name: clip_gradients(model, max_grad_norm) for name, model in models.items()}
    finite = guard.finite(loss, *norms.values(), step=step)
    for optimizer, scheduler in optimizers.values():
        if finite:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return norms
