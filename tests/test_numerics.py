"""Precision and optimisation where users train (bf16, gradient accumulation, quantized bases), reproduced on CPU.

- bf16: trained roles keep fp32 master weights (an update of lr 5e-7 is lost in bf16 weights) and score heads run
  in fp32 outside autocast;
- gradient accumulation: an accumulated run equals the unaccumulated one with the same effective batch, and PPO
  refuses an accumulation that does not divide its minibatches;
- quantization: refused for fully trained models; a quantized PPO reference reports its step-0 KL.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import train_cm
import train_ppo_lag
import train_rm
import train_sft
from data import collate, encode_example, load_prompts
from modeling import ScoreModel
from utils import get_tokenizer
from test_reliability import score_models  # noqa: F401

LR = 5e-7  # the paper's PPO learning rate


def language_model_matrices(weights: dict) -> dict:
    """The 2-D weights of the language model's layers (every element of them receives a gradient each step;
    embedding rows of unseen tokens and the frozen vision tower do not)."""
    return {k[k.index("layers."):]: v for k, v in weights.items()  # keyed from "layers.": checkpoint prefixes vary
            if v.ndim == 2 and ".layers." in k and "vision" not in k}


def changed_fraction(before: dict, after: dict) -> float:
    """Share of the language model's weights that differ after training (which must have saved fp32 masters)."""
    changed = total = 0
    after = language_model_matrices(after)
    assert all(v.dtype == torch.float32 for v in after.values()), "the trained weights are not fp32 masters"
    for k, v in language_model_matrices(before).items():
        changed += int((after[k].float() != v.float()).sum())
        total += v.numel()
    assert total > 0
    return changed / total


def stage_args(tiny_models, toy_world_dir, out, **extra):
    return dict(model_name_or_path=tiny_models["llava"], max_length=256, per_device_batch_size=4,
                gradient_checkpointing=False, logging_steps=1, output_dir=str(out), **extra)


# ---- bf16: fp32 masters, fp32 scores -----------------------------------------------------------------------------


def test_sft_in_bf16_keeps_fp32_masters(tiny_models, toy_world_dir, tmp_path):
    train_sft.main(train_sft.Args(**stage_args(tiny_models, toy_world_dir, tmp_path, dtype="bfloat16", lr=LR,
                                               lr_scheduler="constant", warmup_ratio=0.0, max_train_examples=12,
                                               train_data=str(toy_world_dir / "sft" / "train.jsonl"), epochs=1)))
    before = load_file(f"{tiny_models['llava']}/model.safetensors")
    assert changed_fraction(before, load_file(tmp_path / "model.safetensors")) >= 0.99


@pytest.mark.parametrize("module", [train_rm, train_cm])
def test_score_models_in_bf16_keep_fp32_masters(module, tiny_models, toy_world_dir, tmp_path):
    module.main(module.Args(**stage_args(tiny_models, toy_world_dir, tmp_path, dtype="bfloat16", lr=LR,
                                         lr_scheduler="constant", warmup_ratio=0.0, max_train_pairs=12, epochs=1,
                                         train_data=str(toy_world_dir / "pairs"), eval_batch_size=32)))
    initial, _ = ScoreModel.from_pretrained(tiny_models["llava"])  # the backbone the score model starts from
    assert changed_fraction(initial.backbone.state_dict(), load_file(tmp_path / "model.safetensors")) >= 0.99
    assert load_file(tmp_path / "score_head.safetensors")["weight"].dtype == torch.float32


def test_ppo_in_bf16_keeps_fp32_masters(tiny_models, toy_world_dir, score_models, tmp_path):  # noqa: F811
    summary = train_ppo_lag.main(train_ppo_lag.Args(
        actor_model_name_or_path=tiny_models["llava"], reward_model_name_or_path=str(score_models / "rm"),
        cost_model_name_or_path=str(score_models / "cm"), train_data=str(toy_world_dir / "sft" / "train.jsonl"),
        dtype="bfloat16", actor_lr=LR, critic_lr=LR, actor_warmup_ratio=0.0, max_steps=3,
        per_device_prompt_batch_size=4, per_device_train_batch_size=4, max_new_tokens=6, max_length=256,
        lambda_init=1.0, threshold=0.0, output_dir=str(tmp_path)))
    assert summary["steps"] == 3 and summary["optimizer_steps"] == 3
    before = load_file(f"{tiny_models['llava']}/model.safetensors")
    assert changed_fraction(before, load_file(tmp_path / "actor" / "model.safetensors")) >= 0.99
    for critic, source in (("reward_critic", "rm"), ("cost_critic", "cm")):
        assert changed_fraction(load_file(score_models / source / "model.safetensors"),
                                load_file(tmp_path / critic / "model.safetensors")) >= 0.99, critic
    # the bf16 reference against the fp32-master actor under bf16 autocast: a small, reported step-0 KL
    assert abs(summary["initial_kl"]) < 0.05


