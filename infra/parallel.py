"""torchrun: ranks and devices, the process group's life (init_distributed, destroy_distributed), cross-rank means and
gathers, DDP helpers, and FSDP2 sharding (--fsdp). One process without torchrun is world size 1: every helper is
then a no-op."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from modeling import keep_image_path_in_graph


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


def shard_model(model: nn.Module, device, compute_dtype: torch.dtype | None = None, frozen: bool = False) -> nn.Module:
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
    state dict holds) as they are; a freshly initialised score head is thus rank 0's on every rank, as DDP does.
    frozen (a role with no backward: reference, reward and cost models): the root unit reshards after each forward
    too, instead of staying gathered for a backward that never comes."""
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
    if frozen:  # FSDP2 keeps the root unit gathered after a forward, for the backward that a frozen role never has
        model.set_reshard_after_forward(True, recurse=False)
        model._frozen_root = True  # (modeling.unsharded restores this after gathering the model for a generate)
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

    keep_image_path_in_graph(model)
    if fsdp:
        return shard_model(model, device, compute_dtype)
    return nn.parallel.DistributedDataParallel(model) if distributed() else model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Give a (sharded or whole) model's optimizer a full, name-keyed state (checkpoint.stream_optimizer_state):
    each rank keeps its shard."""
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


def no_sync_unless(sync: bool, *models):
    """A context in which the DDP models do not all-reduce gradients (a non-final micro-batch of gradient
    accumulation), unless `sync`; a no-op for models that are not DDP-wrapped."""
    stack = contextlib.ExitStack()
    if not sync:
        for model in models:
            if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                stack.enter_context(model.no_sync())
    return stack
