"""Two ranks under torchrun (gloo, CPU), the way a user runs on GPUs with NCCL: identical weights on every rank
(DDP with PTX and gradient accumulation), exact resume with per-rank RNG states, an error on rank 0 stopping every
rank, and collectives that put their tensors where the backend takes them."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from infra import checkpoint, cli, parallel
from infra.checkpoint import find_checkpoint
from conftest import ROOT
from test_reliability import ENV, PPO_WEIGHTS, assert_identical_runs, ppo_args, score_models  # noqa: F401

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "tests/harness.py"]


def torchrun(argv, harness=(), timeout=600):
    """argv = [script.py, --options...] on 2 ranks; returns the CompletedProcess (output on stdout). A run that
    succeeded must also have freed its process group on both ranks (no gloo thread left after the teardown: see
    test_destroy_process_group_frees_the_default_group)."""
    result = subprocess.run(TORCHRUN + list(harness) + [str(a) for a in argv], cwd=ROOT, env=ENV, timeout=timeout,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode == 0:
        assert_group_freed(result.stdout)
    return result


def assert_group_freed(stdout: str) -> None:
    """Both ranks printed (harness.report_gloo_threads) that no thread of their gloo group outlived the teardown."""
    if Path("/proc/self/task").is_dir():
        for rank in (0, 1):
            assert f"harness: rank {rank} gloo threads after teardown: []" in stdout, stdout[-3000:]


def two_rank_args(tiny_models, toy_world_dir, score_models, out, **extra):
    # 4 prompts per rank, minibatches of 2, accumulation 2: one optimizer step per PPO step, two micro-batches
    options = {"max_steps": 4, "gradient_accumulation_steps": 2, **extra}
    return ppo_args(tiny_models, toy_world_dir, score_models, out, **options)[1:]


def descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children += [int(c) for c in (task / "children").read_text().split()]
    return children + [d for c in children for d in descendants(c)]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (as a crash or an OOM kill of the node would)."""
    for p in [pid] + descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def ranks_agree(out: Path, steps) -> None:
    for step in steps:
        rank0 = json.loads((out / f"weights_rank0_step{step}.json").read_text())
        rank1 = json.loads((out / f"weights_rank1_step{step}.json").read_text())
        for model in rank0:
            differ = [name for name in rank0[model] if rank0[model][name] != rank1[model][name]]
            assert not differ, f"step {step}: {model} differs across ranks in {differ[:3]}"


@pytest.fixture(scope="module")
def two_rank_reference(tiny_models, toy_world_dir, score_models, tmp_path_factory):
    """An uninterrupted 2-rank PPO-Lag run with PTX and gradient accumulation, weights digested on every rank."""
    out = tmp_path_factory.mktemp("two_ranks")
    result = torchrun(["train_ppo_lag.py"] + two_rank_args(tiny_models, toy_world_dir, score_models, out),
                      harness=["--dump_weights"])
    assert result.returncode == 0, result.stdout[-3000:]
    return out


def test_ddp_with_ptx_and_accumulation_keeps_ranks_identical(two_rank_reference):
    ranks_agree(two_rank_reference, range(1, 5))
    records = [json.loads(line) for line in open(two_rank_reference / "metrics.jsonl")]
    assert [r["optimizer_steps"] for r in records] == [1, 2, 3, 4]
    assert all(r["ptx_loss"] > 0 for r in records)


# slow (~13 s): DDP with PTX (two_rank_reference) stays in the default suite
@pytest.mark.slow
def test_ddp_without_ptx_keeps_ranks_identical(tiny_models, toy_world_dir, score_models, tmp_path):
    argv = two_rank_args(tiny_models, toy_world_dir, score_models, tmp_path, max_steps=2, ptx_data="")
    result = torchrun(["train_ppo_lag.py"] + argv, harness=["--dump_weights"])
    assert result.returncode == 0, result.stdout[-3000:]
    ranks_agree(tmp_path, [1, 2])


