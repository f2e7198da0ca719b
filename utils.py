"""What the Safe RLHF-V stages share about training (the models live in modeling.py, the data layer in data/).

  1. arguments: argparse from a dataclass; the options every script (ModelArgs) and every trainer takes (CommonArgs)
  2. torchrun: ranks, devices, seeds, cross-rank means
  3. run logging: args.json, metrics.jsonl, summary.json
  4. math shared by stages: the masked mean, the SFT cross-entropy (PPO's PTX term)
  5. training plumbing: data loaders that resume mid-epoch, optimizer + schedule, autocast
  6. checkpoints (atomic, exact resume) and the non-finite guard

The method these follow is in the README and, in more detail, in the paper (Ji et al., NeurIPS 2025).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import random
import re
import sys
import typing
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from families import LORA_TARGETS

# bitsandbytes is imported by peft, and peft by transformers.trainer_utils (which from_pretrained and the schedulers
# reach), so every run imports it, quantized or not. On a CPU with AVX512-BF16 its import logs "Failed to load CPU
# gemm_4bit_forward from kernels-community: No module named 'kernels'..." and falls back to its own 4-bit kernel:
# not an error, but it reads as one on every run. Drop exactly that record, nothing else of bitsandbytes'.
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: BNB_KERNELS_NOTICE not in record.getMessage())

# ---- 1. Arguments ------------------------------------------------------------------------------------------


def arg(default, help: str):
    """A dataclass field with a help string (shown by --help together with its default)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ModelArgs:
    """How every script loads its models (the training scripts through CommonArgs, evaluate.py directly)."""

    max_length: int = arg(4096, "maximum prompt + response tokens (longer questions are truncated from the left)")
    dtype: str = arg("auto", "weights and compute of the (frozen) models: auto (bf16 on GPU, fp32 on CPU), float32, "
                             "bfloat16 or float16; score heads always fp32")
    quantization: str = arg("none", "none, 8bit or 4bit (bitsandbytes; the vision tower stays unquantized)")
    trust_remote_code: bool = arg(False, "allow code from the checkpoints (off: only transformers' own classes)")
    max_pixels: int = arg(0, "Qwen2(.5)-VL: resize every image to at most this many pixels (bounds its vision "
                             "tokens; 0 = the processor's own limit)")
    min_pixels: int = arg(0, "Qwen2(.5)-VL: resize every image to at least this many pixels (0 = the processor's)")


