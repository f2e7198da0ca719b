"""FSDP2 (--fsdp) on two CPU ranks (gloo), the way a user shards a model too large for one GPU over several with NCCL:
two sharded ranks give the weights, lambda and figures of one unsharded rank with the same global batch, a sharded
run resumes bit-identically, and generation on a sharded actor does not wait on the other rank."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT
from infra import cli, parallel
from test_distributed import assert_group_freed, torchrun
from test_reliability import ENV, ppo_args, rm_args, score_models  # noqa: F401

# Two Adam steps at lr 1e-3: sharded and unsharded runs sum the same gradients in another order (reduce-scatter
# vs one backward over the whole batch), ~1e-7 apart; Adam's first steps divide by sqrt(v), so a weight may move
# up to ~1e-5 differently. Measured: at most 5.8e-6 (PPO-Lag) and 1.1e-6 (RM).
WEIGHT_TOLERANCE = 2e-5
FIGURE_TOLERANCE = 1e-4  # relative, on every logged float


def max_weight_difference(first, second) -> dict:
    """file -> max |a - b| over every tensor of two saved models (same tensor names required)."""
    out = {}
    for file in sorted(p.name for p in first.glob("*.safetensors")):
        a, b = load_file(str(first / file)), load_file(str(second / file))
        assert a.keys() == b.keys(), f"{file}: {sorted(set(a) ^ set(b))[:3]}"
        out[file] = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert out, f"no safetensors in {first}"
    return out


def assert_same_figures(first, second, skip=("seconds",)) -> None:
    records = [[json.loads(line) for line in open(run / "metrics.jsonl")] for run in (first, second)]
    assert len(records[0]) == len(records[1])
    for a, b in zip(*records):
        for key, value in a.items():
            if isinstance(value, float) and key not in skip:
                assert b[key] == pytest.approx(value, rel=FIGURE_TOLERANCE, abs=1e-6), f"step {a['step']}: {key}"


def run_one_rank(argv, harness=()):
    result = subprocess.run([sys.executable, "tests/harness.py", *harness, *[str(a) for a in argv]], cwd=ROOT,
                            env=ENV, timeout=600, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.fixture(scope="module")
def ppo_runs(tiny_models, toy_world_dir, score_models, tmp_path_factory):  # noqa: F811
    """Two PPO-Lag steps: one rank with 8 prompts per rollout and one minibatch of 8, and two FSDP ranks with 4 and
    4. Each prompt is sampled alone from a stream seeded by its tokens (harness --sample_per_prompt), so both runs
    draw the same responses whatever rank a prompt lands on. 6 new tokens: every response runs to the limit, so
    each rank's token-mean losses weigh their tokens as the one-rank mean does."""
    one, two = tmp_path_factory.mktemp("ppo_one_rank"), tmp_path_factory.mktemp("ppo_fsdp")
    common = dict(max_steps=2, ptx_data="", save_steps=1, logging_steps=1)
    run_one_rank(ppo_args(tiny_models, toy_world_dir, score_models, one, per_device_prompt_batch_size=8,
                          per_device_train_batch_size=8, **common), harness=["--sample_per_prompt"])
    argv = ppo_args(tiny_models, toy_world_dir, score_models, two, per_device_prompt_batch_size=4,
                    per_device_train_batch_size=4, fsdp=True, **common)
    result = torchrun(argv, harness=["--sample_per_prompt"])
    assert result.returncode == 0, result.stdout[-3000:]
    return one, two, argv


def test_fsdp_ppo_lag_on_two_ranks_equals_one_rank(ppo_runs):
    one, two, _ = ppo_runs
    records = [json.loads(line) for line in open(two / "metrics.jsonl")]
    assert [r["truncated_rate"] for r in records] == [1.0, 1.0]  # the premise of equal token counts per rank
    for role in ("actor", "reward_critic", "cost_critic"):
        for file, difference in max_weight_difference(one / role, two / role).items():
            assert difference <= WEIGHT_TOLERANCE, f"{role}/{file}: {difference}"
    args = json.loads((one / "args.json").read_text())
    moved = max_weight_difference(one / "actor", Path(args["actor_model_name_or_path"]))["model.safetensors"]
    assert moved > 10 * WEIGHT_TOLERANCE  # the actor did train: equal within the tolerance means something
    lambdas = [json.loads((run / "lambda.json").read_text())["lambda"] for run in (one, two)]
    assert lambdas[0] == pytest.approx(lambdas[1], abs=1e-7) and lambdas[0] != 1.0  # lambda moved, identically
    assert_same_figures(one, two)


