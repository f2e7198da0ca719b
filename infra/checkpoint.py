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
from infra.parallel import (broadcast_object, distributed, full_state, gather_objects, is_sharded,
                            load_full_optimizer_state)
from infra.runlog import RunLog
from lora import PolicyView
from modeling import ScoreModel
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


def save_model(model: nn.Module, path, processor=None, state_dict: dict | None = None) -> None:
    """A policy or a score model in Hugging Face format (safetensors), with its processor. state_dict: the weights
    to write instead of the model's own (a sharded model's full_state)."""
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
    model = getattr(model, "module", model)  # DDP
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
