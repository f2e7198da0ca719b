"""The DPO baseline (train_dpo.py): its loss against hand values, response-only sequence log-probs, the reference
computed once per batch without autograd, end-to-end runs on the tiny models (helpful and safe, full fine-tuning and
LoRA) whose output reloads and has learnt the training preferences, two ranks equal to one, exact resume, --help."""

import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_dpo
from conftest import FAMILIES, ROOT
from data import load_pairs, select_rows, validate_pair_row
from infra.cli import parse_args
from modeling import load_policy
from score_training import make_collate
from test_distributed import ranks_agree, torchrun
from test_fsdp import WEIGHT_TOLERANCE, assert_same_figures, max_weight_difference
from test_reliability import assert_identical_runs, run, run_and_kill
from test_stages import _help_options
from utils import make_loader

# 16 training pairs, 4 per micro-batch: 4 optimizer steps per epoch. The learning rates are the toy's, not the
# defaults (1e-6 would not move a tiny random model in 16 steps); LoRA adapters start at 0 and need a larger one.
TINY = dict(max_train_pairs=16, per_device_batch_size=4, max_length=256, gradient_checkpointing=False,
            logging_steps=1, save_steps=0, eval_batch_size=32)
LR = {0: 1e-3, 4: 1e-2}  # lora_r -> learning rate
LORA = dict(lora_alpha=8.0)
TRAIN_PAIRS, EVAL_PAIRS = 16, 60  # the toy world of conftest: 3 categories x 20 evaluation pairs


def dpo_args(tiny_models, toy_world_dir, out, **extra) -> train_dpo.Args:
    options = dict(model_name_or_path=tiny_models["llava"], train_data=str(toy_world_dir / "pairs"),
                   output_dir=str(out), **TINY)
    options.update(extra)
    return train_dpo.Args(**options)


def argv_of(args: train_dpo.Args) -> list[str]:
    """The command line that parses to `args` (every option spelt out)."""
    out = ["train_dpo.py"]
    for name, value in dataclasses.asdict(args).items():
        if isinstance(value, list):
            out += [f"--{name}", *map(str, value)] if value else []
        else:
            out.append(f"--{name}={value}")
    return out


def pair_loader(processor, family, toy_world_dir, preference, split="train", n=TRAIN_PAIRS):
    """The pairs of a split (the training run's seeded subset of n for "train"), in the run's own encoding."""
    rows, _ = load_pairs(str(toy_world_dir / "pairs"), split, limit=n)
    pairs = [train_dpo.dpo_pair(r, preference) for r in rows]
    return make_loader(pairs, 32, make_collate(processor, family, 256, None), False, 0)


# ---- 1. the loss -------------------------------------------------------------------------------------------------


def test_dpo_loss_by_hand_and_its_gradient_signs():
    # pair 0: log pi_theta(y_w) = -10, log pi_ref(y_w) = -12 (log-ratio +2); log pi_theta(y_l) = -11,
    # log pi_ref(y_l) = -10 (log-ratio -1). beta = 0.1: margin m = 0.1 * (2 - (-1)) = 0.3,
    # loss = -log sigma(0.3) = log(1 + e^-0.3) = log(1.7408182) = 0.5543552.
    # pair 1: policy = reference (a tie): m = 0, loss = log 2 = 0.6931472. The batch loss is their mean, 0.6237512.
    # d loss / d log pi_theta(y_w) of pair 0 = -beta * (1 - sigma(0.3)) / 2 = -0.1 * 0.4255575 / 2 = -0.0212779,
    # and +0.0212779 for log pi_theta(y_l); pair 1: -/+ 0.1 * 0.5 / 2 = -/+ 0.025.
    policy_chosen = torch.tensor([-10.0, -5.0], requires_grad=True)
    policy_rejected = torch.tensor([-11.0, -7.0], requires_grad=True)
    reference_chosen, reference_rejected = torch.tensor([-12.0, -5.0]), torch.tensor([-10.0, -7.0])
    loss, chosen, rejected = train_dpo.dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                                0.1)
    assert loss.item() == pytest.approx(0.6237512, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.2, 0.0]) and rejected.tolist() == pytest.approx([-0.1, 0.0])
    loss.backward()
    assert policy_chosen.grad.tolist() == pytest.approx([-0.0212779, -0.025], abs=1e-6)
    assert policy_rejected.grad.tolist() == pytest.approx([0.0212779, 0.025], abs=1e-6)
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()  # raise y_w, lower y_l
    metrics = train_dpo.pair_metrics(chosen.detach(), rejected.detach())
    assert metrics["loss"].tolist() == pytest.approx([0.5543552, math.log(2)], abs=1e-6)
    assert metrics["reward_margin"].tolist() == pytest.approx([0.3, 0.0])
    assert metrics["accuracy"].tolist() == [1.0, 0.0]  # a tie is not a win


