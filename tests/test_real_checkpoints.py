"""What real checkpoints do that the tiny fixtures hide (issue: real checkpoints and real data), PPO and stage side:
on-policy sampling whatever the checkpoint's generation_config says, temperature in every log-prob, lean forwards
(logits for response positions only, chunked log-softmax, entropy without autograd, rollout micro-batches, one role's
graph at a time), the missing-EOS penalty, one write of the final models, one-line data errors, --max_steps in every
stage, the evaluation length, and the notices of what was done to a model (pad = EOS, max_pixels).
"""

import copy
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import ppo_steps
import train_ppo_lag
from data import collate, encode_example, load_prompts
from infra.ppo_setup import Roles
from modeling import ScoreModel, generate, load_policy, load_processor, never_sample_ids, token_log_probs
from utils import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def prompt_batch_for(processor, family, rows):
    examples = [encode_example(processor, family, r["question"], r["image"], None, 256) for r in rows]
    return collate(examples, get_tokenizer(processor).pad_token_id, "left")


@pytest.fixture(scope="module")
def sampling_checkpoint(tiny_models, tmp_path_factory):
    """The tiny LLaVA saved with a generation_config that sets sampling options, as Qwen2-VL-Instruct's does."""
    model, processor, _ = load_policy(tiny_models["llava"])
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.top_k = 5
    model.generation_config.do_sample = True
    out = tmp_path_factory.mktemp("sampling_ckpt")
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["repetition_penalty"] == 1.3 and saved["top_k"] == 5
    return str(out)


# ---- 2. on-policy generation ----------------------------------------------------------------------------------


def test_token_log_probs_by_hand():
    """logits [0, ln 3, 5] with id 2 never sampled: p = [1/4, 3/4]; at T = 0.5: logits/T = [0, 2 ln 3], p = [1/10,
    9/10]. The chunked path (chunk of 1 position) equals the whole, values and gradients."""
    logits = torch.tensor([[[0.0, math.log(3.0), 5.0], [0.0, math.log(3.0), 5.0]]], requires_grad=True)
    tokens = torch.tensor([[1, 0]])
    out = token_log_probs(logits, tokens, 1.0, [2])
    assert torch.allclose(out, torch.tensor([[math.log(0.75), math.log(0.25)]]), atol=1e-6)
    out_t = token_log_probs(logits, tokens, 0.5, [2])
    assert torch.allclose(out_t, torch.tensor([[math.log(0.9), math.log(0.1)]]), atol=1e-6)
    chunked = token_log_probs(logits, tokens, 0.5, [2], chunk_size=1)
    assert torch.allclose(chunked, out_t)
    (grad_whole,) = torch.autograd.grad(out_t.sum(), logits)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    assert torch.allclose(grad_whole, grad_chunked) and grad_whole[0, 0, 2] == 0  # a suppressed id gets no gradient
    # d log p(1) / d logit_1 = (1 - p_1) / T = 0.1 / 0.5
    assert grad_whole[0, 0, 1].item() == pytest.approx(0.2, abs=1e-6)
    _, entropy = token_log_probs(logits, tokens, 1.0, [2], with_entropy=True)
    assert not entropy.requires_grad  # a diagnostic: never part of the graph
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert torch.allclose(entropy, torch.tensor([[h, h]]), atol=1e-6)


