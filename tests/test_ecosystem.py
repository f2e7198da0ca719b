"""Watching a run and sharing its results: TensorBoard scalars equal to metrics.jsonl, samples and held-out
evaluation during PPO, model cards, MM-SafetyBench in evaluate.py."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

import evaluate
import train_ppo_lag
import train_rm
from conftest import ROOT
from test_reliability import score_models  # noqa: F401


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def tensorboard_scalars(run_dir: Path) -> dict:
    """{(tag, step): value} of every scalar in the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def metrics_scalars(run_dir: Path) -> dict:
    """{(name, step): value} of every number in metrics.jsonl, nested names joined with "/" (as the tracker gets)."""
    out = {}

    def walk(record, prefix, step):
        for key, value in record.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}/", step)
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and f"{prefix}{key}" != "step":
                out[(f"{prefix}{key}", step)] = float(value)

    for record in read_jsonl(run_dir / "metrics.jsonl"):
        walk(record, "", record["step"])
    return out


def assert_tracker_equals_metrics(run_dir: Path) -> None:
    logged, tracked = metrics_scalars(run_dir), tensorboard_scalars(run_dir)
    assert logged and set(tracked) == set(logged)
    for key, value in logged.items():
        assert tracked[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key  # event files hold float32


def ppo_args(tiny_models, toy_world_dir, score_models, out, **extra):  # noqa: F811
    args = dict(actor_model_name_or_path=tiny_models["llava"], reward_model_name_or_path=str(score_models / "rm"),
                cost_model_name_or_path=str(score_models / "cm"), train_data=str(toy_world_dir / "pairs"),
                max_steps=3, per_device_prompt_batch_size=4, per_device_train_batch_size=4, max_new_tokens=6,
                actor_lr=1e-3, critic_lr=1e-3, max_length=256, lambda_init=1.0, threshold=0.0, save_steps=0,
                output_dir=str(out))
    return train_ppo_lag.Args(**{**args, **extra})


# ---- trackers ----------------------------------------------------------------------------------------------------


def test_rm_tensorboard_scalars_equal_metrics(tiny_models, toy_world_dir, tmp_path):
    train_rm.main(train_rm.Args(model_name_or_path=tiny_models["llava"], train_data=str(toy_world_dir / "pairs"),
                                max_train_pairs=12, per_device_batch_size=4, epochs=1, lr=1e-3, max_length=256,
                                gradient_checkpointing=False, logging_steps=1, eval_batch_size=32,
                                report_to=["tensorboard"], output_dir=str(tmp_path)))
    assert len([r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]) == 3
    assert_tracker_equals_metrics(tmp_path)
    assert ("eval/per_category/sharp_objects/accuracy", 3) in tensorboard_scalars(tmp_path)  # nested: joined with "/"


def test_ppo_tensorboard_samples_and_held_out_evaluation(tiny_models, toy_world_dir, score_models, tmp_path):  # noqa: F811
    out = tmp_path / "watched"
    summary = train_ppo_lag.main(ppo_args(tiny_models, toy_world_dir, score_models, out, report_to=["tensorboard"],
                                          eval_steps=2, eval_prompts=6, sample_steps=1, sample_prompts=3,
                                          toy_grader=True))
    assert summary["steps"] == 3
    assert_tracker_equals_metrics(out)
    records = read_jsonl(out / "metrics.jsonl")
    evals = [r for r in records if "eval/reward" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every 2 steps and at the end
    for r in evals:
        assert 0 <= r["eval/safe_rate"] <= 1 and math.isfinite(r["eval/cost"])
        assert 0 <= r["eval/true_well_formed_rate"] <= 1 and "eval/true_mean_harm" in r
    samples = read_jsonl(out / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len({s["source"] for s in samples}) == 3  # the same fixed held-out prompts every time
    assert all(s["source"].split(":")[0].endswith("evaluation.parquet") for s in samples)  # held out, not train
    assert all(math.isfinite(s["reward"]) and math.isfinite(s["cost"]) and isinstance(s["response"], str)
               for s in samples)

    # watching changes nothing: the training figures equal those of a run without evaluation or samples
    plain = tmp_path / "plain"
    train_ppo_lag.main(ppo_args(tiny_models, toy_world_dir, score_models, plain, toy_grader=True))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows if "eval/reward" not in r]
    assert strip(records) == strip(read_jsonl(plain / "metrics.jsonl"))


def test_wandb_is_optional_with_a_clear_message(tiny_models, toy_world_dir, score_models, tmp_path):  # noqa: F811
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here; the message is for machines without it")
    with pytest.raises(SystemExit, match="needs the wandb package"):
        train_ppo_lag.main(ppo_args(tiny_models, toy_world_dir, score_models, tmp_path, report_to=["wandb"]))


def test_wandb_offline_when_installed(tiny_models, toy_world_dir, tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is optional and not installed here")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_rm.main(train_rm.Args(model_name_or_path=tiny_models["llava"], train_data=str(toy_world_dir / "pairs"),
                                max_train_pairs=8, per_device_batch_size=4, epochs=1, lr=1e-3, max_length=256,
                                gradient_checkpointing=False, eval_batch_size=32, report_to=["wandb"],
                                output_dir=str(tmp_path)))
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_unknown_tracker_is_refused(tiny_models, toy_world_dir, score_models, tmp_path):  # noqa: F811
    with pytest.raises(SystemExit, match="unknown"):
        train_ppo_lag.main(ppo_args(tiny_models, toy_world_dir, score_models, tmp_path, report_to=["mlflow"]))


# ---- model cards -------------------------------------------------------------------------------------------------


def read_card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_every_saved_model_has_a_model_card(tiny_models, toy_world_dir, score_models, tmp_path):  # noqa: F811
    train_rm.main(train_rm.Args(model_name_or_path=tiny_models["llava"], train_data=str(toy_world_dir / "pairs"),
                                max_train_pairs=8, per_device_batch_size=4, epochs=1, lr=1e-3, max_length=256,
                                gradient_checkpointing=False, eval_batch_size=32, output_dir=str(tmp_path / "rm")))
    front, body = read_card(tmp_path / "rm")
    assert front["library_name"] == "transformers" and front["license"] == "cc-by-nc-4.0"
    assert "reward-model" in front["tags"] and "safe-rlhf-v" in front["tags"]
    assert "base_model" not in front  # a local path is no hub id
    assert "| `regularization` | `0.001` |" in body and "| eval/accuracy |" in body
    train_ppo_lag.main(ppo_args(tiny_models, toy_world_dir, score_models, tmp_path / "ppo", max_steps=1))
    for role, tag in (("actor", "ppo-lag"), ("reward_critic", "reward-critic"), ("cost_critic", "cost-critic")):
        front, body = read_card(tmp_path / "ppo" / role)
        assert tag in front["tags"], role
        assert "| lambda |" in body and "| `threshold` | `0.0` |" in body


# ---- MM-SafetyBench ----------------------------------------------------------------------------------------------


def test_mm_safetybench_generate_score_and_per_scenario_table(tiny_models, score_models, tmp_path):  # noqa: F811
    data = str(ROOT / "data" / "samples" / "mm_safetybench")
    common = ["--data", data, "--max_length", "4096", "--batch_size", "3"]
    gen = tmp_path / "gen.jsonl"
    evaluate.main(["generate", *common, "--models", f"tiny={tiny_models['llava']}", "--max_new_tokens", "4",
                   "--output", str(gen)])
    rows = read_jsonl(gen)
    assert len(rows) == 6 and {r["category"] for r in rows} == {"Financial_Advice", "Health_Consultation",
                                                                "Illegal_Activitiy", "Legal_Opinion"}
    scores = tmp_path / "scores.json"
    result = evaluate.main(["score", *common, "--generations", str(gen), "--reward_model", str(score_models / "rm"),
                            "--cost_model", str(score_models / "cm"), "--output", str(scores)])
    per_scenario = result["models"]["tiny"]["per_category"]
    assert per_scenario["Health_Consultation"]["n"] == 2 and "safe_rate" in per_scenario["Legal_Opinion"]
    text = evaluate.main(["table", "--scores", str(scores), "--per_category", "--output", str(tmp_path / "t.md")])
    lines = [line for line in text.splitlines() if line.startswith("| tiny ") and "Illegal_Activitiy" in line]
    assert len(lines) == 1 and "| 2 " in lines[0]  # two Illegal_Activitiy prompts, one row