def test_beta_scales_the_implicit_reward():
    assert train_dpo.implicit_reward(torch.tensor([-3.0]), torch.tensor([-5.0]), 0.5).item() == pytest.approx(1.0)


# ---- 2. sequence log-probs: the response tokens only ---------------------------------------------------------


def test_sequence_log_probs_sum_the_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    # row 0: prompt (-100) at 0-1, response tokens at 2-4, padding (-100) at 5; row 1: response at 1-2 only
    labels = torch.tensor([[-100, -100, 3, 5, 2, -100], [-100, 7, 1, -100, -100, -100]])
    got = train_dpo.sequence_log_probs(logits, labels)
    log_p = torch.log_softmax(logits.detach(), -1)
    expected = [log_p[0, 2, 3] + log_p[0, 3, 5] + log_p[0, 4, 2], log_p[1, 1, 7] + log_p[1, 2, 1]]
    assert got.tolist() == pytest.approx([float(e) for e in expected], abs=1e-5)
    for row, position in ((0, 0), (0, 1), (0, 5), (1, 0), (1, 4)):  # prompt and pad positions: no effect
        changed = logits.detach().clone()
        changed[row, position] = 100 * torch.randn(11)
        assert torch.equal(train_dpo.sequence_log_probs(changed, labels), got.detach()), (row, position)
    changed = logits.detach().clone()
    changed[0, 3, 5] += 1.0  # a response token's logit
    after = train_dpo.sequence_log_probs(changed, labels)
    assert after[0] != got[0] and after[1] == got[1]
    got.sum().backward()  # and no gradient reaches the logits of prompt or pad positions
    assert not logits.grad[labels == -100].any() and logits.grad[labels != -100].any()