def test_a_nan_on_one_rank_skips_the_update_on_every_rank(tiny_models, toy_world_dir, score_models, tmp_path):
    """Rank 1 alone sees a NaN actor loss at step 2: both ranks must skip that update, or their weights part."""
    argv = two_rank_args(tiny_models, toy_world_dir, score_models, tmp_path, max_steps=3, ptx_data="")
    result = torchrun(["train_ppo_lag.py"] + argv, harness=["--dump_weights", "--nan_on_rank", "1", "actor_loss",
                                                            "2", "2"])
    assert result.returncode == 0, result.stdout[-3000:]
    ranks_agree(tmp_path, [1, 2, 3])
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 1]  # one accumulated update, skipped once


# slow (~15 s): resume on one rank, and FSDP's two-rank resume, stay in the default suite
@pytest.mark.slow
def test_two_rank_resume_after_sigkill_is_bit_identical(tiny_models, toy_world_dir, score_models,
                                                        two_rank_reference, tmp_path):
    argv = ["train_ppo_lag.py"] + two_rank_args(tiny_models, toy_world_dir, score_models, tmp_path)
    process = subprocess.Popen(TORCHRUN + [str(a) for a in argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "checkpoint-00000002").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before checkpoint 2"
        time.sleep(0.05)
    kill_tree(process.pid)  # torchrun and both ranks (which torchrun starts in sessions of their own)
    process.wait()
    assert not (tmp_path / "actor").exists()
    assert find_checkpoint("auto", tmp_path).name == "checkpoint-00000002"  # nobody went on after the kill
    resumed = torchrun(argv + ["--resume_from=auto"])
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-3000:]
    assert_identical_runs(two_rank_reference, tmp_path, PPO_WEIGHTS)
    assert (json.loads((two_rank_reference / "lambda.json").read_text())
            == json.loads((tmp_path / "lambda.json").read_text()))


# slow (~12 s): the one-line error stays covered by the default suite on one rank (test_a_bad_row_stops_a_stage_...)
@pytest.mark.slow
def test_an_error_on_rank_0_stops_every_rank_with_its_message(tiny_models, toy_world_dir, score_models, tmp_path):
    argv = ["train_ppo_lag.py"] + two_rank_args(tiny_models, toy_world_dir, score_models, tmp_path)
    start = time.time()
    result = torchrun(argv, harness=["--fail_save", "2"], timeout=300)
    assert result.returncode != 0
    assert time.time() - start < 240  # nobody waits for a barrier rank 0 never reaches
    # rank 0 raises the error itself; rank 1 raises with rank 0's message
    assert "OSError: injected: no space left while writing checkpoint 2" in result.stdout
    assert "rank 0 could not write checkpoint 2: OSError: injected" in result.stdout
    assert not (tmp_path / "checkpoints" / "checkpoint-00000002").exists()


# ---- collectives: on the backend's device, and only through the helpers in infra/parallel.py ------------------


def test_collective_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert parallel.collective_device() == torch.device("cuda", 3)  # NCCL takes CUDA tensors only
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    assert parallel.collective_device() == torch.device("cpu")


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "reduce",
               "gather", "scatter", "barrier", "all_to_all", "reduce_scatter"}


def test_every_collective_goes_through_the_helpers():
    """No script calls torch.distributed collectives itself (the helpers place tensors on collective_device()),
    and inside infra/parallel.py each one sits in a helper that moves its tensor there first."""
    sources = [p for p in ROOT.glob("*.py")] + list((ROOT / "data").glob("*.py")) + list((ROOT / "evaluation").glob("*.py"))
    sources += list((ROOT / "infra").glob("*.py"))
    for path in sources:
        tree = ast.parse(path.read_text())
        for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)] + [tree]:
            calls = [c for c in ast.walk(func) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
                     and c.func.attr in COLLECTIVES and getattr(c.func.value, "id", "") == "dist"]
            if not calls or isinstance(func, ast.Module):
                continue
            assert path.name == "parallel.py", f"{path.name}:{calls[0].lineno} calls dist.{calls[0].func.attr} directly"
            source = ast.get_source_segment(path.read_text(), func)
            tensor_collective = any(c.func.attr in ("all_reduce", "all_gather") for c in calls)
            assert not tensor_collective or "collective_device()" in source, f"infra.parallel.{func.name} does not place its tensor"


