"""What train_ppo_lag.main sets up around the method (none of it is the method's math or one of its steps):
the six roles, loaded as full models or as LoRA adapters on shared frozen bases; the optimizers; the data (prompt
loader, PTX stream, held-out prompts); the loop's fresh state; the held-out evaluation and samples; the final save.
These read the script's options (`args`: train_ppo_lag.Args), as main does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from pathlib import Path

import torch

from data import check_images, collate, encode_example, eval_source, load_prompts, load_sft, open_image
from infra.checkpoint import publish_model, save_merged
from infra.cli import lora_options, model_options
from infra.optim import make_optimizer, training_dtype
from infra.parallel import broadcast_parameters, load_device, shard_model
from infra.runlog import RunLog, data_report, warn_overlap, write_model_card
from lora import (AdapterBackbone, PolicyView, SharedBase, adapter_base, is_adapter, refuse_adapter_on_quantized_base,
                  unwrap_adapters)
from modeling import (SCORE_CONFIG_FILE, SCORE_HEAD_FILE, ScoreModel, generate, hidden_size_of,
                      keep_image_path_in_graph, load_policy, response_texts)
from utils import autocast, get_tokenizer, make_loader, to_device, torch_dtype, write_atomic, write_json


# ---- the options, checked


def minibatches_per_rollout(update_iters: int, prompt_batch_size: int, train_batch_size: int,
                            accumulation: int) -> int:
    """PPO minibatches of one rollout (all update_iters passes). Gradient accumulation must divide it exactly, so that
    every PPO step ends on an optimizer step and no gradient leaks into the next rollout."""
    minibatches = update_iters * math.ceil(prompt_batch_size / train_batch_size)
    if minibatches % accumulation:
        raise SystemExit(
            f"--gradient_accumulation_steps {accumulation} does not divide the "
            f"{minibatches} minibatches of a PPO step (update_iters {update_iters} x ceil(prompt batch "
            f"{prompt_batch_size} / train batch {train_batch_size})): choose a divisor")
    return minibatches


def check_args(args) -> None:
    """Options that would fail later (or silently) stop here with a one-line message."""
    if args.algo not in ("ppo_lag", "ppo"):
        raise SystemExit(f"--algo must be ppo_lag or ppo, got {args.algo!r}")
    if args.lambda_update not in ("log", "additive", "pid"):
        raise SystemExit(f"--lambda_update must be log, additive or pid, got {args.lambda_update!r}")
    if args.algo == "ppo_lag" and args.lambda_update == "log" and args.lambda_init <= 0:
        raise SystemExit(f"--lambda_init {args.lambda_init}: the log-space update (--lambda_update log) needs lambda "
                         "> 0 (it moves ln lambda); give a positive value, or --lambda_update additive / pid")
    if args.top_p != 1.0:
        raise SystemExit(f"--top_p {args.top_p}: nucleus sampling draws from a truncated distribution that the PPO "
                         "log-probs do not describe (the updates would be off-policy); use --top_p 1 and, to sharpen "
                         "sampling, --temperature < 1, which the log-probs account for")
    if args.temperature <= 0:
        raise SystemExit(f"--temperature must be > 0, got {args.temperature}")
    if args.old_log_probs not in ("auto", "sampling", "forward"):
        raise SystemExit(f"--old_log_probs must be auto, sampling or forward, got {args.old_log_probs!r}")
    if args.lambda_init < 0 or args.lambda_init > args.lambda_max:
        raise SystemExit(f"--lambda_init {args.lambda_init} must lie in [0, --lambda_max {args.lambda_max}]")
    minibatches_per_rollout(args.update_iters, args.per_device_prompt_batch_size, args.per_device_train_batch_size,
                            args.gradient_accumulation_steps)
    # (the actor and the reference would both lose the SFT adapter: the actor's own adapter replaces it as active)
    refuse_adapter_on_quantized_base(args.actor_model_name_or_path, "--actor_model_name_or_path", args.lora_r,
                                     args.quantization)


# ---- the six roles


@dataclasses.dataclass
class Roles:
    """The six models. `rollout` uses them as they are (no DDP wrapper); cost roles are None for plain PPO (a cost
    model without a cost critic is only logged)."""

    actor: torch.nn.Module
    reference: torch.nn.Module
    reward_model: ScoreModel
    reward_critic: ScoreModel
    cost_model: ScoreModel | None = None
    cost_critic: ScoreModel | None = None

    def trained(self) -> dict:
        """name -> model for the roles PPO trains (the names of their checkpoint folders)."""
        trained = {"actor": self.actor, "reward_critic": self.reward_critic}
        if self.cost_critic is not None:
            trained["cost_critic"] = self.cost_critic
        return trained


def load_roles(args, device, checkpoint, fsdp: bool = False) -> tuple[Roles, object, str]:
    """(roles, processor, family). On resume the trained roles come from the checkpoint; the reference always is
    the initial actor, and the reward and cost models are always the given ones. Trained roles (actor, critics)
    hold fp32 master weights; frozen ones are stored in --dtype (and may be quantized). With --lora_r the roles
    share frozen bases instead: load_lora_roles. fsdp (--fsdp under torchrun): each role is loaded on the CPU and
    sharded over the ranks (infra.parallel.shard_model) before the next one is loaded."""
    compute_dtype = training_dtype(args.dtype, device)  # refuses float16
    if args.lora_r:
        return load_lora_roles(args, device, checkpoint)
    # Frozen roles are stored in the compute dtype of `device` ("auto": bf16 on a GPU), also when --fsdp loads them
    # on the CPU first, where "auto" alone would mean fp32 (twice the memory and all-gather traffic).
    load = dict(dtype=str(compute_dtype).removeprefix("torch."), device=load_device(fsdp, device),
                **model_options(args))
    trained = dict(load, dtype="float32", freeze_vision=args.freeze_vision_tower,
                   gradient_checkpointing=args.gradient_checkpointing)
    resumed = lambda name, path: str(checkpoint / name) if checkpoint is not None else path

    def placed(model, is_trained: bool):  # frozen roles: eval mode, no gradients; then sharded under --fsdp
        if not is_trained:
            model.eval().requires_grad_(False)
        else:  # a batch without an image still reaches the projector (zero gradient): ranks reduce the same tensors
            keep_image_path_in_graph(model)
        if not fsdp:
            return model
        return shard_model(model, device, compute_dtype if is_trained else None, frozen=not is_trained)

    actor, processor, family = load_policy(resumed("actor", args.actor_model_name_or_path), **trained)
    actor = placed(actor, True)
    reference = placed(load_policy(args.actor_model_name_or_path, quantization=args.quantization, **load)[0], False)
    reward_model = placed(ScoreModel.from_pretrained(args.reward_model_name_or_path, quantization=args.quantization,
                                                     **load)[0], False)
    reward_critic = placed(ScoreModel.from_pretrained(
        resumed("reward_critic", args.reward_critic_model_name_or_path or args.reward_model_name_or_path),
        **trained)[0], True)
    roles = Roles(actor, reference, reward_model, reward_critic)
    if args.algo == "ppo_lag" or args.cost_model_name_or_path:
        if not args.cost_model_name_or_path:
            raise SystemExit("--algo ppo_lag needs --cost_model_name_or_path")
        roles.cost_model = placed(ScoreModel.from_pretrained(args.cost_model_name_or_path,
                                                             quantization=args.quantization, **load)[0], False)
    if args.algo == "ppo_lag":
        roles.cost_critic = placed(ScoreModel.from_pretrained(
            resumed("cost_critic", args.cost_critic_model_name_or_path or args.cost_model_name_or_path),
            **trained)[0], True)
    for name, model in (("reward model", roles.reward_model), ("cost model", roles.cost_model)):
        if model is not None and model.family != family:
            raise SystemExit(f"the {name} is a {model.family} model but the actor is {family}: they must share the "
                             "processor and tokenizer")
    return roles, processor, family


def load_lora_roles(args, device, checkpoint) -> tuple[Roles, object, str]:
    """--lora_r > 0: every trained role is a LoRA adapter (a critic: + its score head) on a frozen base that is
    loaded once and shared (lora.SharedBase):
      - the actor is an adapter on the actor's base; the reference is that base with the adapters disabled (no
        copy, and the first rollout's KL is exactly 0, quantized base or not);
      - a critic is an adapter + head on the base of the score model it starts from: a LoRA score model's base
        (the critic continues its adapter) or a full score model's backbone (a fresh adapter, starting as it);
      - the frozen reward (cost) model is its LoRA adapter on that same base, or the full score model's backbone
        itself with the adapters disabled, with its own head.
    Reward and cost models trained as LoRA adapters on the actor's base (the SFT or instruct model) thus share it:
    one base holds all six roles. The log says which roles live on which base."""
    from safetensors.torch import load_file

    lora = lora_options(args)
    load = dict(dtype=args.dtype, device=device, quantization=args.quantization,
                freeze_vision=args.freeze_vision_tower, gradient_checkpointing=args.gradient_checkpointing,
                **model_options(args))
    bases: dict[str, SharedBase] = {}
    processors = {}

    def base_for(path: str) -> SharedBase:
        key = os.path.realpath(path) if os.path.exists(path) else path
        if key not in bases:
            if (Path(path) / SCORE_HEAD_FILE).is_file():  # a full score model: its backbone is the base
                score, processors[key] = ScoreModel.from_pretrained(path, **load)
                model, family = score.backbone, score.family
            else:
                model, processors[key], family = load_policy(path, **load)
            bases[key] = SharedBase(model, path, family, f"base {len(bases) + 1} ({path})")
        return bases[key]

    def score_role(base: SharedBase, adapter: str | None, head_from: str, role: str) -> ScoreModel:
        head_file = Path(head_from) / SCORE_HEAD_FILE
        config = json.loads((Path(head_from) / SCORE_CONFIG_FILE).read_text()) if head_file.is_file() else {}
        model = ScoreModel(AdapterBackbone(base, adapter), base.family,
                           hidden_size_of(unwrap_adapters(base.model).config), config)
        if head_file.is_file():
            model.score_head.load_state_dict(load_file(str(head_file)))
        model.score_head.to(device)
        base.roles.append(role)
        return model

    def score_roles(kind: str, model_path: str, critic_path: str, with_critic: bool):
        if is_adapter(model_path):  # a LoRA score model: its adapter, frozen, on its base
            base = base_for(adapter_base(model_path))
            base.add(kind, model_path, None, trainable=False)
            frozen = score_role(base, kind, model_path, f"{kind} model")
        else:
            frozen = score_role(base_for(model_path), None, model_path, f"{kind} model")
        if not with_critic:
            return frozen, None
        start = str(checkpoint / f"{kind}_critic") if checkpoint is not None else critic_path or model_path
        base = base_for(adapter_base(start) if is_adapter(start) else start)
        base.add(f"{kind}_critic", start if is_adapter(start) else None, lora, trainable=True,
                 train_vision=not args.freeze_vision_tower)
        return frozen, score_role(base, f"{kind}_critic", start, f"{kind} critic")

    actor_base = base_for(args.actor_model_name_or_path)
    processor, family = processors[next(iter(bases))], actor_base.family
    actor_base.add("actor", str(checkpoint / "actor") if checkpoint is not None else None, lora, trainable=True,
                   train_vision=not args.freeze_vision_tower)
    actor_base.roles += ["actor", "reference"]
    roles = Roles(PolicyView(actor_base, "actor"), PolicyView(actor_base, None), *score_roles(
        "reward", args.reward_model_name_or_path, args.reward_critic_model_name_or_path, True))
    if args.algo == "ppo_lag" or args.cost_model_name_or_path:
        if not args.cost_model_name_or_path:
            raise SystemExit("--algo ppo_lag needs --cost_model_name_or_path")
        roles.cost_model, roles.cost_critic = score_roles("cost", args.cost_model_name_or_path,
                                                          args.cost_critic_model_name_or_path, args.algo == "ppo_lag")
    for frozen in (roles.reward_model, roles.cost_model):
        if frozen is not None:
            frozen.score_head.requires_grad_(False)
            if frozen.family != family:
                raise SystemExit(f"the score models are {frozen.family} models but the actor is {family}: they must "
                                 "share the processor and tokenizer")
    if int(os.environ.get("RANK", "0")) == 0:
        for base in bases.values():
            print(f"LoRA roles on {base.label}: {', '.join(base.roles)}")
    return roles, processor, family


def replicate(trained: dict, world_size: int, lora_r: int, fsdp: bool) -> dict:
    """The trained roles as the update sees them under torchrun: DDP-wrapped full models; LoRA roles share bases,
    so no DDP: rank 0's adapters everywhere (ppo_update averages their gradients by hand); FSDP2: as sharded."""
    if world_size > 1 and not lora_r and not fsdp:
        trained = {k: torch.nn.parallel.DistributedDataParallel(m) for k, m in trained.items()}
    for model in trained.values():
        if world_size > 1 and lora_r:
            broadcast_parameters(model)
    return trained