@dataclasses.dataclass
class CommonArgs(ModelArgs):
    """Options every training script takes (train_sft, train_rm, train_cm and train_ppo_lag extend this). A stage
    redeclares one only where its default or its meaning differs, with a comment saying why."""

    epochs: int = arg(3, "passes over the training data")
    max_steps: int = arg(0, "stop after N optimizer steps (0 = run all epochs); the schedule spans these N steps")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    dtype: str = arg("auto", "compute precision: auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16. Trained models "
                             "keep fp32 weights, gradients and AdamW states and run forward/backward under autocast "
                             "in this dtype; frozen models (PPO's reference, reward and cost models) are stored in it; "
                             "score heads, losses, log-softmax and the PPO math are fp32. float16 is refused (it "
                             "would need loss scaling)")
    adam_beta1: float = arg(0.9, "Adam beta1")
    adam_beta2: float = arg(0.95, "Adam beta2")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0 = off)")
    freeze_vision_tower: bool = arg(True, "keep the vision encoder frozen (the projector and language model train)")
    # Off by default: the paper states checkpointing only for the reward and cost models (train_rm turns it on).
    gradient_checkpointing: bool = arg(False, "trade compute for memory in the trained models")
    skip_invalid: bool = arg(False, "skip invalid rows (counted by reason) instead of stopping at the first")
    lora_r: int = arg(0, "LoRA rank of the trained models (0 = full fine-tuning): adapters on the language model, "
                         "base frozen in --dtype (or --quantization), the projector and score heads trained in full")
    lora_alpha: float = arg(32.0, "LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = arg(0.0, "dropout on the LoRA input (keep 0 for PPO: dropout makes the rollout's and the "
                                   "update's log-probs differ)")
    lora_target_modules: list = arg(list(LORA_TARGETS), "language-model modules that get adapters (the vision tower "
                                                         "never does)")
    merge_lora: bool = arg(False, "with --lora_r: also write the adapters merged into full weights, in "
                                  "<output_dir>/merged (the adapters are always written)")
    logging_steps: int = arg(10, "log every N optimizer steps")
    save_steps: int = arg(500, "write a checkpoint every N optimizer steps (0 = only at the end)")
    keep_checkpoints: int = arg(2, "keep the newest K checkpoints")
    resume_from: str = arg("", "'' = start fresh; auto = the newest checkpoint in output_dir; or a checkpoint folder")
    max_nonfinite_steps: int = arg(3, "stop after this many NaN/inf updates in a row (each one is skipped)")
    model_card_license: str = arg("cc-by-nc-4.0", "licence in the model cards (README.md) of saved models: that of "
                                                  "the training data; set the base model's if it is stricter")
    report_to: list = arg(["none"], "trackers that receive every logged scalar too (rank 0): none, tensorboard, "
                                    "wandb (several allowed; metrics.jsonl is always written)")
    seed: int = arg(42, "random seed (each rank adds its rank)")
    dry_run: bool = arg(False, "print the memory plan (per role and per GPU: weights, adapters, gradients, AdamW "
                               "states, activations, KV cache) from the model configs alone, without reading any "
                               "weight, and exit (memory_plan.py)")
    gpu_memory_gb: float = arg(0.0, "--dry_run: GPU memory to plan against (0 = the visible CUDA device's, if any)")
    dist_timeout_minutes: float = arg(60.0, "under torchrun: how long a rank waits for the others in a collective "
                                            "(while rank 0 writes a checkpoint or loads a model) before the run "
                                            "fails (NCCL's own default: 10)")
    fsdp: bool = arg(False, "under torchrun: shard every model over the ranks with FSDP2 (fully_shard; weights, "
                            "gradients and AdamW states 1/world_size per rank) instead of replicating it with DDP; "
                            "for full fine-tuning that does not fit one GPU (not with --lora_r or --quantization)")


def run_script(main, args_cls, argv: list[str] | None = None):
    """`python train_*.py ...`: parse the options and run main. Bad input data (a DataError: the message names the
    file, row and field) ends the run with that one line and exit status 1, not a traceback. Every rank that meets
    it prints it (another rank's own batches may hold the bad row: printed on rank 0 only, it would be lost)."""
    from data.sources import DataError

    args = parse_args(args_cls, argv)
    try:
        return main(args)
    except DataError as e:
        rank = int(os.environ.get("RANK", "0"))
        print(f"error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        raise SystemExit(1)
    finally:
        destroy_distributed()


def dry_run(args, stage: str) -> dict:
    """--dry_run: print the memory plan of `stage` (sft, rm, cm, ppo) for these options and return it."""
    from infra import memory_plan

    plan = memory_plan.plan_from_args(args, stage, gpu_memory_gb=args.gpu_memory_gb or None)
    print(memory_plan.format_plan(plan))
    return plan.to_dict()


def model_options(args) -> dict:
    """The loading options of ModelArgs that every from_pretrained call of a script takes."""
    return dict(trust_remote_code=args.trust_remote_code, max_pixels=args.max_pixels, min_pixels=args.min_pixels)


def _str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def parse_args(cls, argv: list[str] | None = None, description: str | None = None):
    """argparse generated from a dataclass: one --option per field, help text and default shown. A training
    script lists its own options first, then those it shares with every training script (CommonArgs)."""
    parser = argparse.ArgumentParser(
        description=description or cls.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    shared = {f.name for f in dataclasses.fields(CommonArgs)} if issubclass(cls, CommonArgs) else set()
    own = parser.add_argument_group("options of this script") if shared else parser
    common = parser.add_argument_group("options shared by every training script") if shared else parser
    hints = typing.get_type_hints(cls)  # resolves the string annotations of `from __future__ import annotations`
    for f in dataclasses.fields(cls):
        group = common if f.name in shared else own
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        ftype = hints[f.name]
        if ftype is bool:
            group.add_argument(f"--{f.name}", type=_str2bool, nargs="?", const=True, default=default, help=help_text)
        elif ftype in (int, float, str):
            group.add_argument(f"--{f.name}", type=ftype, default=default, help=help_text)
        else:  # optional str / int / float, or a list
            origin = getattr(ftype, "__args__", (str,))
            base = next((t for t in origin if t in (int, float, str)), str)
            if isinstance(default, list):
                group.add_argument(f"--{f.name}", type=base, nargs="*", default=default, help=help_text)
            else:
                group.add_argument(f"--{f.name}", type=base, default=default, help=help_text)
    return cls(**vars(parser.parse_args(argv)))


# ---- 2. torchrun: ranks, devices, seeds, cross-rank means --------------------------------------------------


def init_distributed(timeout_minutes: float = 60.0) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Works unchanged under `torchrun` (NCCL on GPU, gloo on CPU) and alone.
    timeout_minutes (--dist_timeout_minutes): how long a rank waits in a collective for the others. NCCL's own
    default, 10 minutes, is shorter than rank 0 may take alone to write a 7B PPO-Lag checkpoint or to load a model
    for --fsdp, while the other ranks wait."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # Imported before the default group exists: torch.distributed.nn.functional binds `group=group.WORLD` as
        # a default argument at import time, and imported later (by fully_shard) it would hold the group past
        # destroy_process_group (see destroy_distributed).
        import torch.distributed.fsdp as _fsdp  # noqa: F401  (imports torch.distributed.nn.functional)
        import torch.distributed.nn as _dist_nn  # noqa: F401

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, world_size, device


def destroy_distributed() -> None:
    """End the default process group so that nothing outlives it. A group still referenced after
    destroy_process_group is freed only during the interpreter's finalisation, after its gloo threads (or NCCL's)
    have run unsupervised to the end, and rank 0 could die there with "terminate called without an active
    exception" (SIGABRT) after a run that did its work. Three things held it: function defaults of
    torch.distributed.nn.functional (imported before the group exists: init_distributed); the device mesh of
    shard_model, which DTensor's caches keep alive after the run (the C++ and Python sharding-propagation caches,
    the redistribute planners, MeshTopoInfo: each keyed by or holding DTensor specs of the last ops FSDP2 ran), so
    the mesh is emptied of its groups here rather than chased through every cache; and FSDP2's per-module state,
    which holds the group in reference cycles that only a collection frees.
    Call it once the models are freed (run_script does, after main has returned): a sharded model still alive
    holds the group through its FSDP2 state. Checked by tests/test_distributed.py (no gloo thread left:
    test_destroy_process_group_frees_the_default_group, and torchrun() after every multi-rank run)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for mesh in _MESHES.values():
        mesh._pg_registry.clear()  # the mesh's only references to the groups (torch 2.13's DeviceMesh)
    _MESHES.clear()
    gc.collect()
    dist.destroy_process_group()


# Every collective of the project goes through the helpers below: they put tensors where the backend takes them.


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where the default process group's collectives take their tensors: the current CUDA device under NCCL (which
    rejects CPU tensors), the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity when not distributed); the result is on the input's device."""
    if not distributed():
        return value
    reduced = value.detach().to(collective_device(), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return (reduced / dist.get_world_size()).to(value.device)


def mean_over_ranks(figures: dict) -> dict:
    """{name: number or 0-d tensor} -> {name: float}, each averaged over ranks in a single all-reduce (in fp32)."""
    values = torch.tensor([float(v) for v in figures.values()], dtype=torch.float32)
    return dict(zip(figures, all_reduce_mean(values).tolist()))


def average_gradients(model: nn.Module) -> None:
    """Average a model's gradients over ranks in one all-reduce, for a trained model that is not wrapped in DDP (a
    LoRA role on a shared base: DDP cannot wrap roles that share one module). A no-op on one rank."""
    if not distributed():
        return
    # every trained parameter, a missing gradient as 0 (a rank whose batch did not reach it): all ranks must send
    # the same layout
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    if grads:
        flat = all_reduce_mean(torch.cat([g.reshape(-1).float() for g in grads]))
        for grad, value in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(value.view_as(grad))


def broadcast_parameters(model: nn.Module) -> None:
    """Give every rank rank 0's trainable parameters (what DDP does when it wraps a model), for a trained model
    that is not wrapped in DDP: a fresh LoRA adapter is drawn from each rank's own random stream."""
    if not distributed():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        flat = torch.cat([p.detach().reshape(-1).float() for p in params]).to(collective_device())
        dist.broadcast(flat, src=0)
        with torch.no_grad():
            for param, value in zip(params, flat.cpu().split([p.numel() for p in params])):
                param.copy_(value.view_as(param).to(param.device, param.dtype))


# ---- FSDP2 (--fsdp): every model sharded over the ranks instead of replicated -----------------------------


def check_fsdp(args) -> bool:
    """Is --fsdp in force? Refuses what it does not combine with, in one line; on one process it has nothing to
    shard (a notice, and the run goes on unsharded)."""
    if not getattr(args, "fsdp", False):
        return False
    if args.lora_r or args.quantization not in ("", "none"):
        raise SystemExit("--fsdp is for full fine-tuning; with --lora_r (and --quantization) the roles share one "
                         "frozen base that fits one GPU: drop --fsdp (DDP replicates the adapters)")
    if getattr(args, "compile", False):
        raise SystemExit("--fsdp with --compile is not supported (the compiled decode step would capture "
                         "sharded weights); drop one of them")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        print("notice: --fsdp on one process: nothing to shard, the run goes on unsharded", file=sys.stderr)
        return False
    return True


def load_device(fsdp: bool, device: torch.device) -> torch.device:
    """Where a model is loaded: `device`, or when it is to be sharded (--fsdp) the CPU on rank 0 and the meta device
    (structure only, no memory) on every other rank. shard_model then gives each rank its shard of rank 0's weights
    on the GPU: no GPU holds a whole model, and the host holds one copy, not one per rank (8 x 28 GB for a 7B model
    in fp32 on an 8-GPU node)."""
    if not fsdp:
        return device
    return torch.device("meta") if distributed() and dist.get_rank() > 0 else torch.device("cpu")


_MESHES = {}


def shard_model(model: nn.Module, device, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 (torch.distributed.fsdp.fully_shard) over every rank, in place; returns the model. Each decoder layer
    of the language model (the classes transformers lists in `_no_split_modules`) is one unit, a score head another
    (kept fp32), everything else (embeddings, vision tower, projector, norms, lm_head) the root unit: a unit's full
    weights exist only while it runs, all-gathered just before. (The vision tower stays in the root unit: it is
    small next to the language model, and transformers' generate() runs it outside the model's forward, before the
    root unit has run, which FSDP2 refuses for a unit of its own.) A trained model (fp32 master weights) passes
    compute_dtype: its units are gathered in that dtype and their gradients reduce-scattered in fp32
    (MixedPrecisionPolicy; autocast over gathered fp32 weights would cache a bf16 copy of every weight for the
    whole forward). The weights are rank 0's (loaded on its CPU; the other ranks built the model on the meta
    device, load_device): each rank receives its shards of them, and rank 0's buffers (rotary frequencies, which no
    state dict holds) as they are; a freshly initialised score head is thus rank 0's on every rank, as DDP does."""
    import warnings

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 warns once per module class that returns a view (a linear layer's 3-D output, the score model's
    # per-token scores): an in-place op on such a view would skip its backward hook. No code here modifies a
    # module's output in place, so the warning is noise on every run.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
    device = torch.device(device)
    if device.type not in _MESHES:
        _MESHES[device.type] = init_device_mesh(device.type, (dist.get_world_size(),))
    mesh = _MESHES[device.type]
    rank0_weights = model.state_dict() if dist.get_rank() == 0 else {}  # rank 0: the whole model, on its CPU
    blocks = set()
    for module in model.modules():
        blocks.update(getattr(module, "_no_split_modules", None) or [])
    in_vision = re.compile(r"(^|\.)(vision_tower|visual|vision_model)(\.|$)")
    policy = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
              if compute_dtype not in (None, torch.float32) else MixedPrecisionPolicy())
    layers = [m for name, m in model.named_modules() if type(m).__name__ in blocks and not in_vision.search(name)]
    for module in layers:  # decoder layers never nest: any order
        fully_shard(module, mesh=mesh, mp_policy=policy)
    if hasattr(model, "score_head"):
        fully_shard(model.score_head, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if dist.get_rank() != 0:
        model.to_empty(device=device)  # room for this rank's shards (and buffers), filled just below
    set_model_state_dict(model, rank0_weights,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


def parallelize(model: nn.Module, fsdp: bool, device, compute_dtype: torch.dtype) -> nn.Module:
    """The module a trained model trains through: itself sharded (--fsdp: shard_model), else DDP-wrapped under
    torchrun, else the model itself. Build its optimizer after this (FSDP replaces the parameters). A VLM's image
    path stays in the graph on batches without an image (modeling.keep_image_path_in_graph: ranks must reduce the
    same gradients)."""
    from modeling import keep_image_path_in_graph  # modeling imports this module

    keep_image_path_in_graph(model)
    if fsdp:
        return shard_model(model, device, compute_dtype)
    return nn.parallel.DistributedDataParallel(model) if distributed() else model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


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
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the model's gradients to a global norm of max_norm (0 = no clipping) and return that norm before
    clipping, as a plain tensor (under FSDP the norm is computed over all shards: the same as on one rank)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_state(model: nn.Module, optimizer=None) -> tuple[dict | None, dict | None]:
    """A sharded model's full (unsharded) state dict and its optimizer's, keyed by parameter name, on rank 0's CPU
    (None on the other ranks): what a checkpoint stores, whatever the world size. Call it on every rank."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    if dist.get_rank() != 0:
        return None, None
    return weights, optimizer_state


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Give a (sharded or whole) model's optimizer a full, name-keyed state (full_state): each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (so that all ranks take the same branch)."""
    return bool(all_reduce_mean(torch.tensor([float(flag)])).item() > 0) if distributed() else flag


def all_gather_cat(values: torch.Tensor) -> torch.Tensor:
    """The tensors of every rank concatenated along dim 0, in rank order (the tensor itself when not distributed)."""
    if not distributed():
        return values
    local = values.detach().to(collective_device())
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return torch.cat(gathered).to(values.device)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] when not distributed)."""
    if not distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a picklable object; `obj` itself when not distributed)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int, rank: int = 0) -> None:
    """Per-rank seeds so that ranks draw different samples but a run is reproducible."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- 3. Run logging: args.json, metrics.jsonl, summary.json ------------------------------------------------


class RunLog:
    """The files every stage writes to --output_dir: args.json, metrics.jsonl (one object per logged step) and
    summary.json. Only rank 0 writes; every write is flushed so a crash loses nothing already logged.
    metrics.jsonl is the source of truth; with --report_to tensorboard / wandb every numeric value of every record
    also goes to the tracker under the same name (nested dicts joined with "/"), at the record's step."""

    def __init__(self, output_dir: str, args, rank: int = 0, resume: Path | str | bool | None = None):
        """resume: the checkpoint a resumed run starts from (its run's options are compared with these: resumed_args;
        trackers drop what was logged after it), or None for a fresh run."""
        self.output_dir = Path(output_dir)
        self.rank = rank
        self.lines = 0  # records written so far (a checkpoint stores it, resume truncates to it)
        args_dict = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
        # Secrets never reach a file: any option whose name says key/token/secret is masked.
        for name in args_dict:
            if name.lower().endswith(("api_key", "_token", "secret", "password")):
                args_dict[name] = "***" if args_dict[name] else args_dict[name]
        checkpoint = Path(resume) if isinstance(resume, (str, Path)) else None
        if checkpoint is not None:  # every rank: all of them stop on changed options, not rank 0 alone
            resumed_args(checkpoint, args_dict, rank)
        resume_step = json.loads((checkpoint / "trainer_state.json").read_text())["step"] if checkpoint else None
        if rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if not resume:  # a fresh run into an old folder must not mix its metrics with the old ones
                (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
            write_json(self.output_dir / "args.json", args_dict)
        self.trackers = (open_trackers(getattr(args, "report_to", []), self.output_dir, args_dict, resume_step)
                         if rank == 0 else [])

    def metrics(self, record: dict) -> None:
        self.lines += 1
        if self.rank == 0:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")
            scalars = {k: v for k, v in _flatten(record).items() if k != "step"}
            for tracker in self.trackers:
                tracker.scalars(scalars, int(record.get("step", self.lines)))

    def text(self, tag: str, markdown: str, step: int) -> None:
        """A text panel in the trackers (e.g. a markdown table of samples); nothing without one."""
        for tracker in self.trackers:
            tracker.text(tag, markdown, step)

    def truncate(self, n_lines: int) -> None:
        """On resume: keep the first n_lines records (those logged up to the checkpoint), drop what a killed run
        logged after it."""
        path = self.output_dir / "metrics.jsonl"
        if self.rank == 0 and path.is_file():
            lines = [line for line in path.read_text().splitlines() if line.strip()][:n_lines]
            write_atomic(path, "".join(line + "\n" for line in lines))
        self.lines = n_lines

    def summary(self, record: dict) -> None:
        """The final figures; closes the trackers (the run is over)."""
        if self.rank == 0:
            write_json(self.output_dir / "summary.json", record)
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


# Options a resumed run may change: where and how often it logs and saves, and held-out evaluation (own RNG).
RESUME_FREE = {"resume_from", "output_dir", "logging_steps", "save_steps", "keep_checkpoints", "report_to",
               "dist_timeout_minutes", "dry_run", "gpu_memory_gb", "model_card_license", "max_nonfinite_steps",
               "merge_lora", "eval_steps", "sample_steps", "sample_prompts", "eval_prompts", "eval_batch_size"}
# Options it may change with a warning: speed and memory knobs (the run goes on, no longer bit-identical).
RESUME_WARN = {"gradient_checkpointing", "rollout_micro_batch_size", "reuse_critic_forward", "compile",
               "old_log_probs", "fsdp"}


def resumed_args(checkpoint: Path, current: dict, rank: int = 0) -> None:
    """A resumed run must continue the run its checkpoint belongs to: its options are compared with that run's
    args.json. Changed options that shape the training (data, model, batch sizes, learning rates, steps, seed,
    algorithm, ...) stop it with one line naming them, before anything is written; speed and memory knobs
    (RESUME_WARN) are allowed with a warning; logging and saving options (RESUME_FREE) freely."""
    saved_path = Path(checkpoint).parent.parent / "args.json"
    if not saved_path.is_file():
        if rank == 0:
            print(f"warning: no args.json next to {checkpoint}: the resumed run's options cannot be compared with "
                  "the original run's", file=sys.stderr)
        return
    saved = json.loads(saved_path.read_text())
    now = json.loads(json.dumps(_jsonable(current)))
    changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k] and k not in RESUME_FREE}
    refused = {k: v for k, v in changed.items() if k not in RESUME_WARN}
    describe = lambda items: ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in items.items())
    if refused:
        raise SystemExit(f"--resume_from {checkpoint}: these options differ from the run it continues "
                         f"({saved_path}): {describe(refused)}. Resume with the run's options, or start a new run "
                         "(from the checkpoint's models if you like) in another --output_dir")
    if changed and rank == 0:
        print(f"warning: resuming with changed options ({describe(changed)}): the run goes on, but not "
              "bit-identical to an uninterrupted one", file=sys.stderr)


def data_report(skips, stats) -> str:
    """One console line on what was done to the data: rows skipped (by reason, with the first rows named), questions
    and responses truncated to fit --max_length, images dropped for a text-only model."""
    said = {"truncated_question": "questions truncated from the left", "truncated_response":
            "responses cut on the right (no EOS)", "dropped_image": "images dropped (text-only model)"}
    changes = [f"{n} {said.get(k, k)}" for k, n in sorted(stats.items()) if n]
    return (f"data: skipped rows: {skips.report()}; "
            + ("; ".join(changes) + " (to fit --max_length where truncated)" if changes else "nothing truncated"))


def warn_overlap(eval_rows: list, train_rows: list, what: str, rank: int = 0) -> int:
    """Count the evaluation rows that are also training rows (same question, responses and image) and warn loudly:
    figures measured on them flatter the model. Returns the count (for summary.json)."""
    from data import overlapping_rows

    shared = overlapping_rows(eval_rows, train_rows)
    if shared and rank == 0:
        print(f"WARNING: {len(shared)} of {len(eval_rows)} {what} rows are also training rows (first: "
              f"{', '.join(shared[:3])}); the evaluation is not held out. Give held-out rows with --eval_data.",
              file=sys.stderr)
    return len(shared)


def write_model_card(path, stage: str, base_model: str, args, metrics: dict, datasets: list[str] = ()) -> None:
    """README.md in the Hugging Face model-card format (YAML front matter, then what it is, how it was trained, its
    final figures and how to load it), so that a saved folder pushed to a hub reads well."""
    def is_hub_id(name):
        return bool(name) and not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/"))

    front = {"base_model": base_model if is_hub_id(base_model) else None, "library_name": "transformers",
             "license": getattr(args, "model_card_license", "cc-by-nc-4.0"),
             "tags": ["safe-rlhf-v", stage.replace("_", "-"), "rlhf", "safety"],
             "datasets": [d for d in datasets if is_hub_id(d)] or None}
    lines = ["---"] + [f"{k}: {json.dumps(v)}" for k, v in front.items() if v is not None] + ["---", ""]
    loader = ("modeling.ScoreModel.from_pretrained(path)" if stage in ("reward_model", "cost_model", "reward_critic",
                                                                         "cost_critic")
              else "modeling.load_policy(path)  # or transformers' AutoModelForImageTextToText")
    options = _jsonable(dataclasses.asdict(args)) if dataclasses.is_dataclass(args) else dict(args)
    shown = {k: v for k, v in options.items() if k in _CARD_OPTIONS or k.endswith(("_model_name_or_path", "_lr"))}
    figures = {k: v for k, v in _flatten(metrics).items() if "per_category" not in k}
    lines += [f"# {stage.replace('_', ' ')} (Safe RLHF-V)", "",
              f"Trained from `{base_model}` with this repository's Safe RLHF-V implementation (stage `{stage}`).",
              "The training data of Safe RLHF-V (BeaverTails-V, PKU-SafeRLHF) is CC BY-NC 4.0; the base model's "
              "licence applies as well.", "", "## Training options", "", "| option | value |", "|---|---|"]
    lines += [f"| `{k}` | `{v}` |" for k, v in shown.items()]
    lines += ["", "## Final figures", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in figures.items()]
    lines += ["", "## Load", "", "```python", f"# from the repository root: {loader}", "```", ""]
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "README.md").write_text("\n".join(lines), encoding="utf-8")