def test_resume_loads_optimizer_states_saved_on_a_gpu_onto_the_cpu(tmp_path):
    """A DDP checkpoint holds rank 0's AdamW states tagged cuda:0; without map_location every rank would put all of
    them on GPU 0 before its optimizer moves them (an out-of-memory there at 7B x 8 ranks; here, with no GPU, an
    error). The tag is forced here with a serialization hook, as torch.save writes it for CUDA tensors."""
    import torch.serialization as serialization

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    gpu_tag = lambda obj: "cuda:0" if getattr(obj, "device", None) == torch.device("cpu") else None
    serialization.register_package(1, gpu_tag, lambda obj, location: None)
    try:
        torch.save({"model": {"optimizer": optimizer.state_dict(), "by_name": False,
                              "scheduler": scheduler.state_dict()}}, tmp_path / "optimizers.pt")
    finally:
        serialization._package_registry[:] = [e for e in serialization._package_registry if e[1] is not gpu_tag]
    with pytest.raises(RuntimeError, match="CUDA"):  # the premise: the file asks for a GPU
        torch.load(tmp_path / "optimizers.pt", weights_only=True)
    torch.save({"ranks": [checkpoint.rng_state()]}, tmp_path / "rng.pt")
    (tmp_path / "trainer_state.json").write_text('{"step": 1}')
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh, lambda step: 1.0)
    checkpoint.load_checkpoint(tmp_path, {"model": (fresh, fresh_scheduler)})
    for param in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh.state[param][key], optimizer.state[param][key])
    assert fresh_scheduler.last_epoch == 1


def test_ranks_wait_for_each_other_longer_than_nccls_default(monkeypatch):
    """Rank 0 alone writes a checkpoint or loads a model (--fsdp) while the others wait in a collective: NCCL's
    10-minute default would abort them at 7B; the process group gets --dist_timeout_minutes (default 60)."""
    import datetime

    import train_sft

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    parallel.init_distributed(train_sft.Args().dist_timeout_minutes)
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=60)}


def test_a_data_error_on_another_rank_is_printed(monkeypatch, capsys):
    """A bad row met by rank 1 only (in its own batches) ends the run with its one-line message from rank 1, not
    silently (rank 0 may never see that row)."""
    from data.sources import DataError

    import train_sft

    def main(args):
        raise DataError("prompts.jsonl", 7, "image", "not found")

    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        cli.run_script(main, train_sft.Args, [])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error (rank 1): prompts.jsonl") and "row 7" in err and "image" in err, err


def test_lora_roles_on_two_ranks_stay_identical(tiny_models, toy_world_dir, score_models, tmp_path):
    """LoRA roles share bases and are not wrapped in DDP: their gradients are averaged by hand (infra.parallel.
    average_gradients). Each rank sees other prompts; without the average the adapters would part at step 1."""
    argv = two_rank_args(tiny_models, toy_world_dir, score_models, tmp_path, max_steps=2, ptx_data="", lora_r=4,
                         lora_alpha=8)
    result = torchrun(["train_ppo_lag.py"] + argv, harness=["--dump_weights"])
    assert result.returncode == 0, result.stdout[-3000:]
    ranks_agree(tmp_path, [1, 2])
    step1 = json.loads((tmp_path / "weights_rank0_step1.json").read_text())
    step2 = json.loads((tmp_path / "weights_rank0_step2.json").read_text())
    assert step1["actor"] != step2["actor"] and step1["reward_critic"] != step2["reward_critic"]  # they trained


# ---- batches without an image: every rank reduces the same gradients -------------------------------------------