def report_initial_kl(kl: float, quantization: str, lora_r: int, rank: int = 0) -> float:
    """Print (rank 0) the KL of the first rollout, and return it. The actor and the reference start from the same
    weights, so it is ~0 unless they hold them differently: a quantized (or lower-precision) reference adds a
    constant to the penalty."""
    line = f"KL(actor || reference) of the first rollout: {kl:.4f} nats per response"
    if quantization not in ("", "none") and not lora_r:
        line += (f" (the reference is {quantization}-quantized, the actor is not: this KL is a bias in the "
                 "penalty from the first step on; drop --quantization, or train LoRA adapters on the quantized base "
                 "(--lora_r), for an exact reference)")
    if rank == 0:
        print(line)
    return kl


def make_optimizers(trained: dict, args, updates: int) -> dict:
    """name -> (AdamW, schedule) of each trained role (Roles.trained()): the actor's learning rate, schedule and
    warmup, or the critics', over `updates` optimizer steps."""
    betas = (args.adam_beta1, args.adam_beta2)
    return {name: make_optimizer(model, args.actor_lr if name == "actor" else args.critic_lr, betas, args.weight_decay,
                                 args.actor_lr_scheduler if name == "actor" else args.critic_lr_scheduler,
                                 args.actor_warmup_ratio if name == "actor" else args.critic_warmup_ratio, updates)
            for name, model in trained.items()}


