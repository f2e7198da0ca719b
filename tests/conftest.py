"""Shared fixtures: tiny models of every family and a small toy world, built once per test session, offline."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers.utils import logging  # noqa: E402

logging.disable_progress_bar()
logging.set_verbosity_error()
torch.set_num_threads(1)

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "text")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """family -> directory of a tiny random model saved with save_pretrained."""
    from tiny_models import TinyArgs, build_tiny_models

    out = tmp_path_factory.mktemp("tiny_models")
    return {k: str(v) for k, v in build_tiny_models(TinyArgs(output_dir=str(out))).items()}


@pytest.fixture(scope="session")
def toy_world_dir(tmp_path_factory) -> Path:
    """A small toy world in the BeaverTails-V layout."""
    from data import toy_world

    out = tmp_path_factory.mktemp("toy")
    toy_world.generate(str(out), seed=0, train_pairs_per_category=40, eval_pairs_per_category=20, sft_examples=60)
    return out