def test_score_head_runs_in_fp32_under_autocast(tiny_models, toy_world_dir):
    model, processor = ScoreModel.from_pretrained(tiny_models["llava"], dtype="bfloat16")
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score_head.weight, std=3.0)  # scores of a few units, as a trained reward model's
    rows, _ = load_prompts(str(toy_world_dir / "pairs"), limit=6)
    batch = collate([encode_example(processor, "llava", r["question"], r["image"], "It is red.", 256) for r in rows],
                    get_tokenizer(processor).pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores, end_scores = model(batch)
    assert scores.dtype == end_scores.dtype == torch.float32
    assert end_scores.abs().max() > 1
    # a bf16 head would give scores on the bf16 grid (a resolution of 0.03 at |r| ~ 5): these are finer
    assert (end_scores != end_scores.to(torch.bfloat16).float()).any()


def test_float16_training_is_refused(tiny_models, toy_world_dir, tmp_path):
    with pytest.raises(SystemExit, match="float16 is not supported for training"):
        train_sft.main(train_sft.Args(**stage_args(tiny_models, toy_world_dir, tmp_path, dtype="float16",
                                                   train_data=str(toy_world_dir / "sft" / "train.jsonl"))))


# ---- gradient accumulation ---------------------------------------------------------------------------------------


def ppo(tiny_models, toy_world_dir, score_models, out, **extra):  # noqa: F811
    args = dict(actor_model_name_or_path=tiny_models["llava"], reward_model_name_or_path=str(score_models / "rm"),
                cost_model_name_or_path=str(score_models / "cm"),
                train_data=str(toy_world_dir / "sft" / "train.jsonl"), actor_lr=1e-3, critic_lr=1e-3,
                actor_warmup_ratio=0.0, max_steps=1, update_iters=2, per_device_prompt_batch_size=4,
                max_new_tokens=6, max_length=256, lambda_init=1.0, threshold=0.0, output_dir=str(out))
    return train_ppo_lag.main(train_ppo_lag.Args(**{**args, **extra}))


def assert_close_weights(a, b, files, atol=1e-5, max_share=1e-3):
    """The weights of two runs agree within `atol` (1% of one Adam step at lr 1e-3) on all but `max_share` of the
    elements. Not on all of them: Adam divides by the gradient's own size, so for an element whose gradient is
    ~1e-8 the float summation order (minibatch of 4 vs two of 2, other padding) can change the update by up to lr."""
    off = total = 0
    for name in files:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys()
        for key in x:
            off += int(((x[key] - y[key]).abs() > atol).sum())
            total += x[key].numel()
    assert off <= max_share * total, f"{off} of {total} weights differ by more than {atol}"


def test_ppo_accumulation_equals_the_same_effective_batch(tiny_models, toy_world_dir, score_models, tmp_path):  # noqa: F811
    """4 rollouts, 2 PPO epochs: minibatches of 4 without accumulation vs minibatches of 2 accumulated in pairs.
    Same permutation, same per-sequence means, so the same two optimizer steps up to float summation order."""
    whole = ppo(tiny_models, toy_world_dir, score_models, tmp_path / "whole", per_device_train_batch_size=4)
    accumulated = ppo(tiny_models, toy_world_dir, score_models, tmp_path / "acc", per_device_train_batch_size=2,
                      gradient_accumulation_steps=2)
    assert whole["optimizer_steps"] == accumulated["optimizer_steps"] == 2
    files = ["actor/model.safetensors", "reward_critic/model.safetensors", "reward_critic/score_head.safetensors",
             "cost_critic/model.safetensors", "cost_critic/score_head.safetensors"]
    assert_close_weights(tmp_path / "whole", tmp_path / "acc", files)
    # Adam hides a wrong gradient scale (a missing / accumulation_steps); the logged gradient norms do not
    for name in ("actor_grad_norm", "reward_critic_grad_norm", "cost_critic_grad_norm"):
        assert accumulated["final"][name] == pytest.approx(whole["final"][name], rel=1e-4), name
    before = load_file(f"{tiny_models['llava']}/model.safetensors")
    assert changed_fraction(before, load_file(tmp_path / "acc" / "actor" / "model.safetensors")) > 0.9  # it trained


def test_ppo_refuses_accumulation_that_does_not_divide(tiny_models, toy_world_dir, score_models, tmp_path):  # noqa: F811
    # the defaults (prompt batch 2, train batch 2): one minibatch per step, which accumulation 2 never completes
    with pytest.raises(SystemExit, match=r"--gradient_accumulation_steps 2 does not divide the 1 minibatches"):
        ppo(tiny_models, toy_world_dir, score_models, tmp_path, per_device_prompt_batch_size=2,
            per_device_train_batch_size=2, update_iters=1, gradient_accumulation_steps=2)


def test_rm_accumulation_equals_the_same_effective_batch(tiny_models, toy_world_dir, tmp_path):
    common = dict(train_data=str(toy_world_dir / "pairs"), max_train_pairs=16, epochs=1, lr=1e-3,
                  lr_scheduler="constant", warmup_ratio=0.0, eval_batch_size=32)
    whole = train_rm.main(train_rm.Args(**{**stage_args(tiny_models, toy_world_dir, tmp_path / "whole", **common),
                                           "per_device_batch_size": 8}))
    accumulated = train_rm.main(train_rm.Args(**{**stage_args(tiny_models, toy_world_dir, tmp_path / "acc", **common),
                                                 "per_device_batch_size": 4, "gradient_accumulation_steps": 2}))
    assert whole["optimizer_steps"] == accumulated["optimizer_steps"] == 2
    assert_close_weights(tmp_path / "whole", tmp_path / "acc", ["model.safetensors", "score_head.safetensors"])
    norms = [[r["grad_norm"] for r in map(json.loads, open(out / "metrics.jsonl")) if "grad_norm" in r]
             for out in (tmp_path / "whole", tmp_path / "acc")]
    assert len(norms[0]) == 2 and norms[1] == pytest.approx(norms[0], rel=1e-4)  # the same accumulated gradient


# ---- quantization ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [train_sft, train_rm, train_cm])
def test_quantized_full_training_is_refused(module, tiny_models, toy_world_dir, tmp_path):
    data = toy_world_dir / ("sft/train.jsonl" if module is train_sft else "pairs")
    with pytest.raises(SystemExit, match="cannot be fully fine-tuned"):
        module.main(module.Args(**stage_args(tiny_models, toy_world_dir, tmp_path, quantization="8bit",
                                             train_data=str(data))))


KL_ROUNDING = 1.6e-5  # see test_quantized_reference_reports_its_step0_kl


def test_quantized_reference_reports_its_step0_kl(tiny_models, toy_world_dir, score_models, tmp_path, capsys):  # noqa: F811
    exact = ppo(tiny_models, toy_world_dir, score_models, tmp_path / "fp32", per_device_train_batch_size=4)
    # Same weights, same precision, but the actor's log-probs come from the rollout's forward and the reference's
    # from its own (another batch shape, so possibly other kernels and summation order): each fp32 log-prob
    # (a log-softmax over the vocabulary) may differ in its last bit, ~1e-7 relative on values of a few nats, and
    # the KL sums them over each response's tokens (here <= 6): |KL| <= 1.6e-5 covers it with margin
    # (3.6e-7 measured here and on an AVX-512 Xeon; 0 on the machine where the exact assert passed). Bit identity is
    # not the claim; "no gap" is.
    assert abs(exact["initial_kl"]) <= KL_ROUNDING
    quantized = ppo(tiny_models, toy_world_dir, score_models, tmp_path / "int8", per_device_train_batch_size=4,
                    quantization="8bit")
    out = capsys.readouterr().out
    assert "the reference is 8bit-quantized" in out and "KL(actor || reference) of the first rollout" in out
    assert abs(quantized["initial_kl"]) > 10 * KL_ROUNDING  # a real gap (measured 1.7e-3), above the rounding
    first = json.loads((tmp_path / "int8" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kl"] == quantized["initial_kl"]
    print(f"step-0 KL with an 8-bit reference: {quantized['initial_kl']:.4f} nats per response")
