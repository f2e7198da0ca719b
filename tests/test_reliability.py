"""Reliability: exact resume after SIGKILL, atomic checkpoints, the non-finite guard (tiny models, subprocesses)."""

import json
import shutil
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from harness import nan_on_steps
from modeling import ScoreModel, load_policy
from infra.checkpoint import find_checkpoint
from infra.optim import all_finite

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def score_models(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("score_models")
    torch.manual_seed(0)
    for name in ("rm", "cm"):
        model, processor = ScoreModel.from_pretrained(tiny_models["llava"])
        model.save_pretrained(out / name, processor)
    return out


def ppo_args(tiny_models, toy_world_dir, score_models, output_dir, **extra):
    args = dict(actor_model_name_or_path=tiny_models["llava"], reward_model_name_or_path=score_models / "rm",
                cost_model_name_or_path=score_models / "cm", train_data=toy_world_dir / "sft" / "train.jsonl",
                ptx_data=toy_world_dir / "sft" / "train.jsonl", ptx_coeff=0.5, max_steps=5,
                per_device_prompt_batch_size=4, per_device_train_batch_size=2, max_new_tokens=6, actor_lr=1e-3,
                critic_lr=1e-3, max_length=256, lambda_init=1.0, threshold=0.0, save_steps=1, output_dir=output_dir)
    args.update(extra)
    return ["train_ppo_lag.py"] + [f"--{k}={v}" for k, v in args.items()]


def rm_args(tiny_models, toy_world_dir, output_dir, **extra):
    args = dict(model_name_or_path=tiny_models["llava"], train_data=toy_world_dir / "pairs", max_train_pairs=16,
                per_device_batch_size=4, epochs=2, lr=1e-3, max_length=256, gradient_checkpointing=False,
                save_steps=1, logging_steps=1, eval_batch_size=32, output_dir=output_dir)
    args.update(extra)
    return ["train_rm.py"] + [f"--{k}={v}" for k, v in args.items()]


def run(argv, env=None, check=True):
    result = subprocess.run([sys.executable] + [str(a) for a in argv], cwd=ROOT, env={**ENV, **(env or {})},
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


def run_and_kill(argv, output_dir: Path, wait_for: str, env=None) -> None:
    """Start a run, SIGKILL it as soon as `wait_for` (relative to output_dir) exists."""
    process = subprocess.Popen([sys.executable] + [str(a) for a in argv], cwd=ROOT, env={**ENV, **(env or {})},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (output_dir / wait_for).exists():
        assert process.poll() is None, f"the run ended before {wait_for} appeared"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def assert_identical_runs(a: Path, b: Path, weight_files: list[str]) -> None:
    for name in weight_files:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), f"{name}: {key} differs"
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(p)]
    assert strip(a / "metrics.jsonl") == strip(b / "metrics.jsonl")


PPO_WEIGHTS = ["actor/model.safetensors", "reward_critic/model.safetensors", "reward_critic/score_head.safetensors",
               "cost_critic/model.safetensors", "cost_critic/score_head.safetensors"]
RM_WEIGHTS = ["model.safetensors", "score_head.safetensors"]


@pytest.fixture(scope="module")
def ppo_reference(tiny_models, toy_world_dir, score_models, tmp_path_factory):
    """An uninterrupted PPO-Lag run (with PTX) to compare resumed runs against."""
    out = tmp_path_factory.mktemp("ppo_uninterrupted")
    run(ppo_args(tiny_models, toy_world_dir, score_models, out))
    return out


@pytest.fixture(scope="module")
def rm_reference(tiny_models, toy_world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_uninterrupted")
    run(rm_args(tiny_models, toy_world_dir, out))
    return out


def check_ppo_resume(kill_after: int, tiny_models, toy_world_dir, score_models, ppo_reference, out: Path):
    argv = ppo_args(tiny_models, toy_world_dir, score_models, out)
    run_and_kill(argv, out, f"checkpoints/checkpoint-{kill_after:08d}")
    assert not (out / "actor").exists()  # it really died before the end
    resumed = run(argv + ["--resume_from=auto"])
    assert "resumed from" in resumed.stdout
    assert_identical_runs(ppo_reference, out, PPO_WEIGHTS)
    assert json.loads((ppo_reference / "lambda.json").read_text()) == json.loads((out / "lambda.json").read_text())


def test_ppo_lag_resume_after_sigkill_is_bit_identical(tiny_models, toy_world_dir, score_models, ppo_reference,
                                                        tmp_path):
    kill_after = random.Random(os.getpid()).randint(1, 4)  # a random step
    check_ppo_resume(kill_after, tiny_models, toy_world_dir, score_models, ppo_reference, tmp_path)
    assert json.loads((tmp_path / "lambda.json").read_text())["lambda"] != 1.0  # lambda did move


# slow (~13 s): RM resume stays in the default suite through test_resume_after_a_skipped_nan_step_is_exact
@pytest.mark.slow
def test_rm_resume_after_sigkill_is_bit_identical(tiny_models, toy_world_dir, rm_reference, tmp_path):
    kill_after = random.Random(os.getpid()).randint(1, 7)
    argv = rm_args(tiny_models, toy_world_dir, tmp_path)
    run_and_kill(argv, tmp_path, f"checkpoints/checkpoint-{kill_after:08d}")
    assert not (tmp_path / "summary.json").exists()
    run(argv + ["--resume_from=auto"])
    assert_identical_runs(rm_reference, tmp_path, RM_WEIGHTS)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["optimizer_steps"] == 8 and summary["eval/accuracy"] == json.loads(
        (rm_reference / "summary.json").read_text())["eval/accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 3, 4])
def test_ppo_lag_resume_many_kill_points(kill_after, tiny_models, toy_world_dir, score_models, ppo_reference,
                                         tmp_path):
    check_ppo_resume(kill_after, tiny_models, toy_world_dir, score_models, ppo_reference, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [2, 4, 6])  # 4 = the end of epoch 0, before its evaluation
def test_rm_resume_many_kill_points(kill_after, tiny_models, toy_world_dir, rm_reference, tmp_path):
    argv = rm_args(tiny_models, toy_world_dir, tmp_path)
    run_and_kill(argv, tmp_path, f"checkpoints/checkpoint-{kill_after:08d}")
    run(argv + ["--resume_from=auto"])
    assert_identical_runs(rm_reference, tmp_path, RM_WEIGHTS)


@pytest.mark.slow
def test_sft_resume_after_sigkill_is_bit_identical(tiny_models, toy_world_dir, tmp_path):
    argv = lambda out: ["train_sft.py", f"--model_name_or_path={tiny_models['llava']}",
                        f"--train_data={toy_world_dir / 'sft' / 'train.jsonl'}", "--max_train_examples=24",
                        "--per_device_batch_size=4", "--epochs=2", "--lr=1e-3", "--max_length=256", "--save_steps=1",
                        "--logging_steps=1", f"--output_dir={out}"]
    run(argv(tmp_path / "a"))
    run_and_kill(argv(tmp_path / "b"), tmp_path / "b", "checkpoints/checkpoint-00000005")
    run(argv(tmp_path / "b") + ["--resume_from=auto"])
    assert_identical_runs(tmp_path / "a", tmp_path / "b", ["model.safetensors"])


# slow (~10 s): the SIGKILL + resume tests of the default suite stay
@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_the_previous_one(tiny_models, toy_world_dir, score_models,
                                                             ppo_reference, tmp_path):
    argv = ppo_args(tiny_models, toy_world_dir, score_models, tmp_path)
    paused = ["tests/harness.py", "--pause_in_save", "3", "60"] + argv  # checkpoint 3 waits 60 s before its rename
    run_and_kill(paused, tmp_path, "checkpoints/checkpoint-00000003.tmp/PAUSED")
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "checkpoint-00000003.tmp").is_dir()  # the half-written one
    previous = find_checkpoint("auto", tmp_path)
    assert previous == checkpoints / "checkpoint-00000002"
    # the previous checkpoint is intact: every part loads, weights finite, state consistent
    actor, _, _ = load_policy(str(previous / "actor"))
    critic, _ = ScoreModel.from_pretrained(str(previous / "cost_critic"))
    assert all_finite(actor) and all_finite(critic)
    optimizers = torch.load(previous / "optimizers.pt", weights_only=True)
    assert set(optimizers) == {"actor", "reward_critic", "cost_critic"}
    assert json.loads((previous / "trainer_state.json").read_text())["step"] == 2
    run(argv + ["--resume_from=auto"])  # resumes from step 2, ignoring the .tmp, and ends as if never killed
    assert_identical_runs(ppo_reference, tmp_path, PPO_WEIGHTS)


def run_in_process(argv, monkeypatch, loss_name: str, nan_steps: str, calls_per_step: int = 1):
    """main() of a training script in this process (no interpreter start-up), its loss function `loss_name`
    returning NaN at the optimizer steps `nan_steps`: a function of the script (actor_loss) or of the module named
    before the dot (score_training.reward_loss)."""
    import importlib

    from infra.cli import parse_args

    module = importlib.import_module(argv[0].removesuffix(".py"))
    where, _, loss_name = loss_name.rpartition(".")
    owner = importlib.import_module(where) if where else module
    monkeypatch.setattr(owner, loss_name, nan_on_steps(getattr(owner, loss_name), nan_steps, calls_per_step))
    return module.main(parse_args(module.Args, [str(a) for a in argv[1:]]))


def test_nan_loss_is_skipped_counted_and_training_continues(tiny_models, toy_world_dir, rm_reference, tmp_path,
                                                            monkeypatch, capsys):
    run_in_process(rm_args(tiny_models, toy_world_dir, tmp_path), monkeypatch, "score_training.reward_loss", "3")
    assert "non-finite" in capsys.readouterr().err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 1 and summary["optimizer_steps"] == 8
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"train/loss"' in line]
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 1, 1, 1, 1, 1]
    model, _ = ScoreModel.from_pretrained(str(tmp_path))
    assert all_finite(model)
    # the skipped update really was skipped: the weights differ from the clean run's
    assert not torch.equal(load_file(tmp_path / "score_head.safetensors")["weight"],
                           load_file(rm_reference / "score_head.safetensors")["weight"])


def test_nan_in_ppo_is_skipped(tiny_models, toy_world_dir, score_models, tmp_path, monkeypatch):
    # 4 prompts per step, minibatches of 2: the actor loss is computed twice per step
    run_in_process(ppo_args(tiny_models, toy_world_dir, score_models, tmp_path, max_steps=3), monkeypatch,
                   "actor_loss", "2", calls_per_step=2)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["nonfinite_steps"] for r in records] == [0, 2, 2]  # both minibatches of step 2 skipped
    actor, _, _ = load_policy(str(tmp_path / "actor"))
    assert all_finite(actor)


