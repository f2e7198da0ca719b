"""The GPU path's defects (issue 24), each created on a CPU: what a real run on a GPU would hit, reproduced at tiny
size. Quantized checkpoints saved and loaded back; the 4-bit compute dtype following --dtype."""

import pytest
import torch

from modeling import load_policy, quantization_config

IDS = torch.tensor([[1, 5, 7, 9, 11, 13]])


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_an_8bit_checkpoint_loads_back_as_it_was_saved(tiny_models, tmp_path):
    """Saved from an 8-bit load, a checkpoint holds int8 codes and their scales (SCB), not weights. Loaded back
    with no --quantization it must come back 8-bit, not as the codes read as fp32 weights (before the fix: logits
    0.76-0.92 away, every SCB key UNEXPECTED); the same codes and scales give the same logits, exactly."""
    import bitsandbytes as bnb

    model, processor, _ = load_policy(tiny_models["text"], quantization="8bit")
    expected = logits_of(model)
    model.save_pretrained(tmp_path / "saved"), processor.save_pretrained(tmp_path / "saved")
    for quantization in ("none", "8bit"):  # as saved; or saying so
        loaded, _, _ = load_policy(str(tmp_path / "saved"), quantization=quantization)
        assert isinstance(loaded.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
        assert torch.equal(logits_of(loaded), expected)  # the same int8 matmuls on the same codes: bit identity


def test_a_4bit_checkpoint_is_refused_with_one_line(tiny_models, tmp_path):
    """A 4-bit save used to crash on load (packed uint8 shapes against the full-size layer). Loading it as saved
    does not help with transformers 5.23: the block scales (absmax, (out*in/64) per layer, stored 2-D) of a layer
    wider than 64 come back transposed, so the logits are wrong (measured here: down_proj's dequantized weights up
    to 0.044 away; q_proj, one row of scales, exact). So it is refused, naming the file and what to do instead."""
    model, processor, _ = load_policy(tiny_models["text"], quantization="4bit")
    model.save_pretrained(tmp_path / "saved"), processor.save_pretrained(tmp_path / "saved")
    for quantization in ("none", "4bit", "8bit"):
        with pytest.raises(SystemExit, match=r"saved 4bit-quantized .* full-precision checkpoint with --quantization"):
            load_policy(str(tmp_path / "saved"), quantization=quantization)


def test_an_8bit_checkpoint_is_refused_in_another_form(tiny_models, tmp_path):
    model, processor, _ = load_policy(tiny_models["text"], quantization="8bit")
    model.save_pretrained(tmp_path / "saved"), processor.save_pretrained(tmp_path / "saved")
    with pytest.raises(SystemExit, match="saved 8bit-quantized, --quantization 4bit asks for another form"):
        load_policy(str(tmp_path / "saved"), quantization="4bit")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_4bit_compute_dtype_follows_the_run_dtype(dtype):
    """4-bit matmuls run in the run's dtype: fp16 on a T4 or V100 (no bf16), not a hard-coded bf16."""
    assert quantization_config("4bit", dtype).bnb_4bit_compute_dtype == dtype
    assert quantization_config("none", dtype) is None


def test_a_4bit_load_computes_in_the_dtype_asked_for(tiny_models):
    model, _, _ = load_policy(tiny_models["text"], quantization="4bit", dtype="bfloat16")
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16


def test_merge_lora_exports_the_actors_projector_whatever_adapter_is_active(tiny_models, toy_world_dir, tmp_path):
    """--merge_lora on a shared base: peft's merge_and_unload replaces each modules_to_save wrapper (the trained
    projector) by the copy of the ACTIVE adapter, whatever adapter_names says. With a critic's adapter active (as
    after a critic update, an evaluation or a PTX step placed last), the export must still be the actor: its
    projector, and the logits of the actor role."""
    import train_ppo_lag
    from data import collate, encode_example, load_prompts
    from infra import ppo_setup
    from infra.checkpoint import save_merged
    from modeling import generate
    from utils import get_tokenizer

    args = train_ppo_lag.Args(actor_model_name_or_path=tiny_models["llava"], reward_model_name_or_path=tiny_models[
        "llava"], cost_model_name_or_path="", algo="ppo", lora_r=4, lora_alpha=8.0, dtype="float32")
    roles, processor, family = ppo_setup.load_lora_roles(args, "cpu", None)
    base = roles.actor.base
    torch.manual_seed(0)
    with torch.no_grad():  # the actor and the critic trained apart: different adapters, different projectors
        for name, param in base.model.named_parameters():
            if ".modules_to_save.actor." in name or "lora_B.actor" in name:
                param.add_(0.3 * torch.randn_like(param))
            elif ".modules_to_save.reward_critic." in name:
                param.add_(-0.3 * torch.randn_like(param))
    rows, _ = load_prompts(str(toy_world_dir / "pairs"), limit=3)
    prompts = collate([encode_example(processor, family, r["question"], r["image"], None, 256) for r in rows],
                      get_tokenizer(processor).pad_token_id, "left")
    batch = generate(roles.reference, processor, family, prompts, 4)
    with torch.no_grad():
        actor = train_ppo_lag.policy_log_probs(roles.actor, batch, family)
        critic_projector = {n.split(".modules_to_save.reward_critic.")[1]: p.clone()
                            for n, p in base.model.named_parameters() if ".modules_to_save.reward_critic." in n}
        roles.reward_critic(batch)  # a critic forward last: its adapter is the active one now
    assert base.model.active_adapter == "reward_critic"
    save_merged(roles.actor, tmp_path / "merged", processor)
    merged, _, _ = load_policy(str(tmp_path / "merged"))
    with torch.no_grad():
        exported = train_ppo_lag.policy_log_probs(merged, batch, family)
    mask = batch["response_mask"][:, 1:]
    assert (exported - actor).masked_select(mask).abs().max() <= 1e-5
    projector = dict(merged.model.multi_modal_projector.named_parameters())
    assert any(not torch.equal(projector[k], v) for k, v in critic_projector.items() if k in projector)


def test_an_8bit_base_under_bf16_logs_its_cast_once_per_run(tiny_models, caplog):
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" at every 8-bit matmul under bf16 (14
    lines per forward of this 2-layer model, about 224 per generated token at 7B, estimated): once per run, and nothing
    else of bitsandbytes is dropped."""
    import logging

    model, _, _ = load_policy(tiny_models["text"], quantization="8bit", dtype="bfloat16")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"), torch.no_grad():
        for _ in range(3):
            model(input_ids=IDS)
        logging.getLogger("bitsandbytes.autograd._functions").warning("another bitsandbytes warning")
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("bitsandbytes")]
    assert sum(m.startswith("MatMul8bitLt:") for m in messages) <= 1  # once per process (another test may own it)
    assert "another bitsandbytes warning" in messages


def test_compiled_rollouts_reuse_one_static_cache_and_compile_once(tiny_models):
    """--compile: transformers builds a new static cache at every generate(), so on CUDA the recorded graphs see new
    cache addresses at every rollout. generate() keeps one cache per model and batch size and resets it: the
    second and third rollouts compile nothing new (torch._dynamo's counters), run on the same cache tensors, and
    sample exactly what a fresh cache samples (the reset leaves nothing behind)."""
    import torch._dynamo.utils as dynamo_utils

    from data import collate, encode_example
    from modeling import generate
    from utils import get_tokenizer

    model, processor, family = load_policy(tiny_models["text"])
    examples = [encode_example(processor, family, q, None, None, 64) for q in ("hello there", "what is this thing")]
    batch = collate(examples, get_tokenizer(processor).pad_token_id, "left")
    outputs, graphs, addresses = [], [], []
    for seed in (0, 1, 1):
        torch.manual_seed(seed)
        outputs.append(generate(model, processor, family, batch, 6, compile=True)["input_ids"])
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
        cache = model._rollout_caches[2]
        addresses.append((id(cache), cache.layers[0].keys.data_ptr()))
    assert graphs[1] == graphs[2] == graphs[0] > 0  # compiled at the first rollout only
    assert addresses[0] == addresses[1] == addresses[2]
    assert torch.equal(outputs[1], outputs[2])  # a reused, reset cache samples as the same seed did before
    model._rollout_caches.clear()  # a fresh cache: the same tokens again
    torch.manual_seed(1)
    assert torch.equal(generate(model, processor, family, batch, 6, compile=True)["input_ids"], outputs[1])


def bytes_held_by_8bit_matmuls(loss: torch.Tensor) -> int:
    """Bytes of the tensors that bitsandbytes' 8-bit matmul nodes of `loss`'s graph keep as plain attributes
    (outside saved_tensors, so out of activation checkpointing's reach)."""
    seen, todo, total = set(), [loss.grad_fn], 0
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if "MatMul8bit" in type(node).__name__:
            for t in [getattr(node, "A", None), *(getattr(node, "tensors", None) or [])]:
                total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
        todo += [f for f, _ in node.next_functions]
    return total


def test_checkpointing_frees_the_inputs_of_a_frozen_8bit_base(tiny_models, monkeypatch):
    """An 8-bit base with LoRA adapters and activation checkpointing: bitsandbytes' matmul nodes kept every linear
    layer's input as a plain attribute, which checkpointing cannot free (measured here before the fix: 1.05 MB
    held beside 0.40 MB of checkpointed saved tensors for a batch of 4 x 64; at LLaVA-1.5-7B about 13 GiB,
    estimated). A frozen weight's backward never reads it: nothing is held now, and the adapters' gradients are
    bit-identical to those of bitsandbytes' own forward (the same computation)."""
    from bitsandbytes.autograd import _functions as bnb_functions

    lora = {"r": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    model, _, _ = load_policy(tiny_models["text"], quantization="8bit", lora=lora, gradient_checkpointing=True)
    model.train()
    ids = torch.randint(5, 500, (4, 64), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids).logits.float().pow(2).mean()
        held = bytes_held_by_8bit_matmuls(loss)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return saved[0], held, grads

    saved, held, grads = step()
    assert saved > 0 and held == 0
    for function in (bnb_functions.MatMul8bitLt, bnb_functions.MatMul8bitFp):  # bitsandbytes' own forward back
        monkeypatch.setattr(function, "forward", staticmethod(function.forward.__defaults__[-1]))
    _, held_before, grads_before = step()
    assert held_before > saved  # the defect: more held outside checkpointing than the checkpointed tensors
    assert grads.keys() == grads_before.keys() and grads
    assert all(torch.equal(grads[n], grads_before[n]) for n in grads)


# ---- 5. a sharded model's checkpoint is written one tensor at a time ---------------------------------------------


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "text"])
def test_streamed_weights_are_what_save_pretrained_writes(tiny_models, tmp_path, family):
    """checkpoint.stream_weights (what an FSDP checkpoint uses, here on whole tensors) against save_pretrained: the
    same saved names (LLaVA's reverted to its legacy layout, tied weights once), the same tensors, the same config;
    split into several shards + an index, it loads back through from_pretrained to the same logits; and the host
    held at most one shard at a time."""
    import json

    from safetensors import safe_open

    from infra.checkpoint import RankZeroWriter, stream_weights

    model, processor, _ = load_policy(tiny_models[family], "float32", "cpu")
    model.save_pretrained(str(tmp_path / "reference"), safe_serialization=True)
    state = model.state_dict()
    largest = max(t.numel() * t.element_size() for t in state.values())
    total = sum(t.numel() * t.element_size() for t in state.values())
    shard_bytes = total // 4
    peak = stream_weights(model, state, tmp_path / "streamed", RankZeroWriter(True), max_shard_bytes=shard_bytes)
    assert peak <= shard_bytes + largest and peak < total
    processor.save_pretrained(str(tmp_path / "streamed"))

    def saved(folder):
        tensors = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
        return tensors

    reference, streamed = saved(tmp_path / "reference"), saved(tmp_path / "streamed")
    assert len(list((tmp_path / "streamed").glob("model-*-of-*.safetensors"))) >= 3
    assert sorted(reference) == sorted(streamed)
    assert all(torch.equal(reference[k], streamed[k]) for k in reference)
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(reference)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "reference" / name).read_text()) == \
            json.loads((tmp_path / "streamed" / name).read_text()), name
    reloaded, _, _ = load_policy(str(tmp_path / "streamed"), "float32", "cpu")
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_write_error_mid_stream_keeps_gathering_and_is_kept():
    """RankZeroWriter: after a failed write the rest are skipped (rank 0 goes on joining the gathers), the first
    error is kept for save_checkpoint to raise on every rank."""
    from infra.checkpoint import RankZeroWriter

    calls = []

    def write(i):
        calls.append(i)
        if i == 1:
            raise OSError("no space left")

    writer = RankZeroWriter(True)
    for i in range(4):
        writer(write, i)
    assert calls == [0, 1] and isinstance(writer.error, OSError) and not writer.active
    other_rank = RankZeroWriter(False)
    other_rank(write, 0)
    assert calls == [0, 1] and other_rank.error is None