# slow (~14 s): resume stays covered by the default suite on one rank (test_reliability), FSDP by the equality below
@pytest.mark.slow
def test_fsdp_ppo_lag_resumes_bit_identically(ppo_runs, tmp_path):
    """Checkpoint 1 of the sharded run (full weights and name-keyed optimizer states written by rank 0), resumed
    on two sharded ranks, ends with the uninterrupted run's step-2 weights, bit for bit."""
    _, two, argv = ppo_runs
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(two / "checkpoints" / "checkpoint-00000001", tmp_path / "checkpoints" / "checkpoint-00000001")
    shutil.copy(two / "metrics.jsonl", tmp_path / "metrics.jsonl")
    argv = [a if not a.startswith("--output_dir=") else f"--output_dir={tmp_path}" for a in argv]
    result = torchrun(argv + ["--resume_from=auto"], harness=["--sample_per_prompt"])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "resumed from" in result.stdout
    for role in ("actor", "reward_critic", "cost_critic"):
        assert set(max_weight_difference(two / role, tmp_path / role).values()) == {0.0}, role
    assert json.loads((tmp_path / "lambda.json").read_text()) == json.loads((two / "lambda.json").read_text())


# slow (~16 s): accumulation stays covered by the default suite under DDP (test_distributed) and on one rank
@pytest.mark.slow
def test_fsdp_with_gradient_accumulation_equals_one_rank(tiny_models, toy_world_dir, score_models, tmp_path):  # noqa: F811
    """The same comparison with two minibatches per rollout and gradient accumulation 2: FSDP reduce-scatters after
    every micro-batch (the sharded gradients accumulate), and the step's gradient is still the mean over the global
    batch (every response has the same number of tokens: see ppo_runs)."""
    common = dict(max_steps=2, ptx_data="", save_steps=1, logging_steps=1, gradient_accumulation_steps=2)
    run_one_rank(ppo_args(tiny_models, toy_world_dir, score_models, tmp_path / "one", per_device_prompt_batch_size=8,
                          per_device_train_batch_size=4, **common), harness=["--sample_per_prompt"])
    result = torchrun(ppo_args(tiny_models, toy_world_dir, score_models, tmp_path / "two",
                               per_device_prompt_batch_size=4, per_device_train_batch_size=2, fsdp=True, **common),
                      harness=["--sample_per_prompt"])
    assert result.returncode == 0, result.stdout[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [r["optimizer_steps"] for r in records] == [1, 2] and [r["truncated_rate"] for r in records] == [1.0, 1.0]
    for role in ("actor", "reward_critic", "cost_critic"):
        for file, difference in max_weight_difference(tmp_path / "one" / role, tmp_path / "two" / role).items():
            assert difference <= WEIGHT_TOLERANCE, f"{role}/{file}: {difference}"


# slow (~24 s): FSDP equality stays covered by the default suite for PPO-Lag (test_fsdp_ppo_lag_on_two_ranks_...)
@pytest.mark.slow
def test_fsdp_reward_model_on_two_ranks_equals_one_rank(tiny_models, toy_world_dir, tmp_path):
    """Two RM steps (a fresh score head: rank 0's is given to both ranks before sharding) on one rank with 8 pairs
    per step and on two FSDP ranks with 4 each."""
    options = dict(epochs=1, max_steps=2)
    run_one_rank(rm_args(tiny_models, toy_world_dir, tmp_path / "one", per_device_batch_size=8, **options))
    result = torchrun(rm_args(tiny_models, toy_world_dir, tmp_path / "two", per_device_batch_size=4, fsdp=True,
                              **options))
    assert result.returncode == 0, result.stdout[-3000:]
    for file, difference in max_weight_difference(tmp_path / "one", tmp_path / "two").items():
        assert difference <= WEIGHT_TOLERANCE, f"{file}: {difference}"
    moved = max_weight_difference(tmp_path / "one" / "checkpoints" / "checkpoint-00000001" / "model",
                                  tmp_path / "one")
    assert max(moved.values()) > 10 * WEIGHT_TOLERANCE  # step 2 moved the weights well beyond the tolerance
    assert_same_figures(tmp_path / "one", tmp_path / "two")  # train/loss: the mean over both ranks' pairs


# Every probe ends as the scripts do (infra.cli.run_script): its objects freed, destroy_distributed, then no gloo thread
# may be left. A probe that called torch.distributed.destroy_process_group() alone, its sharded models still alive
# at module level, left the group to the interpreter's exit, and rank 0 died there with SIGABRT in 1 of 20 rounds of
# scripts/stress_distributed.sh.
PROBE_TEARDOWN = f"""
sys.path.insert(0, {str(ROOT / "tests")!r})
import harness
from infra import parallel
parallel.destroy_distributed()
harness.report_gloo_threads()
"""


def run_probe(template: str, model: str, tmp_path):
    """A probe script (template with {root} and {model}) on 2 gloo ranks; asserts it ended well."""
    probe = tmp_path / "probe.py"
    # the probe's body runs as a function, so that its models are freed when it returns (as a script's main's are):
    # a sharded model still alive holds the group through its FSDP2 state
    body = textwrap.indent(template.format(root=str(ROOT), model=model), "    ")
    probe.write_text(f"import sys\n\n\ndef probe():\n{body}\n\nprobe()\n{PROBE_TEARDOWN}")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(probe)], cwd=ROOT, env=ENV, timeout=300, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert_group_freed(result.stdout)
    return result