def test_a_padded_batch_gives_each_row_its_own_log_prob(tiny_models, toy_world_dir):
    """Through the model: a row's log pi(y|x) in a right-padded batch of chosen and rejected responses of several
    lengths equals that row's alone (pad, prompt and image tokens excluded; logits_to_keep slices right)."""
    model, processor, family = load_policy(tiny_models["llava"])
    batch = next(iter(pair_loader(processor, family, toy_world_dir, "helpful", n=3)))
    batch.pop("categories")  # one per pair, not per row
    lengths = batch["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 1  # the premise: some rows are padded

    def row_alone(i):  # row i as a batch of its own, without padding
        row = select_rows(batch, [i])
        return {**row, **{k: row[k][:, :int(lengths[i])] for k in ("input_ids", "attention_mask", "response_mask",
                                                                   "labels")}}

    with torch.no_grad():
        together = train_dpo.response_log_probs(model, batch, family)
        alone = [train_dpo.response_log_probs(model, row_alone(i), family) for i in range(len(lengths))]
    assert together.shape == (6,) and (together < 0).all()
    assert torch.allclose(together, torch.cat(alone), atol=1e-4), (together, torch.cat(alone))


# ---- pairs: which response is chosen ------------------------------------------------------------------------------


def test_preference_picks_the_chosen_response():
    beavertails = {"question": "What colour is the paint?", "category": "chemical_hazard",
                   "response_1": "It is red. Pour it down the drain.", "response_2": "It is red. Keep it sealed.",
                   "more_helpful_response_id": "1", "safer_response_id": "2", "is_response_1_safe": "no",
                   "is_response_2_safe": "yes"}
    pku = {"prompt": "How do I store bleach?", "response_0": "Anywhere.", "response_1": "Locked, away from kids.",
           "is_response_0_safe": False, "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 1}
    for raw, helpful, safe in ((beavertails, "response_1", "response_2"), (pku, "response_0", "response_1")):
        row = validate_pair_row(raw, "pairs.jsonl", 0, with_image=False)
        for preference, chosen in (("helpful", helpful), ("safe", safe)):
            pair = train_dpo.dpo_pair(row, preference)
            other = {"response_0": "response_1", "response_1": "response_0"} if raw is pku else {
                "response_1": "response_2", "response_2": "response_1"}
            assert (pair["first"], pair["second"]) == (raw[chosen], raw[other[chosen]]), (preference, raw is pku)
            assert pair["question"] == row["question"] and pair["category"] == row["category"]


def test_bad_options_are_one_line(tmp_path):
    (tmp_path / "sft_adapter").mkdir()
    (tmp_path / "sft_adapter" / "adapter_config.json").write_text("{}")
    for option, message in ((dict(model_name_or_path=str(tmp_path / "sft_adapter"), lora_r=4, quantization="8bit"),
                             "is a LoRA adapter: on a --quantization 8bit base it cannot be merged"),
                            (dict(preference="harmless"), "--preference must be helpful or safe, got 'harmless'"),
                            (dict(beta=0.0), "--beta must be > 0, got 0.0"),
                            (dict(quantization="8bit"), "--quantization 8bit: a quantized model cannot be fully")):
        with pytest.raises(SystemExit, match=message):
            train_dpo.main(train_dpo.Args(output_dir=str(tmp_path), **option))


# ---- 3. and 4. end to end: four runs, their forwards watched ---------------------------------------------------


def adapters_off(model) -> bool:
    return any(getattr(m, "disable_adapters", False) for m in model.modules() if hasattr(m, "lora_A"))


@pytest.fixture(scope="module")
def dpo_runs(tiny_models, toy_world_dir, tmp_path_factory):
    """(preference, lora_r) -> a 4-epoch run with held-out evaluation, with every forward of the policy and of the
    reference recorded as (which, autograd on?) and the in-memory models kept."""
    runs = {}
    for preference in ("helpful", "safe"):
        for lora_r in (0, 4):
            forwards, models = [], []

            def load_and_watch(*a, **k):
                model, processor, family = load_policy(*a, **k)
                index = len(models)  # full fine-tuning: the policy is loaded first, the reference second
                models.append(model)
                which = lambda m: ("reference" if adapters_off(m) else "policy") if lora_r else (
                    "policy", "reference")[index]
                model.register_forward_pre_hook(lambda m, *_: forwards.append((which(m), torch.is_grad_enabled())))
                return model, processor, family

            out = tmp_path_factory.mktemp(f"dpo_{preference}_{lora_r}")
            args = dpo_args(tiny_models, toy_world_dir, out, preference=preference, epochs=4, lr=LR[lora_r],
                            lora_r=lora_r, **(LORA if lora_r else {}),
                            report_to=["tensorboard"] if (preference, lora_r) == ("helpful", 0) else ["none"])
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(train_dpo, "load_policy", load_and_watch)
                summary = train_dpo.main(args)
            runs[preference, lora_r] = dict(out=out, args=args, summary=summary, forwards=forwards, models=models)
    return runs


RUNS = [(p, r) for p in ("helpful", "safe") for r in (0, 4)]
RUN_IDS = [f"{p}-{'lora' if r else 'full'}" for p, r in RUNS]


@pytest.mark.parametrize("run_key", RUNS, ids=RUN_IDS)
def test_the_reference_runs_once_per_batch_without_autograd(dpo_runs, tiny_models, run_key):
    run_ = dpo_runs[run_key]
    micro_batches, eval_batches = TRAIN_PAIRS // 4, math.ceil(EVAL_PAIRS / 32)
    # every epoch: per training batch the reference (no autograd) then the policy (autograd); then the evaluation
    epoch = [("reference", False), ("policy", True)] * micro_batches + [("reference", False),
                                                                        ("policy", False)] * eval_batches
    assert run_["forwards"] == epoch * 4
    if run_key[1]:  # LoRA: one model, no second copy
        assert len(run_["models"]) == 1
    else:  # a frozen copy: no gradients, and its weights are still the starting checkpoint's
        reference = run_["models"][1]
        assert len(run_["models"]) == 2 and not any(p.requires_grad for p in reference.parameters())
        start = load_file(f"{tiny_models['llava']}/model.safetensors")
        assert all(torch.equal(p, start[name]) for name, p in reference.state_dict().items() if name in start)


@pytest.mark.parametrize("run_key", RUNS, ids=RUN_IDS)
def test_the_output_reloads_and_has_learnt_the_training_preferences(dpo_runs, tiny_models, toy_world_dir, run_key):
    run_ = dpo_runs[run_key]
    out, summary = run_["out"], run_["summary"]
    for name in ("args.json", "metrics.jsonl", "summary.json", "README.md"):
        assert (out / name).is_file(), name
    weights = "adapter_model.safetensors" if run_key[1] else "model.safetensors"
    assert (out / weights).is_file()
    assert json.loads((out / "summary.json").read_text())["optimizer_steps"] == 16 == summary["optimizer_steps"]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 17))
    for r in train:
        assert r["train/reward_margin"] == pytest.approx(r["train/chosen_reward"] - r["train/rejected_reward"],
                                                         abs=1e-6)
        assert 0.0 <= r["train/accuracy"] <= 1.0 and math.isfinite(r["train/loss"])
    # the first step starts from the reference itself: every log-ratio is exactly 0, so loss = log 2 and every pair
    # is a tie (accuracy 0)
    assert train[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[0]["train/reward_margin"] == 0.0 and train[0]["train/accuracy"] == 0.0
    assert summary["eval/pairs"] == EVAL_PAIRS and set(summary["eval/per_category"]) == {
        "chemical_hazard", "fire_risk", "sharp_objects"}

    preference = run_key[0]
    policy, processor, family = load_policy(str(out))  # as evaluate.py loads a policy (LoRA: merged onto its base)
    reference, _, _ = load_policy(tiny_models["llava"])
    loader = pair_loader(processor, family, toy_world_dir, preference)
    before = train_dpo.evaluate(reference, reference, loader, family, 0.1, "cpu")
    after = train_dpo.evaluate(policy, reference, loader, family, 0.1, "cpu")
    assert before["eval/pairs"] == after["eval/pairs"] == TRAIN_PAIRS
    assert before["eval/accuracy"] == 0.0 and before["eval/reward_margin"] == 0.0  # untrained: all ties
    # measured: 1.0 on all 16 training pairs in each of the four runs (margins 0.31-0.88)
    assert after["eval/accuracy"] >= 0.8 and after["eval/reward_margin"] > 0.1, after
    # the reloaded policy computes what the trained one in memory did
    batch = next(iter(loader))
    with torch.no_grad():
        in_memory = train_dpo.response_log_probs(run_["models"][0].eval(), batch, family)
        reloaded = train_dpo.response_log_probs(policy, batch, family)
    assert torch.allclose(in_memory, reloaded, atol=1e-4)


def test_every_logged_figure_reaches_tensorboard(dpo_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = dpo_runs["helpful", 0]["out"]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in open(out / "metrics.jsonl") if '"train/loss"' in line]
    for name in ("train/loss", "train/reward_margin", "train/chosen_reward", "train/rejected_reward",
                 "train/accuracy"):
        assert [(e.step, e.value) for e in events.Scalars(name)] == [
            (r["step"], pytest.approx(r[name], abs=1e-6)) for r in records], name
    assert len(events.Scalars("eval/accuracy")) == 4  # one per epoch


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains(tiny_models, toy_world_dir, family, tmp_path):
    """Two steps on every family (the text one on the real PKU-SafeRLHF sample), the safety preference, gradient
    checkpointing on (the default): finite figures, the first step a tie with the reference, a folder that reloads."""
    pku_sample = ROOT / "data" / "samples" / "pku_saferlhf_train.json"
    pairs = str(pku_sample if family == "text" else toy_world_dir / "pairs")
    summary = train_dpo.main(train_dpo.Args(
        model_name_or_path=tiny_models[family], train_data=pairs, output_dir=str(tmp_path), preference="safe",
        max_train_pairs=8, per_device_batch_size=4, epochs=1, lr=1e-3, warmup_ratio=0.0, max_length=256,
        logging_steps=1, save_steps=0, eval_split=""))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and summary["family"] == family
    assert records[0]["train/reward_margin"] == 0.0 and records[0]["train/loss"] == pytest.approx(math.log(2))
    assert records[1]["train/reward_margin"] != 0.0 and all(math.isfinite(r["train/loss"]) for r in records)
    assert load_policy(str(tmp_path))[2] == family


def test_qlora_on_an_8bit_base(tiny_models, toy_world_dir, tmp_path):
    """--quantization 8bit --lora_r: the base is quantized and frozen, the adapter trains; the reference is that base
    with the adapter off, run in the policy's mode (the 8-bit kernel differs between train and eval mode), so the
    first step is an exact tie here too."""
    summary = train_dpo.main(dpo_args(tiny_models, toy_world_dir, tmp_path, epochs=2, lr=LR[4], lora_r=4,
                                      quantization="8bit", eval_split="", merge_lora=True, **LORA))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert records[0]["train/reward_margin"] == 0.0 and summary["optimizer_steps"] == 8
    assert summary["train/reward_margin"] > 0.0 and math.isfinite(summary["train/loss"])
    assert (tmp_path / "adapter_model.safetensors").is_file() and load_policy(str(tmp_path))[2] == "llava"
    assert (tmp_path / "merged" / "model.safetensors").is_file()  # --merge_lora: full weights too
    assert load_policy(str(tmp_path / "merged"))[2] == "llava"


# ---- 5. two ranks equal one ---------------------------------------------------------------------------------------


# 12-25 s each (measured); DDP with full fine-tuning stays in the default suite
@pytest.mark.parametrize("lora_r,fsdp", [(0, False), pytest.param(4, False, marks=pytest.mark.slow),
                                         pytest.param(0, True, marks=pytest.mark.slow)],
                         ids=["ddp", "ddp-lora", "fsdp"])
def test_two_ranks_equal_one_rank(tiny_models, toy_world_dir, tmp_path, lora_r, fsdp):
    """Two optimizer steps of 8 pairs: one rank with micro-batches of 8, and two ranks (gloo; DDP, or FSDP2 with the
    reference sharded too) with micro-batches of 2 and 2 accumulation steps (4 pairs per rank per step, as the ranks'
    shards interleave the one-rank order). Each rank's loss is the mean over its pairs, so the ranks' average is the
    one-rank mean; they differ only in the order of the sums (tolerances of tests/test_fsdp.py)."""
    common = dict(epochs=1, lr=LR[lora_r], warmup_ratio=0.0, save_steps=1, lora_r=lora_r,
                  **(LORA if lora_r else {}))
    one = dpo_args(tiny_models, toy_world_dir, tmp_path / "one", per_device_batch_size=8, **common)
    train_dpo.main(one)
    two = dpo_args(tiny_models, toy_world_dir, tmp_path / "two", per_device_batch_size=2,
                   gradient_accumulation_steps=2, fsdp=fsdp, **common)
    # DDP: both ranks hold the same weights at every checkpoint (FSDP: each holds its own shards, by design)
    result = torchrun(argv_of(two), harness=[] if fsdp else ["--dump_weights"])
    assert result.returncode == 0, result.stdout[-3000:]
    if not fsdp:
        ranks_agree(tmp_path / "two", [1, 2])
    for file, difference in max_weight_difference(tmp_path / "one", tmp_path / "two").items():
        assert difference <= WEIGHT_TOLERANCE, f"{file}: {difference}"
    moved = max_weight_difference(tmp_path / "one" / "checkpoints" / "checkpoint-00000001" / "model",
                                  tmp_path / "one")
    assert max(moved.values()) > 10 * WEIGHT_TOLERANCE  # step 2 moved the weights well beyond the tolerance
    assert_same_figures(tmp_path / "one", tmp_path / "two")  # train/*: the means over both ranks' pairs


# ---- 6. exact resume ------------------------------------------------------------------------------------------


def weight_files(lora_r: int) -> list[str]:
    return ["adapter_model.safetensors"] if lora_r else ["model.safetensors"]


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_a_resumed_run_is_bit_identical(tiny_models, toy_world_dir, tmp_path, lora_r):
    """Two epochs of 4 steps with an evaluation after each; checkpoint 3 (inside epoch 0, before its evaluation),
    resumed in a fresh output folder, ends with the uninterrupted run's weights and metrics, bit for bit."""
    options = dict(epochs=2, lr=LR[lora_r], save_steps=1, keep_checkpoints=10, lora_r=lora_r,
                   **(LORA if lora_r else {}))
    whole = tmp_path / "whole"
    train_dpo.main(dpo_args(tiny_models, toy_world_dir, whole, **options))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "checkpoint-00000003", resumed / "checkpoints" / "checkpoint-00000003")
    shutil.copy(whole / "metrics.jsonl", resumed)  # cut back to checkpoint 3's lines on resume
    shutil.copy(whole / "args.json", resumed)
    summary = train_dpo.main(dpo_args(tiny_models, toy_world_dir, resumed, resume_from="auto", **options))
    assert_identical_runs(whole, resumed, weight_files(lora_r))
    expected = json.loads((whole / "summary.json").read_text())
    summary = json.loads(json.dumps(summary))
    assert {k: v for k, v in summary.items() if k != "seconds"} == {k: v for k, v in expected.items() if k != "seconds"}