@pytest.mark.parametrize("lora", [False, True])
def test_generation_is_on_policy_whatever_the_checkpoint_config(sampling_checkpoint, toy_world_dir, lora):
    """A checkpoint whose generation_config sets repetition_penalty 1.3 and top_k 5, sampled at temperature 0.7:
    the log-probs of the sampling distribution equal the training forward's (same T, same suppressed ids) within
    1e-5, and the sampled tokens are not restricted to the top 5. The same under a peft (LoRA) wrapper, whose
    transformers model is the one generate() reads its config from."""
    lora_options = {"r": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]} if lora else None
    model, processor, family = load_policy(sampling_checkpoint, lora=lora_options)
    model.eval()
    rows, _ = load_prompts(str(toy_world_dir / "pairs"), limit=8)
    torch.manual_seed(0)
    out = generate(model, processor, family, prompt_batch_for(processor, family, rows), 12, temperature=0.7)
    assert model.generation_config.repetition_penalty == 1.3  # the checkpoint's config is back in place
    assert not lora or "generation_config" not in vars(model)  # not shadowed on the peft wrapper
    mask = out["response_mask"][:, 1:]
    with torch.no_grad():
        forward = train_ppo_lag.policy_log_probs(model, out, family, torch.float32, 0.7, never_sample_ids(processor))
    assert (out["sampling_log_probs"] - forward).masked_select(mask).abs().max() <= 1e-5
    assert not out["sampling_log_probs"].masked_select(~mask).any()
    with torch.no_grad():
        logits = model(**{k: out[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits[:, :-1].float()
    chosen = logits.gather(-1, out["input_ids"][:, 1:].unsqueeze(-1))
    ranks = (logits > chosen).sum(-1)  # 0 = the most likely token
    assert ranks.masked_select(mask).max() >= 5, "sampling was restricted to the top 5: the checkpoint's top_k leaked"


def test_fresh_forward_and_sampling_log_probs_agree_in_a_rollout(tiny_models, toy_world_dir, score_dirs_llava):
    """--old_log_probs sampling and forward give the same rollout (fp32, left padding) to 1e-5; the temperature
    enters pi_ref as well (the KL at step 0 is 0 for an identical reference at any T)."""
    roles, processor, family = load_roles_llava(tiny_models, score_dirs_llava)
    rows, _ = load_prompts(str(toy_world_dir / "pairs"), limit=4)
    prompt_batch = prompt_batch_for(processor, family, rows)
    results = {}
    for source in ("sampling", "forward"):
        args = train_ppo_lag.Args(max_new_tokens=6, temperature=0.8, old_log_probs=source, dtype="float32")
        torch.manual_seed(0)
        results[source] = ppo_steps.rollout_and_values(roles, processor, family, prompt_batch, args)[0]
    a, b = results["sampling"], results["forward"]
    assert torch.equal(a.batch["input_ids"], b.batch["input_ids"])
    assert (a.old_log_probs - b.old_log_probs).abs().max() <= 1e-5
    assert (a.old_log_probs - a.ref_log_probs).masked_select(a.mask).abs().max() <= 1e-5  # identical reference


# ---- 4. lean forwards ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def score_dirs_llava(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores_llava_rc")
    dirs = []
    for seed, name in ((1, "rm"), (2, "cm")):
        torch.manual_seed(seed)
        model, processor = ScoreModel.from_pretrained(tiny_models["llava"])
        model.save_pretrained(str(out / name), processor)
        dirs.append(str(out / name))
    return tuple(dirs)


def load_roles_llava(tiny_models, score_dirs_llava):
    actor, processor, family = load_policy(tiny_models["llava"])
    reference, _, _ = load_policy(tiny_models["llava"])
    rm_dir, cm_dir = score_dirs_llava
    (reward_model, _), (reward_critic, _) = ScoreModel.from_pretrained(rm_dir), ScoreModel.from_pretrained(rm_dir)
    (cost_model, _), (cost_critic, _) = ScoreModel.from_pretrained(cm_dir), ScoreModel.from_pretrained(cm_dir)
    for frozen in (reference, reward_model, cost_model):
        frozen.eval().requires_grad_(False)
    return Roles(actor, reference, reward_model, reward_critic, cost_model, cost_critic), processor, family


def test_policy_log_probs_compute_logits_for_response_positions_only(tiny_models, toy_world_dir):
    """The LM head sees only the positions that predict response tokens (not the 16 image tokens and the prompt),
    and the result equals the log-softmax of the whole sequence's logits, 0 before the response."""
    model, processor, family = load_policy(tiny_models["llava"])
    model.eval()
    rows, _ = load_prompts(str(toy_world_dir / "pairs"), limit=3)
    prompt_batch = prompt_batch_for(processor, family, rows)
    torch.manual_seed(0)
    batch = generate(model, processor, family, prompt_batch, 5)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[1]))
    try:
        lean = train_ppo_lag.policy_log_probs(model, batch, family)
    finally:
        hook.remove()
    prompt_len, length = prompt_batch["input_ids"].shape[1], batch["input_ids"].shape[1]
    assert seen == [length - prompt_len + 1] and length - prompt_len + 1 < prompt_len
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits
    full = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["response_mask"][:, 1:]
    assert (lean - full).masked_select(mask).abs().max() <= 1e-5
    assert not lean[:, :prompt_len - 1].any()
    # a response that ended early: pad after it, a token the sampling distribution excludes (log-prob -inf there);
    # outside the response the log-probs are 0, so that sums over the mask (the logged KL) stay finite
    pad = get_tokenizer(processor).pad_token_id
    batch["input_ids"][0, -2:], batch["response_mask"][0, -2:], batch["attention_mask"][0, -2:] = pad, False, 0
    with torch.no_grad():
        ended_early = train_ppo_lag.policy_log_probs(model, batch, family, never_sampled=never_sample_ids(processor))
    assert torch.isfinite(ended_early).all() and not ended_early[0, -2:].any()
    kl = ((ended_early - ended_early) * batch["response_mask"][:, 1:]).sum(-1)
    assert torch.isfinite(kl).all()


def test_rollout_micro_batches_give_the_same_rollout(tiny_models, toy_world_dir, score_dirs_llava):
    roles, processor, family = load_roles_llava(tiny_models, score_dirs_llava)
    rows, _ = load_prompts(str(toy_world_dir / "pairs"), limit=4)
    prompt_batch = prompt_batch_for(processor, family, rows)
    results = []
    for size in (0, 1, 3):
        args = train_ppo_lag.Args(max_new_tokens=6, rollout_micro_batch_size=size, old_log_probs="forward")
        torch.manual_seed(0)
        results.append(ppo_steps.rollout_and_values(roles, processor, family, prompt_batch, args)[0])
    for other in results[1:]:
        for field in ("old_log_probs", "ref_log_probs", "end_rewards", "end_costs", "old_reward_values",
                      "old_cost_values", "reward_advantages", "cost_returns"):
            assert torch.allclose(getattr(results[0], field), getattr(other, field), atol=1e-5), field


def test_each_role_backpropagated_alone_gives_the_summed_gradients(tiny_models, toy_world_dir, score_dirs_llava):
    """ppo_update backpropagates the actor, then each critic, one at a time; the gradients each optimizer steps on
    equal those of one backward of the summed losses (computed here from the same minibatch)."""
    roles, processor, family = load_roles_llava(tiny_models, score_dirs_llava)
    rows, _ = load_prompts(str(toy_world_dir / "pairs"), limit=2)
    # (V_old from a separate forward: with --reuse_critic_forward step 4 would already backpropagate the critics)
    args = train_ppo_lag.Args(max_new_tokens=6, per_device_train_batch_size=2, kl_coeff=0.1, max_grad_norm=0.0,
                              reuse_critic_forward=False)
    torch.manual_seed(0)
    r = train_ppo_lag.advantage_step(ppo_steps.rollout_and_values(
        roles, processor, family, prompt_batch_for(processor, family, rows), args)[0], 1.5)
    trained = roles.trained()
    copies = {name: copy.deepcopy(model) for name, model in trained.items()}
    captured = {}

    class Capture(torch.optim.SGD):
        def __init__(self, name, params):
            super().__init__(params, lr=0.0)
            self.name = name

        def step(self, closure=None):
            captured[self.name] = [p.grad.clone() for group in self.param_groups for p in group["params"]]

    optimizers = {name: (Capture(name, [p for p in m.parameters() if p.requires_grad]),
                         torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=0.0), lambda s: 1.0))
                  for name, m in trained.items()}
    torch.manual_seed(1)
    ppo_steps.update(trained, optimizers, r, family, args)
    # the same minibatch (randperm of 2 rows with the same seed), one summed backward
    torch.manual_seed(1)
    index = torch.randperm(2)
    mb, mask = train_ppo_lag.slice_batch(r.batch, index), r.mask[index]
    for model in copies.values():
        model.train()
    log_probs = train_ppo_lag.policy_log_probs(copies["actor"], mb, family, torch.float32, args.temperature,
                                               r.never_sampled)
    total = train_ppo_lag.actor_loss(log_probs, r.old_log_probs[index], r.advantages[index], mask, 0.2)
    for name, old, returns in (("reward_critic", r.old_reward_values, r.reward_returns),
                               ("cost_critic", r.old_cost_values, r.cost_returns)):
        total = total + train_ppo_lag.critic_loss(train_ppo_lag.critic_values(copies[name], mb), old[index],
                                                  returns[index], mask, 5.0)
    total.backward()
    for name, model in copies.items():
        expected = [p.grad for p in model.parameters() if p.requires_grad]
        assert len(expected) == len(captured[name])
        for got, want in zip(captured[name], expected):
            assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), name