def fresh_state(args) -> dict:
    """The loop's state at step 0 (resume_state replaces it by the checkpoint's). The PID controller's memory
    starts so that lambda starts at lambda_init: I = lambda_init / Ki."""
    pid = {"integral": args.lambda_init / args.lambda_pid_ki if args.lambda_pid_ki else 0.0, "previous_error": None}
    return {"step": 0, "epoch": 0, "samples_in_epoch": 0, "lambda": args.lambda_init if args.algo == "ppo_lag" else 0.0,
            "cost_window": [], "ptx_batches": 0, "nonfinite_steps": 0, "optimizer_steps": 0, "initial_kl": None,
            "pid": pid, "record": {}}


def load_data(args, processor, family: str, rank: int, world_size: int) -> dict:
    """The prompt loader (each batch encoded with left padding, its rows kept for the toy grader), the PTX loader
    (--ptx_data) and the held-out prompts (--eval_steps / --sample_steps), what was skipped, and the encoding
    statistics (stats, filled as batches are encoded); total_steps, the PPO steps to run; the toy world's grader
    (--toy_grader, else None)."""
    pad_id = get_tokenizer(processor).pad_token_id
    prompts, skips = load_prompts(args.train_data, args.train_split, args.categories or None, args.skip_invalid)
    prompts = check_images(prompts, processor, family, args.skip_invalid, skips)  # what the processor would refuse
    stats = Counter()

    def collate_prompts(rows):
        examples = [encode_example(processor, family, r["question"], r["image"], None, args.max_length, stats,
                                   source=r["source"]) for r in rows]
        return {**collate(examples, pad_id, "left"), "rows": rows}

    loader = make_loader(prompts, args.per_device_prompt_batch_size, collate_prompts, True, args.seed, rank,
                         world_size, drop_last=True)
    ptx_loader = None
    if args.ptx_data:
        ptx_rows, ptx_skips = load_sft(args.ptx_data, args.skip_invalid)
        skips.merge(ptx_skips, "ptx_")
        ptx_rows = check_images(ptx_rows, processor, family, args.skip_invalid, skips)
        collate_sft = lambda rows: collate([encode_example(processor, family, r["question"], r["image"], r["response"],
                                                           args.max_length, stats, source=r["source"])
                                            for r in rows], pad_id)
        ptx_loader = make_loader(ptx_rows, args.per_device_train_batch_size, collate_sft, True, args.seed + 1, rank,
                                 world_size, drop_last=True)
    held_out, held_out_overlap = [], 0
    if args.eval_steps or args.sample_steps:  # --eval_data, else the eval split of train_data
        held_out, held_out_skips = load_prompts(*eval_source(args.train_data, args.eval_data, args.eval_split),
                                                args.categories or None, args.skip_invalid,
                                                max(args.eval_prompts, args.sample_prompts))
        held_out = check_images(held_out, processor, family, args.skip_invalid, held_out_skips)
        skips.merge(held_out_skips, "eval_")
        held_out_overlap = warn_overlap(held_out, prompts, "held-out", rank)
    total_steps = min(len(loader) * args.epochs, args.max_steps or len(loader) * args.epochs)
    if total_steps == 0:
        raise SystemExit(f"no PPO step to run: {len(prompts)} prompts < batch size {args.per_device_prompt_batch_size}"
                         f" x {world_size} ranks")
    if rank == 0:
        print(f"{args.algo}: {family} actor, {len(prompts)} prompts (skipped: {skips.report()}), {total_steps} steps")
    toy_world = None
    if args.toy_grader:
        from data import toy_world
    return dict(prompts=prompts, loader=loader, ptx_loader=ptx_loader, held_out=held_out, total_steps=total_steps,
                held_out_overlap=held_out_overlap, skips=skips, stats=stats, toy_world=toy_world)