GENERATE_PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
from infra.parallel import init_distributed, shard_model
from modeling import generate, load_policy
from utils import get_tokenizer
from data import collate, encode_example
from PIL import Image

rank, world_size, device = init_distributed()
model, processor, family = load_policy({model!r}, "float32", "cpu")
prompts = [encode_example(processor, family, "what is in the picture?", Image.new("RGB", (32, 32), "red"), None, 256)]
batch = collate(prompts, get_tokenizer(processor).pad_token_id, "left")
torch.manual_seed(0)
whole = generate(model, processor, family, batch, 3 + 5 * rank)
shard_model(model, device, torch.float32)
torch.manual_seed(0)
sharded = generate(model, processor, family, batch, 3 + 5 * rank)  # rank 1 decodes 5 more tokens than rank 0
assert torch.equal(whole["input_ids"], sharded["input_ids"]), (whole["input_ids"], sharded["input_ids"])
assert torch.allclose(whole["sampling_log_probs"], sharded["sampling_log_probs"], atol=1e-6)
print(f"rank {{rank}}: {{sharded['input_ids'].shape[1] - batch['input_ids'].shape[1]}} new tokens, as unsharded")
"""


def test_sharded_generation_needs_no_collective_per_token(tiny_models, tmp_path):
    """generate() on a sharded actor gathers it once (modeling.unsharded): ranks that decode different numbers of
    tokens do not wait on each other, and sample what the whole model samples."""
    result = run_probe(GENERATE_PROBE, tiny_models["llava"], tmp_path)
    assert "rank 0: 3 new tokens, as unsharded" in result.stdout
    assert "rank 1: 8 new tokens, as unsharded" in result.stdout


RANK0_PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
from infra.parallel import init_distributed, load_device, shard_model
from modeling import ScoreModel, forward_kwargs, load_policy
from utils import get_tokenizer
from data import collate, encode_example
from PIL import Image

rank, world_size, device = init_distributed()
where = load_device(True, device)
model, processor, family = load_policy({model!r}, "float32", where)
torch.manual_seed(rank)  # a different stream per rank: the fresh score head must still be rank 0's everywhere
critic, _ = ScoreModel.from_pretrained({model!r}, "float32", where)
loaded_on = sorted({{p.device.type for m in (model, critic) for p in list(m.parameters()) + list(m.buffers())}})
print(f"rank {{rank}} loaded on {{loaded_on}}")
whole, _, _ = load_policy({model!r}, "float32", "cpu")
shard_model(model, device, torch.float32)
shard_model(critic, device, torch.float32)
prompts = [encode_example(processor, family, "what is in the picture?", Image.new("RGB", (32, 32), "red"), None, 256)]
batch = collate(prompts, get_tokenizer(processor).pad_token_id, "left")
with torch.no_grad():
    expected = whole(**forward_kwargs(batch, family), use_cache=False).logits
    logits = model(**forward_kwargs(batch, family), use_cache=False).logits
    head = torch.cat([p.full_tensor().reshape(-1) for p in critic.score_head.parameters()])
assert torch.allclose(logits, expected, atol=1e-5), (logits - expected).abs().max()
heads = [torch.zeros_like(head) for _ in range(world_size)]
torch.distributed.all_gather(heads, head)
assert torch.equal(heads[0], heads[1])  # a copy (rank 0's head, sent to every rank): bit identity is the claim
print(f"rank {{rank}}: logits as the whole model, score head as rank 0's")
"""