# ---- 3. missing EOS ----------------------------------------------------------------------------------------


def test_missing_eos_penalty_lowers_the_end_reward_of_truncated_responses(tiny_models, toy_world_dir,
                                                                           score_dirs_llava):
    """With 3 new tokens the random tiny actor rarely ends: the return at a truncated response's last token is lower
    by exactly the penalty, an ended one's is unchanged; the logged end reward stays the reward model's."""
    roles, processor, family = load_roles_llava(tiny_models, score_dirs_llava)
    rows, _ = load_prompts(str(toy_world_dir / "pairs"), limit=4)
    prompt_batch = prompt_batch_for(processor, family, rows)
    results = []
    for penalty in (0.0, 3.0):
        args = train_ppo_lag.Args(max_new_tokens=3, missing_eos_penalty=penalty)
        torch.manual_seed(0)
        results.append(ppo_steps.rollout_and_values(roles, processor, family, prompt_batch, args)[0])
    plain, penalised = results
    # the same seeded rollout scored by the same reward model: the penalty touches only the returns (bit identity)
    assert torch.equal(plain.end_rewards, penalised.end_rewards)
    last = plain.mask.long().cumsum(-1).argmax(-1)  # the last real response column
    diff = (penalised.reward_returns - plain.reward_returns).gather(1, last[:, None]).squeeze(1)
    ended = plain.batch["ended"]
    assert (~ended).any()
    assert torch.allclose(diff, torch.where(ended, 0.0, -3.0), atol=1e-5)
    assert torch.equal(plain.cost_returns, penalised.cost_returns)  # the cost is left alone
    figures = train_ppo_lag.step_figures(train_ppo_lag.advantage_step(plain, 1.0), {})
    assert figures["truncated_rate"] == pytest.approx(1.0 - ended.float().mean().item())
    assert all(math.isfinite(v) for v in figures.values()), figures


