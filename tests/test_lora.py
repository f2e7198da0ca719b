"""LoRA (peft) for every trained role, and PPO's roles on shared frozen bases (issue: scale).

Adapters are standard peft folders (adapter_config.json naming the base + adapter_model.safetensors; a score model adds
its head), loaded back by every script; --merge_lora writes full weights. In PPO the reference is the actor's base
with its adapter disabled, and the score roles live on the base of the score model they start from; when the reward
and cost models are LoRA adapters on the actor's base, one base holds all six roles. Every role must compute what
the same weights loaded as separate models compute (fp32, 1e-5).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ppo_steps
import train_ppo_lag
from infra import ppo_setup
from data import collate, encode_example, load_prompts
from lora import unwrap_adapters
from modeling import ScoreModel, generate, load_policy, vision_tower
from utils import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def run_script(script, *argv):
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def randomise_adapters(model, seed):
    """LoRA B starts at 0 (an adapter starts as its base); give it values so that the adapter matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)


@pytest.fixture(scope="module")
def lora_score_dirs(tiny_models, tmp_path_factory):
    """A LoRA reward model and a LoRA cost model on the tiny LLaVA policy (the actor's base), adapters randomised."""
    out = tmp_path_factory.mktemp("lora_scores")
    dirs = {}
    for seed, name in ((1, "rm"), (2, "cm")):
        torch.manual_seed(seed)
        model, processor = ScoreModel.from_pretrained(tiny_models["llava"], lora=LORA)
        randomise_adapters(model.adapter_model, seed)
        model.save_pretrained(str(out / name), processor)
        dirs[name] = str(out / name)
    return dirs


@pytest.fixture(scope="module")
def full_score_dirs(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("full_scores")
    dirs = {}
    for seed, name in ((3, "rm"), (4, "cm")):
        torch.manual_seed(seed)
        model, processor = ScoreModel.from_pretrained(tiny_models["llava"])
        model.save_pretrained(str(out / name), processor)
        dirs[name] = str(out / name)
    return dirs


def rollout_batch(processor, family, toy_world_dir, model, n=3):
    rows, _ = load_prompts(str(toy_world_dir / "pairs"), limit=n)
    prompts = collate([encode_example(processor, family, r["question"], r["image"], None, 256) for r in rows],
                      get_tokenizer(processor).pad_token_id, "left")
    torch.manual_seed(0)
    return generate(model, processor, family, prompts, 6)


# ---- 1. LoRA in every stage ---------------------------------------------------------------------------------


def test_lora_policy_trains_only_adapters_and_projector(tiny_models):
    model, _, family = load_policy(tiny_models["llava"], lora=LORA)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "multi_modal_projector.modules_to_save" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    # r * (in + out) per adapted projection: the tiny model has 2 layers of q, k, v, o, gate, up, down
    config = unwrap_adapters(model).config.text_config
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads)
    per_layer = 4 * ((h + h) + (h + kv) + (h + kv) + (h + h)) + 4 * ((h + i) + (h + i) + (i + h))
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora_params == config.num_hidden_layers * per_layer