_CARD_OPTIONS = ("algo", "train_data", "epochs", "max_steps", "lr", "lr_scheduler", "per_device_batch_size",
                 "per_device_prompt_batch_size", "gradient_accumulation_steps", "regularization", "kl_coeff",
                 "threshold", "lambda_init", "lambda_max", "lambda_lr", "dtype", "seed")


def _flatten(record: dict, prefix: str = "") -> dict:
    """{name: number} of every int/float in a (nested) record; nested names are joined with "/"."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class TensorBoardTracker:
    """Event files in <output_dir>/tensorboard (`tensorboard --logdir <output_dir>`). Resumed after step N
    (resume_step), it purges the events a killed run logged after N, which the resumed run logs again."""

    def __init__(self, output_dir: Path, config: dict, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
        purge = {} if resume_step is None else {"purge_step": resume_step + 1}
        self.writer = SummaryWriter(str(output_dir / "tensorboard"), **purge)
        if resume_step is None:
            self.writer.add_text("args", "```\n" + json.dumps(_jsonable(config), indent=2) + "\n```", 0)

    def scalars(self, values: dict, step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.writer.add_text(tag, markdown, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run in <output_dir>/wandb; WANDB_MODE=offline works without an account or network."""

    def __init__(self, output_dir: Path, config: dict, resume_step: int | None = None):
        try:
            import wandb
        except ImportError:
            raise SystemExit("--report_to wandb needs the wandb package (pip install wandb; it is optional); "
                             "set WANDB_MODE=offline to log without an account")
        self.wandb = wandb
        # one wandb run per training run: a resumed run continues the id the first one kept in the output folder
        id_file = output_dir / "wandb_run_id"
        if resume_step is None or not id_file.is_file():
            id_file.write_text(wandb.util.generate_id())
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "safe-rlhf-v"), dir=str(output_dir),
                              name=output_dir.name, config=_jsonable(config), id=id_file.read_text().strip(),
                              resume="allow")

    def scalars(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{markdown}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(report_to, output_dir: Path, config: dict, resume_step: int | None = None) -> list:
    """The trackers named by --report_to (none, tensorboard, wandb; several allowed); resume_step: the step of the
    checkpoint a resumed run starts from."""
    kinds = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}
    names = [n for n in (report_to or []) if n != "none"]
    unknown = [n for n in names if n not in kinds]
    if unknown:
        raise SystemExit(f"--report_to: unknown {unknown}; choose from none, tensorboard, wandb")
    return [kinds[n](output_dir, config, resume_step) for n in dict.fromkeys(names)]


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


