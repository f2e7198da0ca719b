"""Checkpoints: atomic, exact resume (models, optimizers, schedulers, RNG states, trainer state), the newest K kept,
the final one published as the output models; merged LoRA export."""

from __future__ import annotations

import json
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from infra.optim import NonFiniteError, all_finite
from infra.parallel import (any_rank, broadcast_object, distributed, gather_objects, is_sharded,
                            load_full_optimizer_state)
from infra.runlog import RunLog
from lora import PolicyView
from modeling import ScoreModel, is_quantized, load_policy
from utils import _from_jsonable, write_json

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


def save_model(model: nn.Module, path, processor=None) -> None:
    """A policy or a score model in Hugging Face format (safetensors), with its processor. (A sharded model:
    save_sharded, on every rank.)"""
    model = getattr(model, "module", model)  # DDP
    if isinstance(model, ScoreModel):
        model.save_pretrained(str(path), processor)
    else:
        model.save_pretrained(str(path), safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(str(path))


# ---- sharded models (--fsdp): full weights written one tensor at a time --------------------------------------
# Gathering a whole sharded model on rank 0 before writing it (torch's full_state_dict) holds every trained role's
# fp32 weights AND AdamW states on one host at once: about 250 GB of host RAM for 7B PPO-Lag. Instead every rank
# gathers one tensor at a time (a collective, in the same order everywhere) and rank 0 writes a safetensors shard
# whenever SHARD_BYTES have been gathered: rank 0's host holds at most one shard plus one tensor.

SHARD_BYTES = 2 * 1024**3


def _gathered(tensor: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """A DTensor's full value, on the CPU (a collective: every rank calls it, in the same order); a plain tensor
    (a replicated buffer) as it is. keep=False (the ranks that do not write): joins the gather, keeps nothing."""
    from torch.distributed.tensor import DTensor

    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return full.detach().cpu() if keep else None


def _shard_groups(nbytes: dict, max_bytes: int) -> list[list[str]]:
    """Consecutive keys grouped into shards of at most max_bytes each (a bigger tensor gets a shard of its own)."""
    groups, held = [[]], 0
    for key, n in nbytes.items():
        if groups[-1] and held + n > max_bytes:
            groups.append([])
            held = 0
        groups[-1].append(key)
        held += n
    return groups if groups[-1] else []


def saved_names(model: nn.Module, state_dict: dict) -> dict:
    """state-dict key -> the name save_pretrained writes it under: tied weights once, transformers' weight
    conversions reverted (LLaVA writes `language_model.model.*` for the module's `model.language_model.*`). Found
    from shapes on the meta device, each key alone; a conversion that is not a one-to-one renaming is refused."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state_dict.items()}
    kept = remove_tied_weights_from_state_dict(meta, model)
    names = {}
    for key in kept:
        renamed = list(revert_weight_conversion(model, {key: meta[key]}))
        if len(renamed) != 1:
            raise SystemExit(f"cannot stream the weights of {type(model).__name__}: its saved format merges or splits "
                             f"{key!r} (a transformers weight conversion); save it without --fsdp")
        names[key] = renamed[0]
    if len(set(names.values())) != len(names):
        raise SystemExit(f"cannot stream the weights of {type(model).__name__}: two weights map to one saved name")
    return names


class RankZeroWriter:
    """Rank 0's writes during a save that every rank takes part in: the first error is kept (save_checkpoint raises
    it once every rank has finished gathering) and the writes after it are skipped, so that rank 0 still joins every
    gather and no rank waits forever. On the other ranks (active=False) every write is skipped."""

    def __init__(self, active: bool):
        self.active, self.error = active, None

    def __call__(self, write, *args, **kwargs) -> None:
        if self.active:
            try:
                write(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - raised by save_checkpoint, on every rank
                self.error, self.active = e, False


def stream_weights(model: nn.Module, state_dict: dict, path, writer: RankZeroWriter,
                   max_shard_bytes: int = SHARD_BYTES) -> int:
    """Write a Hugging Face model's full weights (`state_dict`: its state dict, sharded DTensors or plain tensors)
    and its config into `path` as save_pretrained would (same names, model.safetensors or numbered shards + an
    index), gathering one tensor at a time. Call it on every rank; `writer` writes on rank 0 only. Returns the
    most bytes of gathered weights rank 0's host held at once."""
    from safetensors.torch import save_file

    path = Path(path)
    names = saved_names(model, state_dict)
    nbytes = {k: state_dict[k].numel() * state_dict[k].element_size() for k in names}
    groups = _shard_groups(nbytes, max_shard_bytes)
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    peak = 0
    writer(path.mkdir, parents=True, exist_ok=True)
    for group, file in zip(groups, files):
        shard = {names[key]: _gathered(state_dict[key], writer.active) for key in group}
        if writer.active:  # (the other ranks held nothing)
            shard = {name: t.contiguous() for name, t in shard.items()}
            peak = max(peak, sum(t.numel() * t.element_size() for t in shard.values()))
            writer(save_file, shard, str(path / file), metadata={"format": "pt"})
        del shard
    if len(files) > 1:
        weight_map = {names[key]: file for group, file in zip(groups, files) for key in group}
        writer(write_json, path / "model.safetensors.index.json",
               {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": dict(sorted(weight_map.items()))})
    # what save_pretrained records beside the weights (FSDP2 renames the class FSDP<name>)
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    writer(model.config.save_pretrained, str(path))
    if model.can_generate():
        writer(model.generation_config.save_pretrained, str(path))
    return peak


def save_sharded(model: nn.Module, path, processor=None, writer: RankZeroWriter | None = None) -> int:
    """save_model for a sharded model (--fsdp): call it on every rank; `writer` (default: rank 0's) writes.
    Returns the most bytes of gathered weights rank 0's host held at once (stream_weights)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    writer = writer or RankZeroWriter(dist.get_rank() == 0)
    weights = get_model_state_dict(model)  # this rank's shards, keyed by parameter name: nothing gathered yet
    if isinstance(model, ScoreModel):
        part = lambda prefix: {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        peak = stream_weights(model.backbone, part("backbone."), path, writer)
        head = {k: _gathered(v, writer.active) for k, v in part("score_head.").items()}
        writer(model.save_pretrained, str(path), processor, head=head)
        return peak
    peak = stream_weights(model, weights, path, writer)
    if processor is not None:
        writer(processor.save_pretrained, str(path))
    return peak


def stream_optimizer_state(model: nn.Module, optimizer, folder, name: str, writer: RankZeroWriter,
                           max_shard_bytes: int = SHARD_BYTES) -> dict:
    """A sharded model's AdamW state, full and keyed by parameter name, written one tensor at a time into
    `folder`/optimizer-<name>-<k>.pt files of at most max_shard_bytes each. Returns what optimizers.pt records for
    it: the parameter groups and the files (load_checkpoint puts them together). Call it on every rank."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sharded = get_optimizer_state_dict(model, optimizer)  # this rank's shards, keyed by parameter name
    nbytes = {fqn: sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
              for fqn, state in sharded["state"].items()}
    files = []
    for index, group in enumerate(_shard_groups(nbytes, max_shard_bytes)):
        chunk = {fqn: {k: _gathered(v, writer.active) if torch.is_tensor(v) else v
                       for k, v in sharded["state"][fqn].items()} for fqn in group}
        files.append(f"optimizer-{name}-{index + 1:05d}.pt")
        writer(torch.save, chunk, Path(folder) / files[-1])
        del chunk
    return {"param_groups": sharded["param_groups"], "state_files": files}


def sharded_weights_finite(model: nn.Module) -> bool:
    """Every rank's shards finite (one all-reduce, nothing gathered)."""
    from torch.distributed.tensor import DTensor

    local = all(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()
                for p in model.parameters() if p.dtype.is_floating_point)
    return not any_rank(not local)


def save_merged(model: nn.Module, path, processor=None, adapter_folder=None,
                dtype: torch.dtype = torch.bfloat16) -> None:
    """--merge_lora: a LoRA model with its adapter merged into full weights, in Hugging Face format. Call it last: a
    policy's peft wrapper is merged in place (in the base's dtype).

    On a quantized base (--quantization) an in-place merge would re-quantize the merged weights: lossy, and not the
    full weights a user expects from an export. The merge is then made from the adapter as saved (adapter_folder)
    on the base loaded again in full precision, in `dtype` (the run's compute dtype), on the CPU: the GPU's memory
    is not touched, the host holds one model in `dtype` (about 14 GB for a 7B model in bf16)."""
    model = getattr(model, "module", model)  # DDP
    if is_quantized(model.base.model if isinstance(model, PolicyView) else model):
        if adapter_folder is None:
            raise SystemExit("--merge_lora on a quantized base: the merge is made from the saved adapter on a "
                             "full-precision base, and no adapter folder was given")
        name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
        if isinstance(model, ScoreModel):
            merged = ScoreModel.from_pretrained(str(adapter_folder), name, "cpu")[0].merged()
        else:
            merged = load_policy(str(adapter_folder), name, "cpu")[0]  # base + adapter, merged (load_policy)
        save_model(merged, path, processor)
        return
    if isinstance(model, PolicyView):  # an adapter on a shared base: merge it alone (the base is not used after)
        # peft replaces each modules_to_save wrapper (the trained projector) by the ACTIVE adapter's copy, whatever
        # adapter_names says: make the actor's adapter the active one first (a critic's may be, after its update)
        with model.base.active(model.adapter):
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
    tmp = final.with_name(final.name + ".tmp")
    rng_states = gather_objects(rng_state())
    sharded = {name: model for name, model in models.items() if is_sharded(model)}
    for name, model in sharded.items():  # every rank says so, before anything is written
        if not sharded_weights_finite(model):
            raise NonFiniteError(f"refusing to checkpoint step {step}: {name} holds non-finite weights")
    error = None
    if rank == 0 and sharded:
        try:
            _fresh_folder(tmp)
        except Exception as e:  # re-raised below, after every rank has heard of it
            error = e
    # sharded models (--fsdp): every rank gathers one tensor at a time, rank 0 writes
    writer, streamed = RankZeroWriter(rank == 0 and error is None), {}
    for name, model in sharded.items():
        save_sharded(model, tmp / name, processor, writer)
        if name in optimizers:
            streamed[name] = stream_optimizer_state(model, optimizers[name][0], tmp, name, writer)
    error = error or writer.error
    if rank == 0 and error is None:
        try:
            _write_checkpoint(final, step, models, optimizers, trainer_state, processor, keep_last, rng_states,
                              streamed)
        except Exception as e:
            error = e
    failure = broadcast_object(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    if failure is not None:
        kind, message = failure
        raise (NonFiniteError if kind == "NonFiniteError" else RuntimeError)(
            f"rank 0 could not write checkpoint {step}: {kind}: {message}")
    return final


def _fresh_folder(folder: Path) -> None:
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def _write_checkpoint(final: Path, step: int, models: dict, optimizers: dict, trainer_state: dict, processor,
                      keep_last: int, rng_states: list, streamed: dict | None = None) -> None:
    """Rank 0 completes <final>.tmp (the sharded models are in it already: `streamed`, name -> what their optimizer
    state's files are) and renames it <final>."""
    import shutil

    streamed = streamed or {}
    root = final.parent
    tmp = final.with_name(final.name + ".tmp")
    for name, model in models.items():
        if not is_sharded(model) and not all_finite(getattr(model, "module", model)):  # (sharded: checked before)
            raise NonFiniteError(f"refusing to checkpoint step {step}: {name} holds non-finite weights")
    if not any(is_sharded(model) for model in models.values()):  # (else save_checkpoint made it, to stream into)
        _fresh_folder(tmp)
    for name, model in models.items():
        if not is_sharded(model):
            save_model(model, tmp / name, processor)
    # a sharded model's optimizer state is keyed by parameter name ("by_name"), in files of its own; any other's
    # by position, in optimizers.pt
    torch.save({name: {"optimizer": streamed[name] if name in streamed else opt.state_dict(),
                       "by_name": name in streamed, "scheduler": sched.state_dict()}
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
            full = states[name]["optimizer"]
            if "state_files" in full:  # in files of at most SHARD_BYTES (stream_optimizer_state)
                state = {}
                for file in full["state_files"]:
                    state.update(torch.load(path / file, weights_only=True, map_location="cpu", mmap=True))
                full = {"state": state, "param_groups": full["param_groups"]}
            load_full_optimizer_state(model, opt, full)
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