def test_a_batch_without_an_image_gives_the_projector_a_zero_gradient(tiny_models):
    """keep_image_path_in_graph: on a text-only batch the trained projector gets gradient 0 instead of none (the
    output is bit-identical), so that a rank without an image reduces the same tensors as a rank with one; on a
    batch with an image, and without gradients, the hook does nothing."""
    from PIL import Image

    from data import collate, encode_example
    from modeling import forward_kwargs, keep_image_path_in_graph, load_policy
    from utils import get_tokenizer

    model, processor, family = load_policy(tiny_models["llava"])
    pad = get_tokenizer(processor).pad_token_id
    text = collate([encode_example(processor, family, "what is fire?", None, "hot.", 256)], pad)
    image = collate([encode_example(processor, family, "what is it?", Image.new("RGB", (32, 32), "red"), "red.", 256)],
                    pad)
    projector = list(model.model.multi_modal_projector.parameters())
    model.train()

    def logits_and_grads(batch):
        model.zero_grad(set_to_none=True)
        logits = model(**forward_kwargs(batch, family), use_cache=False).logits
        logits.float().square().mean().backward()
        return logits.detach(), [p.grad for p in projector]

    text_before, grads_before = logits_and_grads(text)
    image_before, image_grads_before = logits_and_grads(image)
    assert all(g is None for g in grads_before)  # the premise: no image, no gradient for the projector
    keep_image_path_in_graph(model)
    keep_image_path_in_graph(model)  # idempotent: one hook
    text_after, grads_after = logits_and_grads(text)
    # bit identity is the claim: the same model on the same batch in one process, the hook adding an exact zero
    assert torch.equal(text_after, text_before)
    assert all(g is not None and not g.any() for g in grads_after)
    image_after, image_grads_after = logits_and_grads(image)
    assert torch.equal(image_after, image_before)
    assert all(torch.equal(a, b) and a.any() for a, b in zip(image_grads_after, image_grads_before))
    with torch.no_grad():
        model(**forward_kwargs(text, family), use_cache=False)  # no gradient taken: nothing to add, no error


@pytest.mark.parametrize("fsdp", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["ddp", "fsdp"])  # fsdp: ~9 s
def test_two_ranks_train_on_rows_with_and_without_an_image(tiny_models, toy_world_dir, tmp_path, fsdp):
    """SFT on 2 ranks, one row each per step, every other row without its image: rank 0's batches have an image,
    rank 1's do not. Without keep_image_path_in_graph the projector's gradient exists on rank 0 only and gloo
    aborts the reduction ("Received data size doesn't match"; NCCL would hang). The run completes and the projector
    learns from rank 0's images."""
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in open(toy_world_dir / "sft" / "train.jsonl")][:4]
    for i, row in enumerate(rows):
        row["image"] = str(toy_world_dir / "sft" / row["image"])
        if i % 2:
            del row["image"]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["train_sft.py", f"--model_name_or_path={tiny_models['llava']}", f"--train_data={data}",
            "--per_device_batch_size=1", "--epochs=1", "--lr=1e-3", "--max_length=256", "--save_steps=0",
            "--logging_steps=1", "--eval_data=", f"--output_dir={out}", *(["--fsdp"] if fsdp else [])]
    result = torchrun(argv, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "doesn't match" not in result.stdout
    trained, initial = load_file(str(out / "model.safetensors")), load_file(f"{tiny_models['llava']}/model.safetensors")
    projector = [k for k in trained if "multi_modal_projector" in k]
    assert projector and any(not torch.equal(trained[k], initial[k]) for k in projector)


TEARDOWN_PROBE = '''
import dataclasses, os, sys
sys.path.insert(0, os.getcwd())
import torch
from infra import cli, parallel

@dataclasses.dataclass
class Args:
    pass

def main(args):
    rank, world_size, device = parallel.init_distributed()
    model = parallel.shard_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)), device)
    model(torch.ones(2, 4)).sum().backward()  # FSDP2's all-gathers and reduce-scatters ran over the default group

cli.run_script(main, Args, [])  # destroys the process group on the way out
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(f"rank {os.environ['RANK']} gloo threads after teardown: {sorted(t for t in threads if 'gloo' in t)}")
'''


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the thread names from /proc (Linux)")
def test_destroy_process_group_frees_the_default_group(tmp_path):
    """After run_script's teardown no thread of the gloo group may remain: a group that outlives
    destroy_process_group is freed during the interpreter's finalisation instead, where rank 0 aborted now and then
    ("terminate called without an active exception", SIGABRT after a run that did its work). Three holders, each
    one enough to keep the group's three threads (gloo_tcp_loop, 2x pt_gloo_runloop) alive here on both ranks,
    every run: torch.distributed.nn.functional's default arguments when imported after init_process_group, the
    device mesh of shard_model (which DTensor's caches keep alive), FSDP2's per-module state in reference cycles
    (see infra.parallel.destroy_distributed)."""
    probe = tmp_path / "teardown_probe.py"
    probe.write_text(TEARDOWN_PROBE)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(probe)], cwd=ROOT, env=ENV, timeout=300, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} gloo threads after teardown: []" in result.stdout, result.stdout[-3000:]