class PtxStream:
    """An endless stream of PTX batches (epoch after epoch) that resumes exactly after the `consumed` first ones."""

    def __init__(self, loader, consumed: int = 0):
        self.loader, self.consumed = loader, consumed
        self._batches = self._iterate()

    def _iterate(self):
        epoch, skip = divmod(self.consumed, len(self.loader))
        while True:
            self.loader.sampler.set_epoch(epoch)
            self.loader.sampler.skip = skip * self.loader.batch_size
            yield from self.loader
            epoch, skip = epoch + 1, 0

    def __next__(self) -> dict:
        batch = next(self._batches)  # first, so that the first call still sees the `consumed` it resumes after
        self.consumed += 1
        return batch


def toy_figures(toy_world, rows: list[dict], processor, batch: dict) -> dict:
    """--toy_grader: the toy world's ground truth for the answers of a rollout batch (true_helpfulness, true_harm,
    ...); {} without a toy world."""
    if toy_world is None:
        return {}
    images = [open_image(row["image"], row.get("source")) for row in rows]
    grades = [toy_world.grade(image, row["question"], text, bool(end)) for image, row, text, end
              in zip(images, rows, response_texts(processor, batch), batch["ended"].tolist())]
    return {f"true_{k}": v for k, v in toy_world.summarize(grades).items() if k != "n"}


