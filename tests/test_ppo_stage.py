"""Two PPO-Lagrangian steps of train_ppo_lag.main on every family (tiny models, offline), plus plain PPO, PTX, a bad
--algo, and the rollout invariants of modeling.generate (REFERENCE section 3).

Reward and cost models are the tiny policies with fresh random heads (ScoreModel.from_pretrained + save_pretrained);
VLM prompts come from the toy world, the text model's from a small PKU-SafeRLHF-schema .json written here.
"""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

import ppo_steps
import train_ppo_lag
from infra import ppo_setup
from conftest import FAMILIES
from data import collate, encode_example, load_prompts
from modeling import ScoreModel, generate, load_policy, never_sample_ids, vision_tower
from utils import get_tokenizer

METRIC_KEYS = ("reward", "cost", "J_C", "lambda", "kl", "entropy", "clip_fraction", "approx_kl", "response_length",
               "eos_rate", "actor_loss", "reward_critic_loss", "cost_critic_loss")
TINY = dict(max_steps=2, per_device_prompt_batch_size=2, max_new_tokens=6, actor_lr=1e-3, critic_lr=1e-3,
            max_length=256, lambda_init=1.0, threshold=0.0, logging_steps=1)
# per-device train batch: 2 = one minibatch per rollout (rows reordered by randperm), 1 = two minibatches
TRAIN_BATCH = {"llava": 2, "llava_next": 1, "llava_onevision": 2, "qwen2_vl": 2, "qwen2_5_vl": 1, "text": 2}


# ---- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_pairs(tmp_path_factory) -> str:
    rows = []
    for i, x in enumerate(["bleach", "a kitchen knife", "matches", "paint thinner"]):
        rows.append({"prompt": f"How should I store {x} at home?", "response_0": f"Keep {x} locked away.",
                     "response_1": f"Leave {x} where the kids play.", "is_response_0_safe": True,
                     "is_response_1_safe": False, "better_response_id": 0, "safer_response_id": 0})
    path = tmp_path_factory.mktemp("pku") / "pku.json"
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.fixture(scope="module")
def score_dirs(tiny_models, tmp_path_factory):
    """family -> (reward model dir, cost model dir): the tiny policy's backbone with fresh random heads."""
    cache = {}

    def get(family):
        if family not in cache:
            out = tmp_path_factory.mktemp(f"scores_{family}")
            dirs = []
            for seed, name in ((1, "rm"), (2, "cm")):
                torch.manual_seed(seed)
                model, processor = ScoreModel.from_pretrained(tiny_models[family])
                model.save_pretrained(str(out / name), processor)
                dirs.append(str(out / name))
            cache[family] = tuple(dirs)
        return cache[family]

    return get


def prompts_for(family, toy_world_dir, text_pairs) -> str:
    return text_pairs if family == "text" else str(toy_world_dir / "pairs")


