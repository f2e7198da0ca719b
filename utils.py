"""Small helpers that two or more stages share: seeding, the masked mean, the SFT cross-entropy, the training data
loader that resumes mid-epoch, dtypes and autocast, JSON files, one-time notices. Imports no project module (the
layers: docs/architecture.md); the plumbing of training runs is in infra/, the models in modeling.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def seed_everything(seed: int, rank: int = 0) -> None:
    """Per-rank seeds so that ranks draw different samples but a run is reproducible."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


# ---- Math shared by stages ------------------------------------------------------------------------------


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Supervised cross-entropy on response tokens only (labels are -100 elsewhere): the mean over all response
    tokens of the batch of -log pi(y_t | x, y_<t). It is also PPO-Lagrangian's PTX term (REFERENCE section 3.8)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


# ---- Training plumbing: loaders, dtypes, autocast --------------------------------------------------------


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


def torch_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype an option names; "auto" is bf16 on GPU (the paper's setting) and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise SystemExit(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return dtypes[name]


def autocast(device, dtype: torch.dtype):
    """Forward (and backward) in `dtype` over fp32 weights; a no-op for fp32."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


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