def test_top_p_below_one_is_refused_as_off_policy():
    with pytest.raises(SystemExit, match="off-policy"):
        train_ppo_lag.check_args(train_ppo_lag.Args(top_p=0.9))


def test_a_lora_actor_folder_on_a_quantized_base_is_refused(tmp_path):
    """QLoRA PPO from an SFT LoRA adapter: the adapter stays unmerged on the quantized base, the actor's new adapter
    would replace it as the active one and the reference would disable it: both would be the base, not the SFT
    policy. One line (merge it first); unquantized, the adapter is merged and the run goes on."""
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "adapter_config.json").write_text("{}")
    args = train_ppo_lag.Args(actor_model_name_or_path=str(tmp_path / "sft"), lora_r=4, quantization="4bit")
    with pytest.raises(SystemExit, match="is a LoRA adapter: on a --quantization 4bit base it cannot be merged"):
        train_ppo_lag.check_args(args)
    train_ppo_lag.check_args(train_ppo_lag.Args(actor_model_name_or_path=str(tmp_path / "sft"), lora_r=4))


# ---- mixed batches ----------------------------------------------------------------------------------------


def test_slice_batch_picks_the_images_of_the_rows_in_a_mixed_batch():
    """Rows 0 and 2 have an image, row 1 has none: rows [2, 1] get image 1 only; Qwen-style patches by counts."""
    batch = {"input_ids": torch.arange(9).view(3, 3), "has_image": torch.tensor([True, False, True]),
             "pixel_values": torch.stack([torch.full((2, 2), 10.0), torch.full((2, 2), 20.0)])}
    out = train_ppo_lag.slice_batch(batch, torch.tensor([2, 1]))
    assert torch.equal(out["input_ids"], torch.tensor([[6, 7, 8], [3, 4, 5]]))
    assert out["pixel_values"].shape == (1, 2, 2) and out["pixel_values"].eq(20.0).all()
    qwen = {"input_ids": torch.zeros(3, 2), "has_image": torch.tensor([True, False, True]),
            "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 1]]),
            "pixel_values": torch.cat([torch.full((4, 3), 1.0), torch.full((2, 3), 2.0)])}
    out = train_ppo_lag.slice_batch(qwen, torch.tensor([2, 0]))
    assert torch.equal(out["image_grid_thw"], torch.tensor([[1, 2, 1], [1, 2, 2]]))
    assert torch.equal(out["pixel_values"][:, 0], torch.tensor([2.0, 2.0, 1.0, 1.0, 1.0, 1.0]))