def test_nan_k_times_in_a_row_stops_with_a_finite_last_checkpoint(tiny_models, toy_world_dir, tmp_path,
                                                                   monkeypatch):
    with pytest.raises(SystemExit, match="3 non-finite updates in a row"):
        run_in_process(rm_args(tiny_models, toy_world_dir, tmp_path, max_nonfinite_steps=3), monkeypatch,
                       "score_training.reward_loss", "2,3,4")
    last = find_checkpoint("auto", tmp_path)
    assert last.name == "checkpoint-00000003"  # steps 2 and 3 were skipped (weights as after step 1), 4 stopped
    model, _ = ScoreModel.from_pretrained(str(last / "model"))
    assert all_finite(model)


@pytest.mark.slow
def test_pid_lambda_resume_after_sigkill_is_bit_identical(tiny_models, toy_world_dir, score_models, tmp_path):
    """The PID controller's integral and last error are part of the checkpoint: a resumed run continues them."""
    pid = dict(lambda_update="pid", lambda_pid_kp=2.0, lambda_pid_ki=0.5, lambda_pid_kd=1.0)
    run(ppo_args(tiny_models, toy_world_dir, score_models, tmp_path / "a", **pid))
    argv = ppo_args(tiny_models, toy_world_dir, score_models, tmp_path / "b", **pid)
    run_and_kill(argv, tmp_path / "b", "checkpoints/checkpoint-00000003")
    run(argv + ["--resume_from=auto"])
    assert_identical_runs(tmp_path / "a", tmp_path / "b", PPO_WEIGHTS)
    assert (json.loads((tmp_path / "a" / "lambda.json").read_text())
            == json.loads((tmp_path / "b" / "lambda.json").read_text()))


