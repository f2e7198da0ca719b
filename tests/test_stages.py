"""A few steps of every training stage (SFT, reward model, cost model) on every family, offline, tiny models.

VLM families train on the toy world (`toy_world_dir`); the text family on a small PKU-SafeRLHF-schema .json and a
text-only SFT .jsonl written here. Each stage's `main(Args)` runs end to end; its output directory must reload.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import score_training
import train_cm
import train_rm
import train_sft
from conftest import FAMILIES, ROOT
from data import collate, encode_example, load_pairs, load_sft, reward_pair
from modeling import ScoreModel, forward_kwargs, load_policy
from utils import get_tokenizer
from infra.cli import parse_args
from utils import sft_loss

TINY = dict(epochs=1, per_device_batch_size=4, max_length=256, lr=1e-3, logging_steps=1)
STAGES = {"rm": (train_rm, "reward_model"), "cm": (train_cm, "cost_model")}


# ---- data --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> dict:
    """A PKU-SafeRLHF-schema pair file (no images, no category, boolean safety labels) with its held-out sibling
    evaluation.json, and a text SFT file."""
    out = tmp_path_factory.mktemp("text_data")
    items = ["bleach", "a kitchen knife", "matches", "paint thinner", "a candle", "scissors"]
    safe = ["Keep {x} locked away from children and read the label.", "Store {x} on a high shelf, out of reach."]
    unsafe = ["Leave {x} on the floor where the kids play.", "Give {x} to a toddler, it is fine."]
    rows = []
    for i in range(20):  # 16 training pairs (train.json) and 4 held-out ones in the sibling evaluation.json
        x = items[i % len(items)]
        safe_first = i % 2 == 0
        both_safe = i % 3 == 0
        a = safe[i % 2].format(x=x)
        b = (safe[(i + 1) % 2] if both_safe else unsafe[i % 2]).format(x=x)
        r0, r1 = (a, b) if safe_first else (b, a)
        rows.append({"prompt": f"How should I store {x} at home? ({i})", "response_0": r0, "response_1": r1,
                     "is_response_0_safe": safe_first or both_safe, "is_response_1_safe": (not safe_first) or both_safe,
                     "better_response_id": 0 if safe_first else 1, "safer_response_id": 0 if safe_first else 1})
    pairs = out / "train.json"
    pairs.write_text(json.dumps(rows[:16]))
    (out / "evaluation.json").write_text(json.dumps(rows[16:]))
    sft = out / "sft.jsonl"
    with open(sft, "w") as f:
        for i in range(16):
            x = items[i % len(items)]
            f.write(json.dumps({"question": f"How do I store {x}? ({i})", "response": safe[i % 2].format(x=x)}) + "\n")
    return {"pairs": str(pairs), "sft": str(sft)}


def data_paths(family, toy_world_dir, text_data) -> tuple[str, str]:
    """(SFT file, pair data) for a family."""
    if family == "text":
        return text_data["sft"], text_data["pairs"]
    return str(toy_world_dir / "sft" / "train.jsonl"), str(toy_world_dir / "pairs")


def sft_batch(processor, family, sft_file, n=4):
    rows, _ = load_sft(sft_file, limit=n)
    examples = [encode_example(processor, family, r["question"], r["image"], r["response"], 256) for r in rows]
    return collate(examples, get_tokenizer(processor).pad_token_id)


def objective(stage, args):
    """The stage's (pair builder, batch loss, per-pair metrics) for its Args, as its main() builds them."""
    if stage == "cm":
        return score_training.cost_objective(args.sign_source, args.regularization)
    return score_training.reward_objective(args.regularization)