# ---- the final save writes each model once --------------------------------------------------------------------


def run_script(script, *argv, check=True):
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


# slow (~10 s)
@pytest.mark.slow
def test_stages_publish_the_final_checkpoint_without_writing_it_again(tiny_models, toy_world_dir, tmp_path):
    """SFT and RM with --max_steps 2: two optimizer steps, and the model files in the output folder are the final
    checkpoint's files (hard links: the same inode), not a second copy."""
    sft = tmp_path / "sft"
    run_script("train_sft.py", "--model_name_or_path", tiny_models["llava"], "--train_data",
               toy_world_dir / "sft" / "train.jsonl", "--output_dir", sft, "--max_steps", 2, "--epochs", 5,
               "--per_device_batch_size", 4, "--max_length", 256)
    summary = json.loads((sft / "summary.json").read_text())
    assert summary["optimizer_steps"] == 2
    final = sorted((sft / "checkpoints").glob("checkpoint-*"))[-1]
    assert os.stat(sft / "model.safetensors").st_ino == os.stat(final / "model" / "model.safetensors").st_ino
    load_policy(str(sft))  # still a loadable model folder
    rm = tmp_path / "rm"
    run_script("train_rm.py", "--model_name_or_path", tiny_models["llava"], "--train_data", toy_world_dir / "pairs",
               "--output_dir", rm, "--max_steps", 2, "--per_device_batch_size", 4, "--max_length", 256,
               "--gradient_checkpointing", "false")
    assert json.loads((rm / "summary.json").read_text())["optimizer_steps"] == 2
    final = sorted((rm / "checkpoints").glob("checkpoint-*"))[-1]
    for name in ("model.safetensors", "score_head.safetensors"):
        assert os.stat(rm / name).st_ino == os.stat(final / "model" / name).st_ino
    assert json.loads((rm / "score_config.json").read_text())["stage"] == "reward_model"
    ScoreModel.from_pretrained(str(rm))


# ---- 7. errors as a user sees them --------------------------------------------------------------------------


# RM and CM share their data path (pair files) with PPO-Lag's prompts; each case takes ~5 s: two are slow
@pytest.mark.parametrize("script", ["train_sft.py", pytest.param("train_rm.py", marks=pytest.mark.slow),
                                    pytest.param("train_cm.py", marks=pytest.mark.slow), "train_ppo_lag.py"])