# ---- resuming: what a checkpoint must carry, and what a resumed run must not change ------------------------------


def test_nan_in_a_row_count_survives_a_resume(tiny_models, toy_world_dir, tmp_path, monkeypatch):
    """Steps 2 and 3 are skipped (NaN) before checkpoint 3; resumed, one more NaN at step 4 is the third in a row,
    so the resumed run stops there as the uninterrupted one did (the count is checkpointed, not restarted at 0)."""
    args = lambda **extra: rm_args(tiny_models, toy_world_dir, tmp_path, max_nonfinite_steps=3, **extra)
    with pytest.raises(SystemExit, match="3 non-finite updates in a row"):
        run_in_process(args(), monkeypatch, "score_training.reward_loss", "2,3,4")
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-00000004", ignore_errors=True)  # none: stopped at step 4
    assert find_checkpoint("auto", tmp_path).name == "checkpoint-00000003"
    with pytest.raises(SystemExit, match="3 non-finite updates in a row"):
        # its first step is step 4
        run_in_process(args(resume_from="auto"), monkeypatch, "score_training.reward_loss", "1")


def test_resume_after_a_skipped_nan_step_is_exact(tiny_models, toy_world_dir, rm_reference, tmp_path, monkeypatch):
    """A NaN loss skipped at step 1 stays in the running means logged at step 4; checkpoint 2 holds it as "nan" in
    JSON, and the run resumed from checkpoint 2 must read it back as a float (summing the string failed) and end
    with the uninterrupted run's weights and figures."""
    options = dict(logging_steps=4, save_steps=2, keep_checkpoints=10)
    run_in_process(rm_args(tiny_models, toy_world_dir, tmp_path / "a", **options), monkeypatch,
                   "score_training.reward_loss", "1")
    saved = json.loads((tmp_path / "a" / "checkpoints" / "checkpoint-00000002" / "trainer_state.json").read_text())
    assert "nan" in saved["running"]["loss"]  # the premise
    resumed = tmp_path / "b"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-00000002",
                    resumed / "checkpoints" / "checkpoint-00000002")
    shutil.copy(tmp_path / "a" / "metrics.jsonl", resumed)  # truncated to checkpoint 2's lines on resume
    shutil.copy(tmp_path / "a" / "args.json", resumed)
    run_in_process(rm_args(tiny_models, toy_world_dir, resumed, resume_from="auto", **options), monkeypatch,
                   "score_training.reward_loss", "")
    assert_identical_runs(tmp_path / "a", resumed, RM_WEIGHTS)
    summaries = [json.loads((run_dir / "summary.json").read_text()) for run_dir in (tmp_path / "a", resumed)]
    assert summaries[0]["truncated"] == summaries[1]["truncated"]  # data counts continue across the resume
    assert summaries[1]["seconds"] >= saved["seconds"]  # and so does the clock