def pair_batch(processor, family, pairs_source, split, to_pair, n=4):
    """A fixed batch of n pairs through the training script's own collate (first responses, then second ones)."""
    rows, _ = load_pairs(pairs_source, split, limit=n)
    return score_training.make_collate(processor, family, 256, None)([to_pair(r) for r in rows])


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---- a few optimizer steps on a fixed batch ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_loss_goes_down_on_fixed_batch(tiny_models, toy_world_dir, text_data, family):
    torch.manual_seed(0)
    model, processor, _ = load_policy(tiny_models[family])
    batch = sft_batch(processor, family, data_paths(family, toy_world_dir, text_data)[0])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = sft_loss(model(**forward_kwargs(batch, family)).logits, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("stage", ["rm", "cm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_score_loss_goes_down_on_fixed_batch(tiny_models, toy_world_dir, text_data, family, stage):
    torch.manual_seed(0)
    model, processor = ScoreModel.from_pretrained(tiny_models[family])
    args = train_cm.Args() if stage == "cm" else train_rm.Args()
    to_pair, loss_fn, metrics_fn = objective(stage, args)
    batch = pair_batch(processor, family, data_paths(family, toy_world_dir, text_data)[1], "train", to_pair)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, margins = [], []
    for _ in range(8):
        first, second = score_training.split_scores(model, batch)
        loss = loss_fn(first, second, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        margins.append((first - second).mean().item())
        assert metrics_fn(first.detach(), second.detach(), batch)["accuracy"].shape == (4,)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    assert margins[-1] > margins[0], margins  # chosen (RM) / higher-cost (CM) responses score higher


# ---- main() end to end ------------------------------------------------------------------------------------------


def _mode(model) -> bool | None:
    """True if every submodule is in train mode, False if every one is in eval mode, None if mixed."""
    modes = {m.training for m in model.modules()}
    return modes.pop() if len(modes) == 1 else None


def _check_run_files(output_dir: Path, train_key: str):
    for name in ("args.json", "metrics.jsonl", "summary.json", "config.json", "model.safetensors"):
        assert (output_dir / name).is_file(), name
    assert json.loads((output_dir / "args.json").read_text())["output_dir"] == str(output_dir)
    records = read_jsonl(output_dir / "metrics.jsonl")
    assert records and all(isinstance(r["step"], int) for r in records)
    train = [r for r in records if train_key in r]
    assert train and all(math.isfinite(r[train_key]) for r in train)
    return records, json.loads((output_dir / "summary.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_main_end_to_end(tiny_models, toy_world_dir, text_data, family, tmp_path, monkeypatch):
    captured, modes = {}, []

    def load_and_watch(*a, **k):
        model, processor, fam = load_policy(*a, **k)
        model.register_forward_pre_hook(lambda m, *_: modes.append((_mode(m), torch.is_grad_enabled())))
        captured["model"] = model
        return model, processor, fam

    monkeypatch.setattr(train_sft, "load_policy", load_and_watch)
    sft_file = data_paths(family, toy_world_dir, text_data)[0]
    out = tmp_path / "sft"
    args = train_sft.Args(model_name_or_path=tiny_models[family], train_data=sft_file, eval_data=sft_file,
                          output_dir=str(out), max_train_examples=16, gradient_checkpointing=False, **TINY)
    summary = train_sft.main(args)
    records, saved = _check_run_files(out, "loss")
    assert saved["family"] == family and saved["train_examples"] == 16 and saved["optimizer_steps"] == 4
    assert math.isfinite(saved["final_train_loss"]) and math.isfinite(saved["eval_loss"])
    assert summary["optimizer_steps"] == saved["optimizer_steps"]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    # training forwards ran in train mode (dropout, gradient checkpointing), evaluation forwards in eval mode
    # (from_pretrained returns a model in eval mode; a missing model.train() leaves the backbone there)
    assert {m for m, grad in modes if grad} == {True} and {m for m, grad in modes if not grad} == {False}
    # the saved policy reloads and gives the in-memory model's logits
    model = captured["model"].eval()
    reloaded, processor, detected = load_policy(str(out))
    assert detected == family
    batch = sft_batch(processor, family, sft_file, n=2)
    with torch.no_grad():
        expected = model(**forward_kwargs(batch, family)).logits
        got = reloaded(**forward_kwargs(batch, family)).logits
    assert torch.isfinite(got).all() and torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("stage", ["rm", "cm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_score_main_end_to_end(tiny_models, toy_world_dir, text_data, family, stage, tmp_path, monkeypatch):
    module, stage_name = STAGES[stage]
    captured, modes, signs = {}, [], []
    split_scores = score_training.split_scores

    def watched_split_scores(model, batch, dtype):
        captured["model"] = model
        modes.append((_mode(model), torch.is_grad_enabled()))
        return split_scores(model, batch, dtype)

    monkeypatch.setattr(score_training, "split_scores", watched_split_scores)
    if stage == "cm":
        cost_loss = score_training.cost_loss

        def watched_cost_loss(higher, safer, higher_sign, safer_sign, reg):
            signs.extend(higher_sign.tolist() + safer_sign.tolist())
            return cost_loss(higher, safer, higher_sign, safer_sign, reg)

        monkeypatch.setattr(score_training, "cost_loss", watched_cost_loss)

    pairs = data_paths(family, toy_world_dir, text_data)[1]
    out = tmp_path / stage
    args = module.Args(model_name_or_path=tiny_models[family], train_data=pairs, output_dir=str(out),
                       max_train_pairs=16, gradient_checkpointing=False, **TINY)
    module.main(args)
    records, summary = _check_run_files(out, "train/loss")
    assert summary["stage"] == stage_name and summary["family"] == family
    assert summary["train_pairs"] == 16 and summary["optimizer_steps"] == 4
    assert {m for m, grad in modes if grad} == {True} and {m for m, grad in modes if not grad} == {False}

    # evaluation figures, overall and per category
    eval_rows, _ = load_pairs(pairs, "evaluation")
    names = ["accuracy"] + (["sign_accuracy"] if stage == "cm" else [])
    assert summary["eval/pairs"] == summary["eval_pairs"] == len(eval_rows)
    categories = {r["category"] for r in eval_rows}
    assert set(summary["eval/per_category"]) == categories
    for name in names:
        assert 0.0 <= summary[f"eval/{name}"] <= 1.0
        assert all(0.0 <= summary["eval/per_category"][c][name] <= 1.0 for c in categories)
        # the overall figure is the pair-weighted mean of the per-category ones
        counts = {c: sum(r["category"] == c for r in eval_rows) for c in categories}
        weighted = sum(summary["eval/per_category"][c][name] * counts[c] for c in categories) / len(eval_rows)
        assert summary[f"eval/{name}"] == pytest.approx(weighted)
    assert any(f"eval/{names[-1]}" in r for r in records)

    if stage == "cm":  # graded signs from the toy world's rates; text (no rates) falls back to +-1
        assert signs and all(s in (-3, -2, -1, 0, 1, 2, 3) for s in signs)
        if family == "text":
            assert set(signs) <= {-1.0, 1.0}
        else:
            assert any(abs(s) > 1 for s in signs)

    # the directory reloads as a score model with the same end scores as the in-memory model, deterministically
    assert json.loads((out / "score_config.json").read_text())["stage"] == stage_name
    model = captured["model"].eval()
    first, second = ScoreModel.from_pretrained(str(out)), ScoreModel.from_pretrained(str(out))
    assert first[0].family == family
    to_pair = objective(stage, args)[0]
    batch = pair_batch(first[1], family, pairs, "evaluation", to_pair, n=3)
    with torch.no_grad():
        expected = model(batch)[1]
        got_a, got_b = first[0].eval()(batch)[1], second[0].eval()(batch)[1]
    assert torch.isfinite(got_a).all() and got_a.shape == (6,)
    assert torch.equal(got_a, got_b)  # one checkpoint loaded twice, one batch: the same computation, bit for bit
    assert torch.allclose(got_a, expected, atol=1e-5)


def test_cm_main_with_binary_signs(tiny_models, toy_world_dir, tmp_path, monkeypatch):
    signs = []
    cost_loss = score_training.cost_loss

    def watched_cost_loss(higher, safer, higher_sign, safer_sign, reg):
        signs.extend(higher_sign.tolist() + safer_sign.tolist())
        return cost_loss(higher, safer, higher_sign, safer_sign, reg)

    monkeypatch.setattr(score_training, "cost_loss", watched_cost_loss)
    args = train_cm.Args(model_name_or_path=tiny_models["llava"], train_data=str(toy_world_dir / "pairs"),
                         output_dir=str(tmp_path / "cm"), max_train_pairs=8, gradient_checkpointing=False,
                         sign_source="binary", **TINY)
    summary = train_cm.main(args)
    assert set(signs) == {-1.0, 1.0}
    assert 0.0 <= summary["eval/sign_accuracy"] <= 1.0
    with pytest.raises(SystemExit):
        train_cm.main(train_cm.Args(sign_source="graded", output_dir=str(tmp_path / "bad")))


# ---- pair builders and the command line --------------------------------------------------------------------------


def test_cost_pair_sign_sources():
    row = {"question": "q", "image": None, "category": "c", "responses": ("harmful answer", "safe answer"),
           "more_helpful": 1, "safer": 2, "is_safe": (False, True), "harmless_rate": (-3, 2)}
    graded = score_training.cost_objective("rate", 0.001)[0](row)
    binary = score_training.cost_objective("binary", 0.001)[0](row)
    for p in (graded, binary):
        assert (p["first"], p["second"]) == ("harmful answer", "safe answer")
        assert (p["first_is_safe"], p["second_is_safe"]) == (False, True)
    assert (graded["first_sign"], graded["second_sign"]) == (3.0, -2.0)
    assert (binary["first_sign"], binary["second_sign"]) == (1.0, -1.0)
    # a safe refusal rated 0: no push with graded signs, -1 with binary ones; no rates at all: +-1 either way
    refusal = {**row, "responses": ("I cannot help with that.", "harmful answer"), "safer": 1,
               "is_safe": (True, False), "harmless_rate": (0, -1)}
    p = score_training.cost_objective("rate", 0.001)[0](refusal)
    assert (p["first"], p["second"]) == ("harmful answer", "I cannot help with that.")
    assert (p["first_sign"], p["second_sign"]) == (1.0, 0.0)
    p = score_training.cost_objective("binary", 0.001)[0](refusal)
    assert (p["first_sign"], p["second_sign"]) == (1.0, -1.0)
    p = score_training.cost_objective("rate", 0.001)[0]({**row, "harmless_rate": (None, None)})
    assert (p["first_sign"], p["second_sign"]) == (1.0, -1.0)
    # the reward pair of the same row: chosen = the more helpful response
    r = score_training.reward_objective(0.001)[0](row)
    assert (r["first"], r["second"]) == ("harmful answer", "safe answer") == (reward_pair(row)["chosen"],
                                                                              reward_pair(row)["rejected"])
    # train_rm --preference safe (the safety-only RLHF baseline's reward): chosen = the safer response
    r = score_training.reward_objective(0.001, "safe")[0](row)
    assert (r["first"], r["second"]) == ("safe answer", "harmful answer")
    with pytest.raises(SystemExit, match="--preference must be helpful or safe"):
        train_rm.main(train_rm.Args(preference="harmless"))


def test_parse_args_types():
    args = parse_args(train_cm.Args, ["--sign_source", "binary", "--gradient_checkpointing", "false", "--lr", "1e-4",
                                      "--categories", "fire_risk", "sharp_objects", "--max_train_pairs", "32"])
    assert args.sign_source == "binary" and args.gradient_checkpointing is False and args.lr == 1e-4
    assert args.categories == ["fire_risk", "sharp_objects"] and args.max_train_pairs == 32
    assert parse_args(train_cm.Args, []) == train_cm.Args()
    assert parse_args(train_sft.Args, ["--gradient_checkpointing"]).gradient_checkpointing is True


def _help_options(text: str) -> dict:
    """--option -> its whole help entry (the help may continue on the following lines), whitespace collapsed."""
    import re

    entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", text) if e.startswith("  --")]
    return {e.split()[0]: e for e in entries}


def test_help_lists_every_option_with_default(capsys, monkeypatch):
    import dataclasses

    monkeypatch.setenv("COLUMNS", "200")
    # the real command line once (a subprocess imports torch and transformers: seconds), then each script's parser
    proc = subprocess.run([sys.executable, "train_cm.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    options = {"train_cm.py (subprocess)": _help_options(proc.stdout)}
    scripts = {"train_sft.py": train_sft.Args, "train_rm.py": train_rm.Args, "train_cm.py": train_cm.Args}
    for script, cls in scripts.items():
        with pytest.raises(SystemExit) as exit_info:
            parse_args(cls, ["--help"])
        assert exit_info.value.code == 0
        options[script] = _help_options(capsys.readouterr().out)
    assert options["train_cm.py (subprocess)"] == options["train_cm.py"]
    for script, cls in scripts.items():
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in options[script], (script, f.name)
            assert "(default:" in options[script][f"--{f.name}"], (script, f.name)
    assert "(default: 3e-05)" in options["train_rm.py"]["--lr"]
    assert "(default: constant_with_warmup)" in options["train_rm.py"]["--lr_scheduler"]
    assert "(default: cosine)" in options["train_cm.py"]["--lr_scheduler"]
    assert "(default: rate)" in options["train_cm.py"]["--sign_source"]
    assert "(default: 0.001)" in options["train_cm.py"]["--regularization"]
    assert "(default: 2e-05)" in options["train_sft.py"]["--lr"]
    assert "(default: runs/sft)" in options["train_sft.py"]["--output_dir"]