@torch.no_grad()
def held_out_answers(roles: Roles, processor, family: str, prompts: list[dict], *, batch_size: int, max_length: int,
                     max_new_tokens: int, temperature: float, top_p: float, compile: bool, dtype: str,
                     seed: int) -> list[dict]:
    """The actor's answers to fixed prompts with their R, C: sampled as in training, from a private RNG seeded with
    `seed`, so that the same policy gives the same answers and the training streams (and exact resume) are not
    disturbed."""
    device = next(roles.actor.parameters()).device
    dtype, pad_id = torch_dtype(dtype, device), get_tokenizer(processor).pad_token_id
    roles.actor.eval()
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            batch = to_device(collate([encode_example(processor, family, p["question"], p["image"], None,
                                                      max_length, source=p.get("source")) for p in chunk],
                                      pad_id, "left"), device)
            with autocast(device, dtype):
                out = generate(roles.actor, processor, family, batch, max_new_tokens, temperature, top_p,
                               compile=compile)
            with autocast(device, dtype):  # R(x, y), C(x, y): the score at the last real token
                rewards = roles.reward_model(out)[1].tolist()
                costs = roles.cost_model(out)[1].tolist() if roles.cost_model is not None else None
            for i, (p, text) in enumerate(zip(chunk, response_texts(processor, out))):
                rows.append({"source": p.get("source"), "category": p["category"], "question": p["question"],
                             "response": text, "ended": bool(out["ended"][i]), "reward": rewards[i],
                             "cost": costs[i] if costs is not None else None,
                             "response_tokens": int(out["response_mask"][i].sum())})
    return rows