def test_a_crash_while_rewriting_a_checkpoint_leaves_one_complete(tiny_models, tmp_path, monkeypatch):
    """The final save of a run whose last step is a save step writes checkpoint N again. The old folder is renamed
    aside, never deleted in place: a crash after that rename and before the new folder's leaves the new (complete)
    .tmp, and --resume_from auto takes it; a crash while deleting the aside folder leaves checkpoint N itself."""
    from infra import checkpoint

    model, processor, _ = load_policy(tiny_models["llava"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizers = {"model": (optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))}
    save = lambda marker: checkpoint.save_checkpoint(tmp_path, 3, {"model": model}, optimizers, {"marker": marker},
                                                      processor)
    save("first")
    replace = os.replace

    def crash_before_the_new_one(source, target):
        if Path(source).name == "checkpoint-00000003.tmp":  # the folder's rename, not a file's inside it
            raise KeyboardInterrupt("killed")
        replace(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", crash_before_the_new_one)
    with pytest.raises(KeyboardInterrupt):
        save("second")
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-00000003.old", "checkpoint-00000003.tmp"]  # no checkpoint-00000003 at all
    found = find_checkpoint("auto", tmp_path)
    assert found.name == "checkpoint-00000003.tmp"
    assert json.loads((found / "trainer_state.json").read_text())["marker"] == "second"
    assert all_finite(load_policy(str(found / "model"))[0])
    save("third")  # the next write cleans both up
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-00000003"]
    assert json.loads((find_checkpoint("auto", tmp_path) / "trainer_state.json").read_text())["marker"] == "third"


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path):
    """Its checkpoints would be pruned together with the old run's, and --resume_from auto would then continue
    the old run: one line says what to do instead."""
    (tmp_path / "checkpoints" / "checkpoint-00000014").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-00000014" / "trainer_state.json").write_text('{"step": 14}')
    with pytest.raises(SystemExit, match="holds checkpoints of an earlier run .newest: checkpoint-00000014.: "
                                         "continue it with --resume_from auto"):
        find_checkpoint("", tmp_path)
    assert find_checkpoint("auto", tmp_path).name == "checkpoint-00000014"
    assert find_checkpoint("", tmp_path / "elsewhere") is None


def test_resuming_with_changed_options_is_refused_before_anything_is_written(tiny_models, toy_world_dir, tmp_path,
                                                                            capsys):
    """A resumed run continues its run: options that shape the training stop it with one line naming them (args.json
    is left as it was); a speed knob is allowed with a warning; logging options freely."""
    from infra.cli import parse_args
    from infra.runlog import RunLog

    import train_rm

    argv = rm_args(tiny_models, toy_world_dir, tmp_path)[1:]
    RunLog(tmp_path, parse_args(train_rm.Args, argv))  # the original run's args.json
    checkpoint = tmp_path / "checkpoints" / "checkpoint-00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"step": 2}')
    saved = (tmp_path / "args.json").read_text()
    changed = parse_args(train_rm.Args, argv + ["--lr=1e-5", "--seed=7", "--logging_steps=3"])
    refusal = r"differ from the run it continues .*: --seed 42 -> 7, --lr 0\.001 -> 1e-05\. "
    with pytest.raises(SystemExit, match=refusal):
        RunLog(tmp_path, changed, resume=checkpoint)
    assert (tmp_path / "args.json").read_text() == saved
    knob = parse_args(train_rm.Args, argv + ["--gradient_checkpointing=true", "--logging_steps=3"])
    RunLog(tmp_path, knob, resume=checkpoint)
    err = capsys.readouterr().err
    assert "resuming with changed options (--gradient_checkpointing False -> True)" in err
    assert json.loads((tmp_path / "args.json").read_text())["logging_steps"] == 3


def test_tensorboard_drops_what_a_killed_run_logged_after_its_checkpoint(tmp_path):
    """Resumed after step 2, the run logs steps 3.. again: the events of the killed run's steps 3-4 are purged,
    so each step has one point."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from infra.runlog import TensorBoardTracker

    killed = TensorBoardTracker(tmp_path, {})
    for step in (1, 2, 3, 4):
        killed.scalars({"loss": float(step)}, step)
    killed.close()
    resumed = TensorBoardTracker(tmp_path, {}, resume_step=2)
    for step in (3, 4, 5):
        resumed.scalars({"loss": 10.0 + step}, step)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """The first run keeps its wandb id in the output folder; a resumed run passes it back (resume="allow") instead
    of starting a second wandb run. wandb is not installed here: a stand-in module records the calls."""
    import types

    from infra.runlog import WandbTracker

    calls = []
    ids = iter(["first0", "second"])
    fake = types.SimpleNamespace(util=types.SimpleNamespace(generate_id=lambda: next(ids)), Html=str,
                                 init=lambda **kw: calls.append(kw) or types.SimpleNamespace(log=None, finish=None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    WandbTracker(tmp_path, {})
    WandbTracker(tmp_path, {}, resume_step=3)
    (tmp_path / "new").mkdir()
    WandbTracker(tmp_path / "new", {})  # a fresh run in another folder: a new id
    assert [(c["id"], c["resume"]) for c in calls] == [("first0", "allow"), ("first0", "allow"), ("second", "allow")]


def test_a_checkpoint_of_another_stage_is_one_line(tmp_path):
    """Optimizer states for other roles (a PPO checkpoint given to SFT) or for another model's parameters (an SFT
    checkpoint given to the RM) end the run with one line saying so, not a traceback."""
    from infra.checkpoint import load_checkpoint, rng_state

    small, large = torch.nn.Linear(3, 2), torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    saved = torch.optim.AdamW(small.parameters())
    torch.save({"actor": {"optimizer": saved.state_dict(), "by_name": False,
                          "scheduler": torch.optim.lr_scheduler.LambdaLR(saved, lambda s: 1.0).state_dict()}},
               tmp_path / "optimizers.pt")
    torch.save({"ranks": [rng_state()]}, tmp_path / "rng.pt")
    for name, model, message in (("model", small, "holds no optimizer state for model .it has actor."),
                                 ("actor", large, "its actor optimizer state does not fit this run's model")):
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        with pytest.raises(SystemExit, match=message):
            load_checkpoint(tmp_path, {name: (optimizer, scheduler)})
