"""No run prints bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" notice (issue 22)."""

import logging
import subprocess
import sys

from conftest import ROOT
from test_reliability import ENV
import modeling


def test_the_kernels_notice_is_dropped_and_nothing_else():
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    notice = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, modeling.BNB_KERNELS_NOTICE + ": %s",
                               ("No module named 'kernels'",), None)
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "another warning", (), None)
    assert not logger.filter(notice) and logger.filter(other)


def test_a_stage_without_quantization_does_not_print_it(tiny_models, toy_world_dir, tmp_path):
    argv = ["train_sft.py", f"--model_name_or_path={tiny_models['text']}",
            f"--train_data={toy_world_dir / 'sft' / 'train.jsonl'}", "--max_steps=1", "--per_device_batch_size=1",
            "--eval_data=", "--save_steps=0", f"--output_dir={tmp_path}"]
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "saved" in result.stdout and "gemm_4bit_forward" not in result.stdout
