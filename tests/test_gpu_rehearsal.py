"""scripts/gpu_rehearsal.py --cpu_smoke: the GPU rehearsal's code path (random models of the LLaVA and Qwen2-VL
families, LoRA reward and cost models, PPO-Lag on one shared base in full precision and on a 4-bit base, each
phase measured next to the memory plan, --merge_lora exported and reloaded) at tiny size on a CPU, as CI runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_cpu_smoke_rehearsal_prints_one_table_and_the_merges_reload(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "rehearsal"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_rehearsal.py"), "--cpu_smoke",
                           "--output_dir", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "rehearsal.md").read_text()
    assert table.count("| generation |") == 4 and table in done.stdout
    runs = json.loads((out / "rehearsal.json").read_text())["runs"]
    assert [(r["model"], r["base"]) for r in runs] == [("llava-1.5-7b-hf", "fp32"), ("llava-1.5-7b-hf", "4bit"),
                                                       ("Qwen2-VL-7B-Instruct", "fp32"), ("Qwen2-VL-7B-Instruct", "4bit")]
    for run in runs:
        assert run["tokens_per_s"] > 0 and run["step_s"] > 0
        for phase in ("generation", "scoring", "update"):
            p = run["phases"][phase]
            # bytes, not timings: the plan's phase against what the phase held (weights, optimizer states and its
            # own allocations), on tiny models whose fixed costs the plan does not model finely
            assert 0.4 <= p["peak"] / p["planned"] <= 1.6, (run["model"], run["base"], phase, p)
    merges = [r["merge"] for r in runs if "merge" in r]
    assert len(merges) == 2  # LLaVA's two runs (--merge_models)
    for merge in merges:  # the 4-bit run's export too: full weights, equal to the adapter on its full base
        assert merge["full_weights"] and merge["max_logit_diff"] <= 1e-4
    assert not (out / "llava-1.5-7b-hf").exists()  # each model's folders are deleted once rehearsed