def test_fsdp_ranks_other_than_0_load_no_weights(tiny_models, tmp_path):
    """--fsdp: rank 0 loads each model on its CPU, every other rank builds it on the meta device (no memory), and
    shard_model gives each rank its shards of rank 0's weights and rank 0's buffers (the rotary frequencies are in
    no state dict): the sharded model's logits are the whole model's on both ranks, and a fresh score head is rank
    0's although each rank drew its own."""
    result = run_probe(RANK0_PROBE, tiny_models["llava"], tmp_path)
    assert "rank 0 loaded on ['cpu']" in result.stdout
    assert "rank 1 loaded on ['meta']" in result.stdout
    assert "rank 0: logits as the whole model, score head as rank 0's" in result.stdout
    assert "rank 1: logits as the whole model, score head as rank 0's" in result.stdout


@pytest.mark.parametrize("extra, message", [
    (dict(lora_r=4), "--fsdp is for full fine-tuning"),
    (dict(quantization="8bit"), "--fsdp is for full fine-tuning"),
])
def test_fsdp_refuses_what_it_does_not_combine_with(extra, message, monkeypatch):
    import train_ppo_lag

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = train_ppo_lag.Args(fsdp=True, **extra)
    with pytest.raises(SystemExit, match=message):
        parallel.check_fsdp(args)


def test_fsdp_on_one_process_is_a_notice(monkeypatch, capsys):
    import train_ppo_lag

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parallel.check_fsdp(train_ppo_lag.Args(fsdp=True)) is False
    assert "nothing to shard" in capsys.readouterr().err


def test_fsdp_stores_frozen_roles_in_the_gpu_compute_dtype(tiny_models, toy_world_dir, score_models, monkeypatch,
                                                           tmp_path):  # noqa: F811
    """--fsdp loads every role on the CPU before sharding it; with --dtype auto on a GPU the frozen roles (reference,
    reward and cost models) must still be stored in bf16, the GPU's compute dtype, not in fp32 (what "auto" means
    on the CPU), and the trained roles keep fp32 masters. The GPU is only named here: sharding is replaced by the
    identity, so that nothing is moved to it."""
    import torch

    import train_ppo_lag
    from infra import ppo_setup

    argv = ppo_args(tiny_models, toy_world_dir, score_models, tmp_path, fsdp=True)[1:]
    args = cli.parse_args(train_ppo_lag.Args, argv)
    assert args.dtype == "auto"
    monkeypatch.setattr(ppo_setup, "shard_model", lambda model, device, compute_dtype=None, frozen=False: model)
    roles, _, _ = ppo_setup.load_roles(args, torch.device("cuda", 0), None, fsdp=True)
    dtypes = lambda model: {p.dtype for name, p in model.named_parameters() if "score_head" not in name}
    for frozen in (roles.reference, roles.reward_model, roles.cost_model):
        assert dtypes(frozen) == {torch.bfloat16}
    for trained in (roles.actor, roles.reward_critic, roles.cost_critic):
        assert dtypes(trained) == {torch.float32}
    assert roles.reward_model.score_head.weight.dtype == torch.float32


FROZEN_ROOT_PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
from torch.distributed.tensor import DTensor
from infra.parallel import init_distributed, shard_model
from modeling import ScoreModel, forward_kwargs
from utils import get_tokenizer
from data import collate, encode_example
from PIL import Image

def resident(model):  # parameter bytes this rank holds now: a sharded parameter's shard, an unsharded one whole
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters())

rank, world_size, device = init_distributed()
frozen, processor = ScoreModel.from_pretrained({model!r}, "float32", "cpu")
frozen.eval().requires_grad_(False)
whole = resident(frozen)
shard_model(frozen, device, frozen=True)
prompts = [encode_example(processor, "llava", "what is in the picture?", Image.new("RGB", (32, 32), "red"), None, 256)]
batch = collate(prompts, get_tokenizer(processor).pad_token_id, "left")
with torch.no_grad():
    frozen(batch)
after = resident(frozen)
print(f"rank {{rank}}: resident after a forward {{after}} of {{whole}} bytes")
assert after <= 1.01 * whole / world_size, (after, whole)  # its shards only (1%: uneven row splits)
"""


def test_a_frozen_role_keeps_no_unit_gathered_after_its_forward(tiny_models, tmp_path):
    """FSDP2 keeps the root unit (embeddings, lm_head, vision tower, projector) gathered after a forward, for the
    backward; a frozen role (reference, reward or cost model) has no backward, so it held them whole until its
    next forward (estimated: about 2.8 GiB per GPU for LLaVA-1.5-7B, 7.8 GiB for Qwen2-VL-7B; measured here,
    before the fix, 360 KB of the 508 KB model on each of 2 ranks). After a forward each rank holds its shards
    only: 1/world of the model."""
    result = run_probe(FROZEN_ROOT_PROBE, tiny_models["llava"], tmp_path)
    assert result.stdout.count("resident after a forward") == 2