def test_lora_sft_and_rm_write_adapters_that_every_loader_reads(tiny_models, toy_world_dir, tmp_path):
    """SFT and RM with --lora_r: the output folders are peft adapters (+ score head); loading them gives the trained
    model, equal to the --merge_lora full weights; the base's weights did not move."""
    sft = tmp_path / "sft"
    run_script("train_sft.py", "--model_name_or_path", tiny_models["llava"], "--train_data",
               toy_world_dir / "sft" / "train.jsonl", "--output_dir", sft, "--max_steps", 2, "--lr", 1e-2,
               "--per_device_batch_size", 4, "--max_length", 256, "--lora_r", 4, "--merge_lora")
    assert (sft / "adapter_config.json").is_file() and (sft / "adapter_model.safetensors").is_file()
    assert not (sft / "model.safetensors").exists()
    assert json.loads((sft / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_models["llava"]
    adapted, processor, family = load_policy(str(sft))
    merged, _, _ = load_policy(str(sft / "merged"))
    base, _, _ = load_policy(tiny_models["llava"])
    batch = rollout_batch(processor, family, toy_world_dir, base)
    logits = {name: train_ppo_lag.policy_log_probs(m, batch, family)
              for name, m in (("adapted", adapted), ("merged", merged), ("base", base))}
    mask = batch["response_mask"][:, 1:]
    assert (logits["adapted"] - logits["merged"]).masked_select(mask).abs().max() <= 1e-5
    assert (logits["adapted"] - logits["base"]).masked_select(mask).abs().max() > 1e-4  # it learned something

    rm = tmp_path / "rm"
    run_script("train_rm.py", "--model_name_or_path", sft, "--train_data", toy_world_dir / "pairs", "--output_dir",
               rm, "--max_steps", 2, "--lr", 1e-2, "--per_device_batch_size", 4, "--max_length", 256,
               "--gradient_checkpointing", "false", "--lora_r", 4, "--merge_lora")
    assert (rm / "adapter_config.json").is_file() and (rm / "score_head.safetensors").is_file()
    assert json.loads((rm / "score_config.json").read_text())["lora"] is True
    scores = {}
    for name, path in (("adapter", rm), ("merged", rm / "merged")):
        model, _ = ScoreModel.from_pretrained(str(path))
        with torch.no_grad():
            scores[name] = model(batch)[1]
    assert torch.allclose(scores["adapter"], scores["merged"], atol=1e-5)


def test_quantized_base_with_lora_trains(tiny_models, toy_world_dir, tmp_path):
    """QLoRA: --quantization 8bit with --lora_r trains the adapters on an 8-bit base (refused without LoRA); the
    vision tower and projector stay unquantized. --merge_lora exports full weights in the compute dtype, merged
    from the saved adapter on a full-precision base (an in-place merge would re-quantize them: issue 24)."""
    model, _, _ = load_policy(tiny_models["llava"], quantization="8bit", lora=LORA)
    layers = {type(m).__name__ for n, m in unwrap_adapters(model).named_modules() if n.endswith("q_proj.base_layer")}
    assert layers == {"Linear8bitLt"}
    assert all(type(m).__name__ == "Linear" for m in vision_tower(unwrap_adapters(model)).modules()
               if isinstance(m, torch.nn.Linear))
    out = tmp_path / "sft"
    run_script("train_sft.py", "--model_name_or_path", tiny_models["llava"], "--train_data",
               toy_world_dir / "sft" / "train.jsonl", "--output_dir", out, "--max_steps", 2, "--per_device_batch_size",
               4, "--max_length", 256, "--lora_r", 4, "--quantization", "8bit", "--merge_lora", "true")
    assert json.loads((out / "summary.json").read_text())["optimizer_steps"] == 2
    from modeling import saved_quantization

    merged, _, _ = load_policy(str(out / "merged"))
    assert saved_quantization(str(out / "merged")) is None
    assert not any(type(m).__name__ == "Linear8bitLt" for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # the compute dtype of a CPU run
    adapter_on_full_base, _, _ = load_policy(str(out))  # the adapter folder: its base in full precision, merged
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, adapter_on_full_base(input_ids=ids).logits)


# ---- 2. shared bases in PPO ------------------------------------------------------------------------------------


def ppo_args(tiny_models, rm, cm, **extra):
    return train_ppo_lag.Args(**{"actor_model_name_or_path": tiny_models["llava"], "reward_model_name_or_path": rm,
                                 "cost_model_name_or_path": cm, "lora_r": 4, "lora_alpha": 8.0, "max_new_tokens": 6,
                                 "dtype": "float32", **extra})


def test_one_base_holds_all_six_roles_and_each_equals_its_separate_model(tiny_models, toy_world_dir,
                                                                          lora_score_dirs, capsys):
    rm, cm = lora_score_dirs["rm"], lora_score_dirs["cm"]
    roles, processor, family = ppo_setup.load_lora_roles(ppo_args(tiny_models, rm, cm), "cpu", None)
    assert "actor, reference, reward model, reward critic, cost model, cost critic" in capsys.readouterr().out
    base = roles.actor.base
    assert roles.reference.base is base and all(
        m.backbone.base is base for m in (roles.reward_model, roles.reward_critic, roles.cost_model, roles.cost_critic))
    # each role's trainable parameters are its own adapter's (and a critic's head), nothing of the base
    assert {n.split(".")[-2] for n, p in base.model.named_parameters() if p.requires_grad} <= {
        "actor", "reward_critic", "cost_critic", "linear_1", "linear_2"}
    assert all(p.requires_grad for p in roles.actor.parameters()) and roles.actor.parameters()
    assert not any(p.requires_grad for p in roles.reward_model.parameters())

    separate_policy, _, _ = load_policy(tiny_models["llava"])
    batch = rollout_batch(processor, family, toy_world_dir, separate_policy)
    mask = batch["response_mask"][:, 1:]
    with torch.no_grad():
        reference = train_ppo_lag.policy_log_probs(roles.reference, batch, family)
        actor = train_ppo_lag.policy_log_probs(roles.actor, batch, family)
        separate = train_ppo_lag.policy_log_probs(separate_policy, batch, family)
        # a fresh adapter (B = 0) adds an exact zero to the same base computation on the same batch: bit identity
        assert torch.equal(actor, reference)  # is the claim, and the step-0 KL is exactly 0
        assert (reference - separate).masked_select(mask).abs().max() <= 1e-5
        for kind, path in (("reward", rm), ("cost", cm)):
            alone, _ = ScoreModel.from_pretrained(path)
            expected_scores, expected_end = alone(batch)
            frozen, critic = getattr(roles, f"{kind}_model"), getattr(roles, f"{kind}_critic")
            assert torch.allclose(frozen(batch)[1], expected_end, atol=1e-5), kind
            assert torch.allclose(critic(batch)[0], expected_scores, atol=1e-5), kind  # the critic starts as it
            assert (expected_end - ScoreModel.from_pretrained(tiny_models["llava"])[0](batch)[1]).abs().max() > 1e-3


def test_lora_ppo_step_in_bf16_keeps_fp32_adapters_on_a_bf16_base(tiny_models, toy_world_dir, lora_score_dirs):
    """The user's path on a GPU: one bf16 base, fp32 adapters and heads, forward/backward under bf16 autocast. One
    PPO-Lag step (rollout, lambda, update) on CPU in bf16: the step-0 KL is exactly 0 (a fresh adapter adds an exact
    0 to the bf16 base), every figure is finite, the adapters and critic heads move and stay fp32, the base does
    not move and stays bf16."""
    from infra.optim import make_optimizer

    args = ppo_args(tiny_models, lora_score_dirs["rm"], lora_score_dirs["cm"], dtype="bfloat16",
                    per_device_prompt_batch_size=3, per_device_train_batch_size=3)
    roles, processor, family = ppo_setup.load_lora_roles(args, "cpu", None)
    base = roles.actor.base.model
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in base.named_parameters() if p.requires_grad}
    heads = {k: m.score_head.weight.detach().clone() for k, m in roles.trained().items() if k != "actor"}
    adapter_part = lambda name: ".lora_" in name or ".modules_to_save." in name  # (the frozen RM/CM adapters)
    assert {p.dtype for n, p in frozen.items() if not adapter_part(n)} == {torch.bfloat16}
    assert {p.dtype for p in trained.values()} == {torch.float32}
    rows, _ = load_prompts(str(toy_world_dir / "pairs"), limit=3)
    prompts = collate([encode_example(processor, family, r["question"], r["image"], None, 256) for r in rows],
                      get_tokenizer(processor).pad_token_id, "left")
    optimizers = {name: make_optimizer(m, 1e-3, (0.9, 0.95), 0.0, "constant", 0.0, 10)
                  for name, m in roles.trained().items()}
    torch.manual_seed(0)
    r, order, done = ppo_steps.rollout_and_values(roles, processor, family, prompts, args)
    # bf16: both come from the same scoring forward on the same micro-batches (not the sampling pass), the fresh
    # adapter adding an exact zero: bit identity is the claim, the KL exactly 0
    assert torch.equal(r.old_log_probs, r.ref_log_probs)
    losses = ppo_steps.update(roles.trained(), optimizers, train_ppo_lag.advantage_step(r, 1.0), family, args,
                              order, done)
    assert all(math.isfinite(v) for values in losses.values() for v in values) and losses["cost_critic_loss"]
    after = dict(base.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())  # the bf16 base did not move
    moved = [n for n, p in trained.items() if not torch.equal(after[n].detach(), p)]
    assert {"actor", "reward_critic", "cost_critic"} <= {n.split(".")[-2] for n in moved}
    assert all(after[n].dtype == torch.float32 for n in trained)
    for name, head in heads.items():
        weight = getattr(roles, name).score_head.weight
        assert weight.dtype == torch.float32 and not torch.equal(weight.detach(), head), name


def test_full_score_models_give_three_bases(tiny_models, toy_world_dir, full_score_dirs, capsys):
    """Full reward and cost models: each is a base of its own, the critic a fresh adapter (+ its head copy) on it."""
    rm, cm = full_score_dirs["rm"], full_score_dirs["cm"]
    roles, processor, family = ppo_setup.load_lora_roles(ppo_args(tiny_models, rm, cm), "cpu", None)
    out = capsys.readouterr().out
    assert out.count("LoRA roles on base") == 3 and "reward model, reward critic" in out
    assert roles.reward_model.backbone.base is roles.reward_critic.backbone.base is not roles.actor.base
    batch = rollout_batch(processor, family, toy_world_dir, roles.reference)
    with torch.no_grad():
        alone, _ = ScoreModel.from_pretrained(rm)
        scores, end = alone(batch)
        assert torch.allclose(roles.reward_model(batch)[1], end, atol=1e-5)
        assert torch.allclose(roles.reward_critic(batch)[0], scores, atol=1e-5)


def test_lora_ppo_trains_adapters_saves_them_and_resumes_exactly(tiny_models, toy_world_dir, lora_score_dirs,
                                                                  tmp_path):
    """Two PPO-Lag steps with LoRA roles on one base: adapters and critic heads move, the base does not; the
    outputs are peft folders that load back (the actor through load_policy, the critics as score models); a run
    resumed from checkpoint 1 ends with the same adapters as the uninterrupted run."""
    common = ["--actor_model_name_or_path", tiny_models["llava"], "--reward_model_name_or_path", lora_score_dirs["rm"],
              "--cost_model_name_or_path", lora_score_dirs["cm"], "--train_data", toy_world_dir / "pairs",
              "--max_steps", 2, "--per_device_prompt_batch_size", 2, "--per_device_train_batch_size", 1,
              "--max_new_tokens", 6, "--max_length", 256, "--actor_lr", 1e-3, "--critic_lr", 1e-3, "--lambda_init", 1,
              "--threshold", 0, "--lora_r", 4, "--lora_alpha", 8, "--save_steps", 1, "--keep_checkpoints", 3]
    full = tmp_path / "full"
    run_script("train_ppo_lag.py", *common, "--output_dir", full)
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["optimizer_steps"] == 2
    for name in ("actor", "reward_critic", "cost_critic"):
        assert (full / name / "adapter_model.safetensors").is_file(), name
    actor, _, _ = load_policy(str(full / "actor"))  # merged for use
    critic, _ = ScoreModel.from_pretrained(str(full / "reward_critic"))
    assert critic.adapter_model is None  # merged
    from safetensors.torch import load_file

    start = load_file(str(Path(lora_score_dirs["rm"]) / "score_head.safetensors"))["weight"]
    assert not torch.equal(critic.score_head.weight.detach(), start)  # the critic's head trained

    resumed = tmp_path / "resumed"
    run_script("train_ppo_lag.py", *common, "--output_dir", resumed, "--resume_from",
               full / "checkpoints" / "checkpoint-00000001")
    for name in ("actor", "reward_critic", "cost_critic"):
        a = load_file(str(full / name / "adapter_model.safetensors"))
        b = load_file(str(resumed / name / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_trainable_adapter_loads_back_its_fp32_values_on_a_bf16_base(tiny_models, tmp_path):
    """Resuming a LoRA run in bf16 (--dtype auto on a GPU): the adapter and its projector copy are fp32 master
    weights, saved in fp32. Loaded back trainable on a bf16 base, through load_policy (SFT/RM/CM resume, LoRA critics)
    and SharedBase.add (PPO's roles), they hold exactly the saved values, not bf16-rounded ones (peft first loads
    them into parameters in the base's dtype)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from lora import SharedBase
    from infra.checkpoint import save_model

    model, _, family = load_policy(tiny_models["llava"], lora=LORA)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # LoRA A and B, the projector copy: values that bf16 cannot hold
                param.add_(1e-4 * torch.randn_like(param))
    save_model(model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any("multi_modal_projector" in k for k in saved) and any("lora_B" in k for k in saved)
    assert all(v.dtype == torch.float32 and not torch.equal(v, v.bfloat16().float()) for v in saved.values())

    resumed, _, _ = load_policy(str(tmp_path / "adapter"), dtype="bfloat16", trainable_adapter=True)
    shared = SharedBase(load_policy(tiny_models["llava"], dtype="bfloat16")[0], tiny_models["llava"], family, "test")
    shared.add("actor", str(tmp_path / "adapter"), None, trainable=True)
    wrong = {}
    for loaded, name in ((resumed, "default"), (shared.model, "actor")):
        trainable = [p for p in loaded.parameters() if p.requires_grad]
        assert len(trainable) == len(saved) and all(p.dtype == torch.float32 for p in trainable), name
        state = get_peft_model_state_dict(loaded, adapter_name=name)
        assert state.keys() == saved.keys(), name
        wrong[name] = [k for k in saved if not torch.equal(state[k], saved[k])]
    assert wrong == {"default": [], "actor": []}


@pytest.mark.parametrize("gpu_gb,verdict", [pytest.param(24, "DOES NOT FIT", marks=pytest.mark.slow), (80, "FITS")])
def test_dry_run_prints_the_7b_plan_offline_without_weights(gpu_gb, verdict):
    """--dry_run on the shipped LLaVA-1.5-7B config (no weights exist here): three bf16 bases + LoRA need ~44 GiB."""
    config = str(ROOT / "infra" / "configs" / "llava-1.5-7b-hf")
    result = run_script("train_ppo_lag.py", "--dry_run", "--actor_model_name_or_path", config,
                        "--reward_model_name_or_path", config, "--cost_model_name_or_path", config, "--lora_r", 16,
                        "--gradient_checkpointing", "--gpu_memory_gb", gpu_gb)
    assert "7.063 B parameters" in result.stdout and f"of {gpu_gb:.1f} GiB: {verdict}" in result.stdout
    assert "three bases" in result.stdout