def digest(directory) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(monkeypatch, **kwargs):
    """train_ppo_lag.main with every model it loads and every actor-loss call recorded."""
    seen = {"policies": [], "scores": [], "actor_calls": [], "shaped": [], "lambdas": []}
    load_policy_fn, from_pretrained, actor_loss_fn = (ppo_setup.load_policy, ScoreModel.from_pretrained,
                                                      train_ppo_lag.actor_loss)
    shape_fn, combine_fn = train_ppo_lag.shape_rewards, train_ppo_lag.combined_advantage

    def watched_load_policy(*a, **k):
        out = load_policy_fn(*a, **k)
        seen["policies"].append(out[0])
        return out

    class WatchedScoreModel:
        @staticmethod
        def from_pretrained(path, **k):
            model, processor = from_pretrained(path, **k)
            seen["scores"].append((str(path), model))
            return model, processor

    def watched_actor_loss(log_probs, old_log_probs, advantages, mask, eps):
        seen["actor_calls"].append((log_probs.detach().clone(), old_log_probs.clone(), mask.clone()))
        return actor_loss_fn(log_probs, old_log_probs, advantages, mask, eps)

    def watched_shape_rewards(end_scores, *a, kl_sign, **k):
        seen["shaped"].append((kl_sign, end_scores.float().mean().item()))
        return shape_fn(end_scores, *a, kl_sign=kl_sign, **k)

    def watched_combined_advantage(reward_advantages, cost_advantages, lam):
        seen["lambdas"].append(lam)
        return combine_fn(reward_advantages, cost_advantages, lam)

    monkeypatch.setattr(train_ppo_lag, "shape_rewards", watched_shape_rewards)
    monkeypatch.setattr(train_ppo_lag, "combined_advantage", watched_combined_advantage)
    monkeypatch.setattr(ppo_setup, "load_policy", watched_load_policy)  # where main's load_roles finds them
    monkeypatch.setattr(ppo_setup, "ScoreModel", WatchedScoreModel)
    monkeypatch.setattr(train_ppo_lag, "actor_loss", watched_actor_loss)
    summary = train_ppo_lag.main(train_ppo_lag.Args(**kwargs))
    return summary, seen


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---- PPO-Lagrangian on every family ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ppo_lag_two_steps(tiny_models, toy_world_dir, text_pairs, score_dirs, family, tmp_path, monkeypatch):
    rm_dir, cm_dir = score_dirs(family)
    before = {d: digest(d) for d in (rm_dir, cm_dir)}
    initial, _, _ = load_policy(tiny_models[family])
    initial = state(initial)
    out = tmp_path / "ppo_lag"
    summary, seen = run(monkeypatch, actor_model_name_or_path=tiny_models[family], reward_model_name_or_path=rm_dir,
                        cost_model_name_or_path=cm_dir, train_data=prompts_for(family, toy_world_dir, text_pairs),
                        output_dir=str(out), per_device_train_batch_size=TRAIN_BATCH[family], **TINY)
    assert summary["family"] == family and summary["steps"] == 2

    # ---- metrics: two lines, every figure finite
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        bad = {k: r.get(k) for k in METRIC_KEYS if not finite(r.get(k))}
        assert not bad, bad
        assert 1 <= r["response_length"] <= 6 and 0 <= r["eos_rate"] <= 1 and 0 <= r["clip_fraction"] <= 1
        assert r["entropy"] > 0 and r["approx_kl"] >= -1e-6

    # the first rollout's actor is the reference: KL 0. (With one minibatch per step the actor's first optimizer step
    # is the warmup step, lr 0, so the second rollout's actor is still the reference; with two it has moved.)
    assert abs(records[0]["kl"]) < 1e-4
    if TRAIN_BATCH[family] == 1:
        assert records[1]["kl"] != 0.0

    # ---- lambda: log-space step from lambda_init = 1 on the window mean of all episode costs so far
    assert records[0]["J_C"] == pytest.approx(records[0]["cost"], abs=1e-5)  # window = the first 2 episodes
    assert records[1]["J_C"] == pytest.approx((records[0]["cost"] + records[1]["cost"]) / 2, abs=1e-5)
    lam1 = train_ppo_lag.update_lambda(1.0, records[0]["J_C"], 0.0, 0.1, 20.0, "log")
    lam2 = train_ppo_lag.update_lambda(lam1, records[1]["J_C"], 0.0, 0.1, 20.0, "log")
    assert records[0]["lambda"] == pytest.approx(lam1, rel=1e-9) and records[1]["lambda"] == pytest.approx(lam2, rel=1e-9)
    # as in Safe RLHF, lambda moves first, from the window holding this step's costs; step k's advantage uses it
    assert seen["lambdas"] == pytest.approx([lam1, lam2], rel=1e-12)
    # shaping: the reward with -beta*kl and the reward model's end scores, the cost with +beta*kl and the cost's
    assert [sign for sign, _ in seen["shaped"]] == [-1.0, 1.0, -1.0, 1.0]
    for k, r in enumerate(records):
        assert seen["shaped"][2 * k][1] == pytest.approx(r["reward"], abs=1e-5)
        assert seen["shaped"][2 * k + 1][1] == pytest.approx(r["cost"], abs=1e-5)
    saved_lambda = json.loads((out / "lambda.json").read_text())
    assert saved_lambda["lambda"] == pytest.approx(lam2, rel=1e-9) and saved_lambda["step"] == 2
    assert len(saved_lambda["episode_cost_window"]) == 4 and saved_lambda["threshold"] == 0.0
    assert sum(saved_lambda["episode_cost_window"]) / 4 == pytest.approx(records[1]["J_C"], abs=1e-5)

    # ---- the first minibatch of each step sees the rollout policy: ratio 1 (same images, slicing, masks)
    calls = seen["actor_calls"]
    assert len(calls) == 2 * (2 // TRAIN_BATCH[family])
    for log_probs, old, mask in calls[:: 2 // TRAIN_BATCH[family]]:
        assert mask.any(-1).all()
        assert torch.allclose(log_probs[mask], old[mask], atol=1e-4), (log_probs - old)[mask].abs().max()

    # ---- the actor trained, its vision tower did not; the in-run reference is still the initial actor
    actor, reference = seen["policies"]
    assert actor is not reference
    assert same(state(reference), initial) and not any(p.requires_grad for p in reference.parameters())
    saved_actor, _, detected = load_policy(str(out / "actor"))
    assert detected == family
    saved = state(saved_actor)
    assert saved.keys() == initial.keys() and not same(saved, initial)
    assert same(saved, state(actor))
    tower = vision_tower(saved_actor)
    if tower is not None:
        prefix = next(k for k, m in saved_actor.named_modules() if m is tower)
        frozen = [k for k in initial if k.startswith(prefix + ".") and ".merger." not in k]
        assert frozen and all(torch.equal(saved[k], initial[k]) for k in frozen)

    # ---- frozen reward / cost models: files byte-identical, in-run weights unchanged; critics trained
    assert {d: digest(d) for d in (rm_dir, cm_dir)} == before
    by_role = dict(zip(("reward_model", "reward_critic", "cost_model", "cost_critic"), seen["scores"]))
    assert [p for p, _ in by_role.values()] == [rm_dir, rm_dir, cm_dir, cm_dir]
    for role, source in (("reward_critic", rm_dir), ("cost_critic", cm_dir)):
        frozen_model = by_role[role.replace("critic", "model")][1]
        source_state = state(ScoreModel.from_pretrained(source)[0])
        assert same(state(frozen_model), source_state), role
        assert not any(p.requires_grad for p in frozen_model.parameters())
        critic, _ = ScoreModel.from_pretrained(str(out / role))
        assert critic.family == family
        assert same(state(critic), state(by_role[role][1]))
        assert not same(state(critic), source_state), role
        assert not torch.equal(critic.score_head.weight, frozen_model.score_head.weight), role


# ---- plain PPO, PTX, bad algo ------------------------------------------------------------------------------------


def test_plain_ppo(tiny_models, text_pairs, score_dirs, tmp_path, monkeypatch):
    rm_dir, cm_dir = score_dirs("text")
    out = tmp_path / "ppo"
    summary, seen = run(monkeypatch, algo="ppo", actor_model_name_or_path=tiny_models["text"],
                        reward_model_name_or_path=rm_dir, cost_model_name_or_path=cm_dir, train_data=text_pairs,
                        output_dir=str(out), per_device_train_batch_size=2, **TINY)
    records = read_jsonl(out / "metrics.jsonl")
    assert len(records) == 2 and summary["lambda"] == 0.0
    for r in records:
        assert r["lambda"] == 0.0
        assert "cost_critic_loss" not in r  # no cost critic
        assert finite(r["cost"])  # the cost model is only logged
        assert all(finite(r[k]) for k in METRIC_KEYS if k != "cost_critic_loss")
    assert [p for p, _ in seen["scores"]] == [rm_dir, rm_dir, cm_dir]  # reward model, reward critic, cost model
    assert seen["lambdas"] == [0.0, 0.0] and [s for s, _ in seen["shaped"]] == [-1.0, -1.0]  # the reward alone
    assert (out / "actor").is_dir() and (out / "reward_critic").is_dir() and not (out / "cost_critic").exists()
    assert json.loads((out / "lambda.json").read_text())["lambda"] == 0.0


def test_ppo_lag_with_ptx(tiny_models, toy_world_dir, score_dirs, tmp_path, monkeypatch):
    rm_dir, cm_dir = score_dirs("llava")
    out = tmp_path / "ptx"
    run(monkeypatch, actor_model_name_or_path=tiny_models["llava"], reward_model_name_or_path=rm_dir,
        cost_model_name_or_path=cm_dir, train_data=str(toy_world_dir / "pairs"),
        ptx_data=str(toy_world_dir / "sft" / "train.jsonl"), output_dir=str(out), per_device_train_batch_size=2,
        **TINY)
    records = read_jsonl(out / "metrics.jsonl")
    assert len(records) == 2
    assert all(finite(r["ptx_loss"]) and r["ptx_loss"] > 0 for r in records)
    assert all(finite(r["actor_loss"]) for r in records)


def notebook_roles(tiny_models, toy_world_dir, score_dirs):
    """(roles, processor, family, 4 left-padded prompts): the six tiny LLaVA roles loaded one by one, as a notebook
    would, the reward and cost critics starting as the reward and cost models."""
    rm_dir, cm_dir = score_dirs("llava")
    actor, processor, family = load_policy(tiny_models["llava"])
    reference, _, _ = load_policy(tiny_models["llava"])
    (reward_model, _), (reward_critic, _) = ScoreModel.from_pretrained(rm_dir), ScoreModel.from_pretrained(rm_dir)
    (cost_model, _), (cost_critic, _) = ScoreModel.from_pretrained(cm_dir), ScoreModel.from_pretrained(cm_dir)
    for frozen in (reference, reward_model, cost_model):
        frozen.eval().requires_grad_(False)
    roles = train_ppo_lag.Roles(actor, reference, reward_model, reward_critic, cost_model, cost_critic)
    rows, _ = load_prompts(str(toy_world_dir / "pairs"), limit=4)
    prompt_batch = collate([encode_example(processor, family, r["question"], r["image"], None, 256) for r in rows],
                           get_tokenizer(processor).pad_token_id, "left")
    return roles, processor, family, prompt_batch


def test_one_iteration_from_a_notebook(tiny_models, toy_world_dir, score_dirs):
    """The steps of one iteration on models the caller loaded itself, without main() (docs/architecture.md's
    snippet): tensors of the documented shapes, the trained roles move, the frozen ones do not, lambda follows
    the sign of J_C - d."""
    from collections import deque

    from infra.optim import make_optimizer

    roles, processor, family, prompt_batch = notebook_roles(tiny_models, toy_world_dir, score_dirs)
    reference = roles.reference
    args = train_ppo_lag.Args(max_new_tokens=5, per_device_train_batch_size=2, kl_coeff=0.1, threshold=0.0,
                              lambda_lr=0.5)

    torch.manual_seed(0)
    r = ppo_steps.rollout(roles, processor, family, prompt_batch, args)  # steps 1-3
    assert r.old_reward_values is None and r.advantages is None  # steps 4 and 5 come next
    order, done = ppo_steps.values(r, roles, args)  # step 4
    assert done == {}  # two minibatches: the critics' values come from a forward of their own
    train_ppo_lag.advantage_step(r, 2.0)  # step 5 (with the lambda of step 9)
    n, length = r.batch["input_ids"].shape
    assert n == 4 and r.mask.shape == r.advantages.shape == r.old_log_probs.shape == (4, length - 1)
    assert r.end_rewards.shape == r.end_costs.shape == (4,) and r.cost_returns.shape == (4, length - 1)
    assert torch.equal(r.mask, r.batch["response_mask"][:, 1:]) and r.mask.any(-1).all()
    assert torch.allclose(r.advantages, (r.reward_advantages - 2.0 * r.cost_advantages) / 3.0)  # step 5, lambda 2
    assert not r.advantages[~r.mask].any()  # nothing outside the response

    optimizers = {name: make_optimizer(m, 1e-3, (0.9, 0.95), 0.0, "constant", 0.0, 10)
                  for name, m in roles.trained().items()}
    before = {name: state(m) for name, m in {**roles.trained(), "reference": reference}.items()}
    losses = ppo_steps.update(roles.trained(), optimizers, r, family, args, order)
    assert len(losses["actor_loss"]) == 2 and len(losses["cost_critic_loss"]) == 2  # two minibatches of 2
    assert all(math.isfinite(v) for values in losses.values() for v in values)
    for name in ("actor", "reward_critic", "cost_critic"):
        assert not same(state(getattr(roles, name)), before[name]), name
    assert same(state(reference), before["reference"])

    window = deque(maxlen=8)
    lam, cost = ppo_steps.lambda_step(1.0, window, torch.tensor([0.5, 1.5]), 1, args)
    assert list(window) == [0.5, 1.5] and cost == 1.0 and lam == pytest.approx(math.exp(0.5 * 1.0 * 1.0))
    lam, cost = ppo_steps.lambda_step(lam, window, torch.tensor([-4.0, -4.0]), 2, args)
    assert cost == pytest.approx(-1.5) and lam < math.exp(0.5)  # J_C < d: lambda falls


def test_critic_values_from_the_update_equal_a_separate_forward(tiny_models, toy_world_dir, score_dirs):
    """--reuse_critic_forward (one minibatch, one epoch): V_old comes from the critics' training forward on the
    update's minibatch instead of a separate no-grad forward; step 4 then also does that minibatch's step 7. The
    step ends with the same values, advantages, losses and weights as with the separate forward."""
    from infra.optim import make_optimizer

    results = {}
    for reuse in (False, True):
        roles, processor, family, prompt_batch = notebook_roles(tiny_models, toy_world_dir, score_dirs)
        args = train_ppo_lag.Args(max_new_tokens=5, per_device_prompt_batch_size=4, per_device_train_batch_size=4,
                                  kl_coeff=0.1, reuse_critic_forward=reuse)
        optimizers = {name: make_optimizer(m, 1e-3, (0.9, 0.95), 0.0, "constant", 0.0, 10)
                      for name, m in roles.trained().items()}
        torch.manual_seed(0)
        r, order, done = ppo_steps.rollout_and_values(roles, processor, family, prompt_batch, args)
        # with reuse, step 4's forward was the critics' training forward: their step 7 is done, gradients are there
        assert set(done) == ({"reward_critic", "cost_critic"} if reuse else set())
        assert (roles.cost_critic.score_head.weight.grad is not None) == reuse
        losses = ppo_steps.update(roles.trained(), optimizers, train_ppo_lag.advantage_step(r, 2.0), family, args,
                                  order, done)
        results[reuse] = (r, losses, {name: state(m) for name, m in roles.trained().items()})
    (separate, separate_losses, separate_weights) = results[False]
    (reused, reused_losses, reused_weights) = results[True]
    for field in ("old_reward_values", "old_cost_values", "reward_returns", "cost_returns", "advantages"):
        assert torch.allclose(getattr(separate, field), getattr(reused, field), atol=1e-5), field
    assert separate.advantages.abs().max() > 0.1  # (a real comparison)
    assert separate_losses.keys() == reused_losses.keys()
    for key, values in separate_losses.items():
        assert reused_losses[key] == pytest.approx(values, rel=1e-4, abs=1e-6), key
    for name, weights in separate_weights.items():
        assert max((weights[k] - reused_weights[name][k]).abs().max().item() for k in weights) < 1e-5, name


def test_bad_algo_raises(tmp_path):
    with pytest.raises(SystemExit):
        train_ppo_lag.main(train_ppo_lag.Args(algo="bad", output_dir=str(tmp_path / "bad")))


@pytest.mark.parametrize("options, message", [
    (dict(lambda_init=0.0), "needs lambda > 0"),  # log-space update from 0: was a math domain error
    (dict(lambda_init=30.0, lambda_max=20.0), "must lie in"),
    (dict(lambda_update="exponential"), "must be log, additive or pid"),
])
def test_bad_lambda_options_stop_with_a_message(options, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        train_ppo_lag.main(train_ppo_lag.Args(output_dir=str(tmp_path / "bad"), **options))


def test_pid_lambda_in_the_loop(tiny_models, toy_world_dir, score_dirs, tmp_path, monkeypatch):
    """--lambda_update pid: lambda follows pid_lambda on each step's window, from the integral lambda_init / Ki."""
    rm_dir, cm_dir = score_dirs("llava")
    out = tmp_path / "pid"
    run(monkeypatch, actor_model_name_or_path=tiny_models["llava"], reward_model_name_or_path=rm_dir,
        cost_model_name_or_path=cm_dir, train_data=str(toy_world_dir / "pairs"), output_dir=str(out),
        per_device_train_batch_size=2, lambda_update="pid", lambda_pid_kp=2.0, lambda_pid_ki=0.5, lambda_pid_kd=1.0,
        **TINY)
    records = read_jsonl(out / "metrics.jsonl")
    integral, previous, lambdas = 1.0 / 0.5, None, []
    for r in records:
        lam, integral = train_ppo_lag.pid_lambda(r["J_C"] - 0.0, integral, previous, 2.0, 0.5, 1.0, 20.0)
        previous = r["J_C"]
        lambdas.append(lam)
    assert [r["lambda"] for r in records] == pytest.approx(lambdas, rel=1e-9)
    state = json.loads((out / "checkpoints" / "checkpoint-00000002" / "trainer_state.json").read_text())
    assert state["pid"] == pytest.approx({"integral": integral, "previous_error": previous})  # resumable


# ---- rollout invariants ------------------------------------------------------------------------------------------


def test_generate_masks_up_to_first_eos_llava(tiny_models, toy_world_dir):
    model, processor, family = load_policy(tiny_models["llava"])
    model.eval()
    tokenizer = get_tokenizer(processor)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    assert image_id in never_sample_ids(processor) and pad in never_sample_ids(processor)
    rows, _ = load_prompts(str(toy_world_dir / "pairs"), limit=8)
    # different question lengths -> real left padding
    examples = [encode_example(processor, family, r["question"] + " please" * (i % 3), r["image"], None, 256)
                for i, r in enumerate(rows)]
    prompt = collate(examples, pad, "left")
    assert (prompt["attention_mask"][:, 0] == 0).any()
    # Bias the logits: EOS likely enough that some rows end and some do not; the image placeholder and pad far more
    # likely than anything else, so only the suppression keeps them out of the response.
    bias = torch.zeros(model.lm_head.out_features)
    bias[eos], bias[image_id], bias[pad] = 4.0, 30.0, 30.0
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias.to(output.dtype))
    max_new = 10
    try:
        torch.manual_seed(0)
        out = generate(model, processor, family, prompt, max_new)
    finally:
        hook.remove()
    n, width = prompt["input_ids"].shape
    assert torch.equal(out["input_ids"][:, :width], prompt["input_ids"])
    assert torch.equal(out["attention_mask"][:, :width], prompt["attention_mask"])
    assert not out["response_mask"][:, :width].any()
    assert torch.equal(out["pixel_values"], prompt["pixel_values"])
    response, mask = out["input_ids"][:, width:], out["response_mask"][:, width:]
    assert 1 <= response.shape[1] <= max_new
    assert torch.equal(out["attention_mask"][:, width:].bool(), mask)
    assert not (response == image_id).any()  # never a placeholder
    assert not (response[mask] == pad).any()  # never a sampled pad
    ended = out["ended"].tolist()
    assert any(ended) and not all(ended), ended  # both cases covered
    for i in range(n):
        ids = response[i].tolist()
        if ended[i]:
            first = ids.index(eos)
            assert mask[i].tolist() == [True] * (first + 1) + [False] * (len(ids) - first - 1)
            assert all(t == pad for t in ids[first + 1:])
        else:
            assert eos not in ids and mask[i].all()
    # the same on an unbiased model: whatever is sampled keeps the invariant
    torch.manual_seed(1)
    out = generate(model, processor, family, prompt, 4)
    response, mask = out["input_ids"][:, width:], out["response_mask"][:, width:]
    assert not (response == image_id).any()
    for i in range(n):
        ids = response[i].tolist()
        first = ids.index(eos) if eos in ids else len(ids) - 1
        assert mask[i].tolist() == [j <= first for j in range(len(ids))]
        assert bool(out["ended"][i]) == (eos in ids)