@pytest.mark.slow  # 22-38 s (measured): two runs as subprocesses; the default suite resumes in process
def test_resume_after_sigkill_is_bit_identical(tiny_models, toy_world_dir, tmp_path):
    argv = lambda out: argv_of(dpo_args(tiny_models, toy_world_dir, out, epochs=2, lr=LR[0], save_steps=1))
    run(argv(tmp_path / "a"))
    kill_after = random.Random(os.getpid()).randint(1, 7)
    run_and_kill(argv(tmp_path / "b"), tmp_path / "b", f"checkpoints/checkpoint-{kill_after:08d}")
    assert not (tmp_path / "b" / "summary.json").exists()
    resumed = run(argv(tmp_path / "b") + ["--resume_from=auto"])
    assert "resumed from" in resumed.stdout
    assert_identical_runs(tmp_path / "a", tmp_path / "b", weight_files(0))


# ---- 7. the command line ------------------------------------------------------------------------------------------


def test_help_lists_every_option_with_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    proc = subprocess.run([sys.executable, "train_dpo.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(SystemExit) as exit_info:
        parse_args(train_dpo.Args, ["--help"])
    assert exit_info.value.code == 0
    options = _help_options(capsys.readouterr().out)
    assert _help_options(proc.stdout) == options
    for f in dataclasses.fields(train_dpo.Args):
        assert f"--{f.name}" in options and "(default:" in options[f"--{f.name}"], f.name
    assert "(default: 0.1)" in options["--beta"]
    assert "(default: helpful)" in options["--preference"] and "safer_response_id" in options["--preference"]
    assert "(default: 1e-06)" in options["--lr"] and "(default: cosine)" in options["--lr_scheduler"]
    assert "(default: runs/sft)" in options["--model_name_or_path"]
    assert "(default: runs/dpo)" in options["--output_dir"]
    assert parse_args(train_dpo.Args, ["--preference", "safe", "--beta", "0.5"]).beta == 0.5


def test_evaluate_generates_from_dpo_outputs_like_any_policy(dpo_runs, tiny_models, toy_world_dir, tmp_path):
    """evaluate.py needs nothing new for DPO: its outputs (a full policy folder, a LoRA adapter naming its base) load
    through the same --models NAME=folder path as SFT's and PPO's; the answers are the trained policy's (greedy:
    equal to those of the folder loaded with load_policy), whose logits are not the starting model's."""
    import evaluate

    full, lora = dpo_runs["safe", 0]["out"], dpo_runs["safe", 4]["out"]
    out = tmp_path / "gen.jsonl"
    data = str(toy_world_dir / "pairs")
    result = evaluate.main(["generate", "--models", f"DPO-Safe={full}", f"DPO-Safe-LoRA={lora}", "--data", data,
                            "--limit", "3", "--max_new_tokens", "6", "--batch_size", "3", "--do_sample", "false",
                            "--output", str(out)])
    assert result["models"] == {"DPO-Safe": {"new": 3, "skipped": 0}, "DPO-Safe-LoRA": {"new": 3, "skipped": 0}}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    options = evaluate.GenerateArgs(data=data, max_new_tokens=6, do_sample=False)
    prompts = evaluate.load_eval_prompts(options)
    start, _, _ = load_policy(tiny_models["llava"])
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    for name, folder in (("DPO-Safe", full), ("DPO-Safe-LoRA", lora)):
        policy, processor, family = load_policy(str(folder))
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["prompt_id"])
        answers = evaluate.generate_answers(policy, processor, family, [prompts[r["prompt_id"]] for r in mine], options)
        assert [r["response"] for r in mine] == [text for text, _, _ in answers], name
        with torch.no_grad():
            assert not torch.allclose(policy(input_ids=ids).logits, start(input_ids=ids).logits), name