def test_a_bad_row_stops_a_stage_with_one_line(script, tiny_models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "What colour is it?", "response": 3}) + "\n" if script == "train_sft.py"
                   else json.dumps({"prompt": "q", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
                                    "is_response_1_safe": False, "better_response_id": 7,
                                    "safer_response_id": 0}) + "\n")
    models = (["--actor_model_name_or_path", tiny_models["text"], "--reward_model_name_or_path", tiny_models["text"],
               "--cost_model_name_or_path", tiny_models["text"]] if script == "train_ppo_lag.py"
              else ["--model_name_or_path", tiny_models["text"]])
    result = run_script(script, *models, "--train_data", bad, "--output_dir", tmp_path / "out", check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and str(bad) in error_lines[0] and "row 0" in error_lines[0]
    assert ("field 'response'" if script == "train_sft.py" else "field 'better_response_id'") in error_lines[0]


# ---- 9. what was done to the model --------------------------------------------------------------------------


def test_pad_equals_eos_is_said_once(tiny_models, tmp_path, capsys):
    from transformers import AutoTokenizer

    import utils

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["text"])
    tokenizer.pad_token = None
    tokenizer.save_pretrained(str(tmp_path))
    utils._NOTICES.clear()
    for _ in range(2):
        loaded = load_processor(str(tmp_path), "text")
    assert loaded.pad_token_id == loaded.eos_token_id
    assert capsys.readouterr().err.count("has no pad token; padding with EOS") == 1


def test_checkpointing_is_enabled_without_a_deprecation_warning(tiny_models):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _, _ = load_policy(tiny_models["llava"], gradient_checkpointing=True)
    assert model.is_activation_checkpointing
    assert not [w for w in caught if issubclass(w.category, FutureWarning) and "checkpointing" in str(w.message)]


def test_max_pixels_bounds_qwen_images(tiny_models):
    """The tiny Qwen's processor resizes a 112x112 image to its 56*56-pixel limit: a 4x4 grid of 14-px patches;
    with --max_pixels 28*28 to 28x28: 2x2 patches. --min_pixels above --max_pixels is refused."""
    from PIL import Image

    image = Image.new("RGB", (112, 112), (200, 30, 30))
    default = load_processor(tiny_models["qwen2_vl"], "qwen2_vl")
    capped = load_processor(tiny_models["qwen2_vl"], "qwen2_vl", max_pixels=28 * 28)
    grid = lambda processor: encode_example(processor, "qwen2_vl", "What colour?", image)["image_grid_thw"]
    assert grid(default).prod().item() == 16 and grid(capped).prod().item() == 4  # patches (merged 2x2 -> 4 / 1)
    with pytest.raises(ValueError, match="min_pixels"):
        load_processor(tiny_models["qwen2_vl"], "qwen2_vl", max_pixels=28 * 28, min_pixels=56 * 56)


# ---- 10. evaluation length ------------------------------------------------------------------------------------


def test_evaluation_generates_up_to_the_training_length(tiny_models, tmp_path):
    import evaluate

    run = tmp_path / "ppo"
    (run / "actor").mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"max_new_tokens": 7}))
    assert evaluate.training_length(str(run / "actor")) == 7
    assert evaluate.training_length(tiny_models["llava"]) == 512  # no run: the paper's length
    assert evaluate.GenerateArgs().max_new_tokens == 0  # 0 = the training length
    summary = evaluate.summarize_answers([{"ended": True}, {"ended": False}, {"ended": False}, {"ended": True}])
    assert summary["truncated_rate"] == 0.5


def test_a_missing_model_folder_is_named_not_looked_up_on_the_hub(tmp_path):
    result = run_script("train_rm.py", "--model_name_or_path", tmp_path / "no_such_model", "--output_dir",
                        tmp_path / "out", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no such local model folder" in result.stderr and "no_such_model" in result.stderr


@pytest.mark.slow
def test_compiled_generation_samples_what_eager_generation_samples(tiny_models):
    """--compile (static KV cache + torch.compile'd decode step): the same tokens and sampling log-probs as eager
    generation for the same seed (slow: the first call compiles)."""
    model, processor, family = load_policy(tiny_models["text"])
    model.eval()
    batch = collate([encode_example(processor, family, q, None) for q in ("How do I store bleach?", "Hello there")],
                    get_tokenizer(processor).pad_token_id, "left")
    outs = []
    for compile in (False, True, True):
        torch.manual_seed(0)
        outs.append(generate(model, processor, family, batch, 8, temperature=0.9, compile=compile))
    for out in outs[1:]:
        assert torch.equal(out["input_ids"], outs[0]["input_ids"])
        assert torch.allclose(out["sampling_log_probs"], outs[0]["sampling_log_probs"], atol=1e-5)