def held_out_figures(rows: list[dict], prompts: list[dict], toy_world=None) -> dict:
    """eval/reward, eval/cost, eval/safe_rate (cost <= 0), eval/eos_rate, eval/response_length (and eval/true_*)."""
    mean = lambda values: sum(values) / len(values)
    figures = {"eval/reward": mean([r["reward"] for r in rows]), "eval/eos_rate": mean([r["ended"] for r in rows]),
               "eval/response_length": mean([r["response_tokens"] for r in rows])}
    if rows[0]["cost"] is not None:
        figures.update({"eval/cost": mean([r["cost"] for r in rows]),
                        "eval/safe_rate": mean([float(r["cost"] <= 0) for r in rows])})
    if toy_world is not None:
        grades = [toy_world.grade(open_image(p["image"], p.get("source")), p["question"], r["response"], r["ended"])
                  for r, p in zip(rows, prompts)]
        figures.update({f"eval/true_{k}": v for k, v in toy_world.summarize(grades).items() if k != "n"})
    return figures


def held_out_step(step: int, final: bool, roles: Roles, processor, family: str, prompts: list[dict], args,
                  log: RunLog, toy_world=None) -> None:
    """--eval_steps: log eval/* figures; --sample_steps: append samples to samples.jsonl (and a table in the
    trackers). Every rank computes the same answers (no collective); rank 0 writes."""
    evaluate_now = args.eval_steps and (step % args.eval_steps == 0 or final)
    sample_now = args.sample_steps and step % args.sample_steps == 0
    if not (evaluate_now or sample_now):
        return
    shown = prompts[:args.eval_prompts] if evaluate_now else prompts[:args.sample_prompts]
    rows = held_out_answers(roles, processor, family, shown, batch_size=args.per_device_prompt_batch_size,
                            max_length=args.max_length, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, compile=args.compile, dtype=args.dtype,
                            seed=args.seed)
    if evaluate_now:
        log.metrics({"step": step, **held_out_figures(rows, shown, toy_world)})
    if sample_now and log.rank == 0:
        samples = [{"step": step, **r} for r in rows[:args.sample_prompts]]
        with open(log.output_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        table = ["| source | question | response | reward | cost |", "|---|---|---|---|---|"]
        table += [f"| {s['source']} | {s['question'][:200]} | {s['response'][:300]} | {s['reward']:.3f} | "
                  f"{s['cost'] if s['cost'] is None else round(s['cost'], 3)} |" for s in samples]
        log.text("samples", "\n".join(line.replace("\n", " ") for line in table), step)


def keep_samples_up_to(output_dir, step: int, rank: int = 0) -> None:
    """On resume: drop the samples a killed run wrote after its checkpoint (they are written again); step 0 (a
    fresh run): drop them all. Rank 0 only writes."""
    path = Path(output_dir) / "samples.jsonl"
    if rank == 0 and path.is_file():
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        write_atomic(path, "".join(line + "\n" for line in rows if json.loads(line)["step"] <= step))


def publish(final, trained: dict, roles: Roles, processor, summary: dict, lam: float, cost_window, step: int,
            log: RunLog, skips, stats, args) -> None:
    """Rank 0, at the end: the trained roles linked from the final checkpoint (written once) with model cards, the
    merged actor (--merge_lora), lambda.json and summary.json."""
    for name in trained:
        publish_model(final, name, f"{args.output_dir}/{name}")
        base = {"actor": args.actor_model_name_or_path,
                "reward_critic": args.reward_critic_model_name_or_path or args.reward_model_name_or_path,
                "cost_critic": args.cost_critic_model_name_or_path or args.cost_model_name_or_path}[name]
        write_model_card(f"{args.output_dir}/{name}", name if name != "actor" else args.algo, base, args,
                         summary["final"], [args.train_data])
    if args.merge_lora and args.lora_r:  # the actor with its adapter merged into the base, for any loader
        save_merged(roles.actor, f"{args.output_dir}/actor/merged", processor, f"{args.output_dir}/actor",
                    training_dtype(args.dtype, next(roles.actor.parameters()).device))
    write_json(f"{args.output_dir}/lambda.json", {"lambda": lam, "episode_cost_window": list(cost_window),
                                                 "threshold": args.threshold, "step": step})
    log.summary(summary)
    print(data_report(skips, stats))
    print(f"saved {args.output_dir}: lambda={lam:.4f} J_C={summary['J_C']}")