def _from_jsonable(value):
    """The inverse of _jsonable for what a checkpoint holds: "nan", "inf", "-inf" back to floats (a skipped NaN
    step's loss is in the running means; summed as a string, it would make the run impossible to resume)."""
    if isinstance(value, dict):
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    return float(value) if value in ("nan", "inf", "-inf") else value


def write_json(path, obj) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    write_atomic(path, json.dumps(_jsonable(obj), indent=2, ensure_ascii=False))


def write_atomic(path, text: str) -> None:
    """Replace a file's text atomically (temporary file, then rename): a crash leaves the old text or the new."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---- 4. Math shared by stages ------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is true (padding never counts). dim=None: over all masked elements."""
    values = values.masked_fill(~mask.bool(), 0)  # not values * mask: a NaN in the padding must not leak in
    mask = mask.to(values.dtype)
    if dim is None:
        return values.sum() / mask.sum().clamp(min=1)
    return values.sum(dim) / mask.sum(dim).clamp(min=1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Supervised cross-entropy on response tokens only (labels are -100 elsewhere): the mean over all response
    tokens of the batch of -log pi(y_t | x, y_<t). It is also PPO-Lagrangian's PTX term (REFERENCE section 3.8)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


# ---- 5. Training plumbing: loaders, optimizer, autocast ----------------------------------------------------


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


def torch_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype an option names; "auto" is bf16 on GPU (the paper's setting) and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise SystemExit(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return dtypes[name]


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


def no_sync_unless(sync: bool, *models):
    """A context in which the DDP models do not all-reduce gradients (a non-final micro-batch of gradient
    accumulation), unless `sync`; a no-op for models that are not DDP-wrapped."""
    stack = contextlib.ExitStack()
    if not sync:
        for model in models:
            if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                stack.enter_context(model.no_sync())
    return stack


def autocast(device, dtype: torch.dtype):
    """Forward (and backward) in `dtype` over fp32 weights; a no-op for fp32."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


def quiet_transformers() -> None:
    """No per-load progress bars or warnings from transformers (our own tqdm bars say what happens)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


_NOTICES: set[str] = set()


def notice_once(message: str, verbose: bool = True) -> None:
    """Print a notice about what was done to the user's model or data, once per process (on stderr)."""
    if verbose and message not in _NOTICES:
        _NOTICES.add(message)
        print(f"note: {message}", file=sys.stderr)


def get_tokenizer(processor):
    """The tokenizer of a processor (a text model's processor is its tokenizer)."""
    return getattr(processor, "tokenizer", processor)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---- 6. Checkpoints (atomic, exact resume) and the non-finite guard ----------------------------------------


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


def save_model(model: nn.Module, path, processor=None, state_dict: dict | None = None) -> None:
    """A policy or a score model in Hugging Face format (safetensors), with its processor. state_dict: the weights
    to write instead of the model's own (a sharded model's full_state)."""
    from modeling import ScoreModel  # modeling imports this module

    model = getattr(model, "module", model)  # DDP
    if isinstance(model, ScoreModel):
        model.save_pretrained(str(path), processor, state_dict=state_dict)
    else:
        model.save_pretrained(str(path), safe_serialization=True, state_dict=state_dict)
        if processor is not None:
            processor.save_pretrained(str(path))


def save_merged(model: nn.Module, path, processor=None) -> None:
    """--merge_lora: a LoRA model with its adapter merged into full weights (in the base's dtype), in Hugging Face
    format. Call it last: a policy's peft wrapper is merged in place."""
    from modeling import PolicyView, ScoreModel

    model = getattr(model, "module", model)  # DDP
    if isinstance(model, PolicyView):  # an adapter on a shared base: merge it alone (the base is not used after)
        merged = model.base.model.merge_and_unload(adapter_names=[model.adapter])
    else:
        merged = model.merged() if isinstance(model, ScoreModel) else model.merge_and_unload()
    save_model(merged, path, processor)


def save_checkpoint(output_dir, step: int, models: dict, optimizers: dict, trainer_state: dict, processor=None,
                    keep_last: int = 2, rank: int = 0) -> Path:
    """Write checkpoint-<step> atomically and keep the newest `keep_last` ones. Call it on every rank: rank 0
    writes (with every rank's RNG state), the others wait for it, and an error on rank 0 (non-finite weights, a
    full disk) stops every rank with its message instead of leaving them waiting.
    models: name -> module; optimizers: name -> (optimizer, scheduler)."""
    final = Path(output_dir) / CHECKPOINT_DIR / f"{CHECKPOINT_PREFIX}{step:08d}"
    rng_states = gather_objects(rng_state())
    # sharded models (--fsdp): every rank sends its shards, rank 0 writes full weights and optimizer states
    full = {name: full_state(model, optimizers[name][0] if name in optimizers else None)
            for name, model in models.items() if is_sharded(model)}
    error = None
    if rank == 0:
        try:
            _write_checkpoint(final, step, models, optimizers, trainer_state, processor, keep_last, rng_states, full)
        except Exception as e:  # re-raised below, after every rank has heard of it
            error = e
    failure = broadcast_object(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    if failure is not None:
        kind, message = failure
        raise (NonFiniteError if kind == "NonFiniteError" else RuntimeError)(
            f"rank 0 could not write checkpoint {step}: {kind}: {message}")
    return final


def _write_checkpoint(final: Path, step: int, models: dict, optimizers: dict, trainer_state: dict, processor,
                      keep_last: int, rng_states: list, full: dict | None = None) -> None:
    import shutil

    full = full or {}  # name -> (full weights, full optimizer state) of the sharded models
    root = final.parent
    tmp = final.with_name(final.name + ".tmp")
    for name, model in models.items():
        finite = (all(torch.isfinite(v).all() for v in full[name][0].values() if v.dtype.is_floating_point)
                  if name in full else all_finite(getattr(model, "module", model)))
        if not finite:
            raise NonFiniteError(f"refusing to checkpoint step {step}: {name} holds non-finite weights")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, model in models.items():
        save_model(model, tmp / name, processor, full[name][0] if name in full else None)
    # a sharded model's optimizer state is keyed by parameter name ("by_name"), any other's by position
    torch.save({name: {"optimizer": full[name][1] if name in full else opt.state_dict(), "by_name": name in full,
                       "scheduler": sched.state_dict()}
                for name, (opt, sched) in optimizers.items()}, tmp / "optimizers.pt")
    torch.save({"ranks": rng_states}, tmp / "rng.pt")  # one RNG state per rank, in rank order
    write_json(tmp / "trainer_state.json", {"step": step, **trainer_state})  # last: a .tmp holding it is complete
    # Rewriting a step (the final save on a save step, a finished run resumed): the old folder is renamed aside, not
    # deleted in place, so that a crash at any moment leaves one complete checkpoint of this step (checkpoints()).
    replaced = final.with_name(final.name + ".old")
    if final.exists():
        if replaced.exists():
            shutil.rmtree(replaced)
        os.replace(final, replaced)
    os.replace(tmp, final)
    shutil.rmtree(replaced, ignore_errors=True)
    for old in checkpoints(root.parent)[:-keep_last]:
        for suffix in ("", ".tmp", ".old"):  # every folder of that step
            shutil.rmtree(old.with_name(old.name.split(".")[0] + suffix), ignore_errors=True)


def checkpoints(output_dir) -> list[Path]:
    """The complete checkpoints of a run's output folder, oldest first: checkpoint-<step> folders holding
    trainer_state.json (written last). Where a crash came between the two renames of a rewrite (no checkpoint-<step>,
    but its .old), the step's new folder (.tmp) if complete, else the previous one (.old). A .tmp alone is a write
    that never finished."""
    found = {}
    for path in (Path(output_dir) / CHECKPOINT_DIR).glob(f"{CHECKPOINT_PREFIX}*"):
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)(\.tmp|\.old)?", path.name)
        if match and (path / "trainer_state.json").is_file():
            found.setdefault(int(match.group(1)), {})[match.group(2) or ""] = path
    done = []
    for step in sorted(found):
        variants = found[step]
        if "" in variants or ".old" in variants:
            done.append(variants.get("") or variants.get(".tmp") or variants[".old"])
    return done


def publish_model(checkpoint, name: str, dest) -> None:
    """Put the model that checkpoint/<name> holds into `dest` (the run's output folder) without writing it a second
    time: every file is hard-linked (same file system, no extra disk or time) or else copied. Other files in `dest`
    (args.json, metrics.jsonl, the model card) are left alone."""
    import shutil

    source, dest = Path(checkpoint) / name, Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.iterdir()):
        if file.is_file():
            target = dest / file.name
            target.unlink(missing_ok=True)
            try:
                os.link(file, target)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(file, target)


def find_checkpoint(resume_from: str, output_dir) -> Path | None:
    """--resume_from: '' = start fresh; 'auto' = the newest complete checkpoint in output_dir (or fresh if none);
    otherwise a checkpoint folder, which must exist."""
    done = checkpoints(output_dir)
    if not resume_from:
        if done:  # its checkpoints would be pruned with ours, and a later --resume_from auto would pick the old run
            raise SystemExit(f"--output_dir {output_dir} holds checkpoints of an earlier run (newest: "
                             f"{done[-1].name}): continue it with --resume_from auto, or give a new or empty "
                             "--output_dir")
        return None
    if resume_from == "auto":
        return done[-1] if done else None
    path = Path(resume_from)
    if not (path / "trainer_state.json").is_file():
        raise SystemExit(f"--resume_from {resume_from}: not a complete checkpoint (no trainer_state.json)")
    return path


def load_checkpoint(path, optimizers: dict, models: dict | None = None) -> dict:
    """Restore optimizer and scheduler states and the RNG states; return trainer_state. (Models are loaded by the
    caller from path/<name> through the usual from_pretrained.) Call it last, right before the loop resumes.
    models: name -> model, needed for a sharded model (--fsdp) or a checkpoint written by one."""
    path = Path(path)
    # On the CPU and memory-mapped: a DDP rank's CUDA states would otherwise all land on cuda:0 (where rank 0 saved
    # them), and every FSDP rank would hold all the full states at once; each optimizer then takes what it needs.
    states = torch.load(path / "optimizers.pt", weights_only=True, map_location="cpu", mmap=True)
    for name, (opt, sched) in optimizers.items():
        model = (models or {}).get(name)
        if name not in states:
            raise SystemExit(f"{path}: holds no optimizer state for {name} (it has {', '.join(states)}): a checkpoint "
                             "of another stage?")
        if states[name].get("by_name"):  # written by a sharded run: full, keyed by parameter name
            load_full_optimizer_state(model, opt, states[name]["optimizer"])
        elif model is not None and is_sharded(model):
            raise SystemExit(f"{path}: written without --fsdp; resume it without --fsdp (its optimizer states are "
                             "not keyed by parameter name)")
        else:
            try:
                opt.load_state_dict(states[name]["optimizer"])
            except ValueError as e:  # another model's parameter groups
                raise SystemExit(f"{path}: its {name} optimizer state does not fit this run's model ({e}): a "
                                 "checkpoint of another stage or model?")
        sched.load_state_dict(states[name]["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    ranks = rng["ranks"] if "ranks" in rng else [rng]  # (a checkpoint of an older version holds rank 0's only)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    if len(ranks) != world_size:
        print(f"warning: {path} was written by {len(ranks)} rank(s), resuming on {world_size}: the random streams "
              "cannot continue exactly (the run goes on, but not bit-identical to an uninterrupted one)",
              file=sys.stderr)
    set_rng_state(ranks[min(rank, len(ranks) - 1)])
    return _from_jsonable(json.loads((path / "trainer_state.json").read_text()))


def resume_state(checkpoint, optimizers: dict, fresh: dict, log: RunLog, rank: int = 0,
                 models: dict | None = None) -> dict:
    """The trainer state a loop starts from: `fresh` for a new run; on resume the checkpoint's, with optimizers,
    schedulers and RNG restored and metrics.jsonl cut back to what was logged up to it. Call it last, right
    before the loop. models: name -> trained model (see load_checkpoint)."""
    if checkpoint is None:
        return fresh
    state = load_checkpoint(checkpoint, optimizers, models)
    log.truncate(state["metrics_lines"])
    if rank == 0:
        print(f"resumed from {checkpoint} at step {state['step']}")
    return state


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
