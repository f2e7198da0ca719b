"""What the two score-model stages (train_rm.py: RM-V, train_cm.py: CM-V) and evaluate.py share: their options, the
Bradley-Terry losses and accuracies (paper section 2), each stage's objective (pair builder, batch loss, per-pair
metrics), the pair collator, the evaluation loop and the training loop.

    L_R = -log sigma(R(y_w) - R(y_l)) + reg * mean(R(y_w)^2 + R(y_l)^2) / 2                          (RM-V)
    L_C = -log sigma(C(y_h) - C(y_s)) - mean log sigma(s_h * C(y_h)) - mean log sigma(s_s * C(y_s))
          + reg * mean(C^2)                                                                          (CM-V)

The score model (modeling.ScoreModel) is the whole VLM with a linear head read at the last non-pad token. Each batch
holds B pairs as 2B responses (the B first ones, then the B second ones): "first" is the chosen response (RM) or the
higher-cost one (CM), "second" the rejected (RM) or the safer one (CM).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data import check_images, collate_pairs, cost_pair, encode_example, eval_source, load_pairs, preference_pair
from infra.checkpoint import find_checkpoint, publish_model, resume_state, save_checkpoint, save_merged
from infra.cli import CommonArgs, arg, dry_run, lora_options, model_options
from infra.optim import (NonFiniteGuard, make_optimizer, optimizer_step, refuse_quantized_training,
                         total_optimizer_steps, trained_dtype, training_dtype)
from infra.parallel import check_fsdp, init_distributed, load_device, mean_over_ranks, no_sync_unless, parallelize
from infra.runlog import RunLog, data_report, warn_overlap, write_model_card
from modeling import ScoreModel
from utils import autocast, get_tokenizer, make_loader, seed_everything, to_device


@dataclasses.dataclass
class ScoreArgs(CommonArgs):
    """The options of both score-model stages, with the reward model's defaults (train_cm.Args overrides output_dir
    and lr_scheduler in place and adds sign_source)."""

    model_name_or_path: str = arg("runs/sft", "policy checkpoint (a new score head is added) or a score-model checkpoint")
    train_data: str = arg("data/toy/pairs", "hub id, local dir with <category>/{train,evaluation}.parquet, or a .jsonl/.json file")
    train_split: str = arg("train", "split of train_data to train on")
    eval_data: str = arg("", "held-out evaluation data ('' = the eval_split of train_data); a file is read whole")
    eval_split: str = arg("evaluation", "split evaluated after every epoch (of eval_data if it is a folder or hub id; "
                                        "of train_data otherwise: a file's `split` field or its sibling "
                                        "<split>.jsonl/.json/.parquet; a plain file has none: pass --eval_data)")
    categories: list = arg([], "harm categories to use (empty = all)")
    output_dir: str = arg("runs/rm", "receives args.json, metrics.jsonl, summary.json and the score model")
    per_device_batch_size: int = arg(4, "preference pairs per device per micro-batch")
    eval_batch_size: int = arg(16, "pairs per evaluation batch")
    lr: float = arg(3e-5, "peak learning rate")
    lr_scheduler: str = arg("constant_with_warmup", "transformers schedule (the paper: constant_with_warmup for RM, cosine for CM)")
    warmup_ratio: float = arg(0.03, "share of the optimizer steps spent warming up")
    regularization: float = arg(0.001, "score regularisation coefficient (reg)")
    # The paper trains its reward and cost models with gradient checkpointing on (REFERENCE section 2).
    gradient_checkpointing: bool = arg(True, "trade compute for memory (the paper's setting for RM and CM)")
    max_train_pairs: int = arg(0, "use a seeded random subset of N training pairs, nested across N (0 = all; for the data-size table)")


# ---- the math (paper section 2) ---------------------------------------------------------------------------


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, regularization: float) -> torch.Tensor:
    """RM-V loss (paper section 2): -log sigma(R(y_w) - R(y_l)) + reg * (R(y_w)^2 + R(y_l)^2) / 2, averaged over
    the batch."""
    pairwise = -F.logsigmoid(chosen - rejected).mean()
    return pairwise + regularization * ((chosen**2 + rejected**2) / 2).mean()


def pairwise_correct(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per pair: 1.0 if first > second strictly (a tie counts as wrong), else 0.0."""
    return (first > second).float()


def pairwise_accuracy(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Share of pairs with first > second, strictly: a tie counts as wrong."""
    return pairwise_correct(first, second).mean()


def cost_loss(higher: torch.Tensor, safer: torch.Tensor, higher_sign: torch.Tensor, safer_sign: torch.Tensor,
              regularization: float) -> torch.Tensor:
    """CM-V loss (paper section 2) on a batch of pairs (higher-cost response y_h, safer response y_s) with safety
    signs s: -log sigma(C(y_h) - C(y_s)) - mean log sigma(s_h * C(y_h)) - mean log sigma(s_s * C(y_s))
    + reg * mean(C^2)."""
    pairwise = -F.logsigmoid(higher - safer).mean()
    sign_term = -F.logsigmoid(higher_sign * higher).mean() - F.logsigmoid(safer_sign * safer).mean()
    return pairwise + sign_term + regularization * ((higher**2 + safer**2) / 2).mean()


def sign_correct(costs: torch.Tensor, is_safe: torch.Tensor) -> torch.Tensor:
    """Per response: does sign(C) agree with the label? C > 0 for unsafe, C < 0 for safe (C = 0 is wrong)."""
    return torch.where(is_safe.bool(), costs < 0, costs > 0).float()


# ---- the objectives: (pair builder, batch loss, per-pair metrics) of each stage ----------------------------


def reward_objective(regularization: float, preference: str = "helpful"):
    """(pair builder, batch loss, per-pair metrics) of the reward model; preference: which annotation makes the
    chosen response (helpful, the paper's RM-V; safe: the single-dimension safety baseline, data.preference_pair)."""

    def to_pair(row):
        p = preference_pair(row, preference)
        return {**p, "first": p["chosen"], "second": p["rejected"]}

    def loss_fn(first, second, batch):
        return reward_loss(first, second, regularization)

    def metrics_fn(first, second, batch):
        return {"accuracy": pairwise_correct(first, second)}

    return to_pair, loss_fn, metrics_fn


def cost_objective(sign_source: str, regularization: float):
    """(pair builder, batch loss, per-pair metrics) of the cost model; sign_source: rate (s = -harmless_rate) or
    binary (s = +-1 from is_safe)."""

    def to_pair(row):
        p = cost_pair(row, sign_source)
        return {**p, "first": p["higher_cost"], "second": p["safer"], "first_sign": p["higher_cost_sign"],
                "second_sign": p["safer_sign"], "first_is_safe": p["higher_cost_is_safe"],
                "second_is_safe": p["safer_is_safe"]}

    def loss_fn(higher, safer, batch):
        return cost_loss(higher, safer, batch["first_sign"], batch["second_sign"], regularization)

    def metrics_fn(higher, safer, batch):
        sign = (sign_correct(higher, batch["first_is_safe"]) + sign_correct(safer, batch["second_is_safe"])) / 2
        return {"accuracy": pairwise_correct(higher, safer), "sign_accuracy": sign}

    return to_pair, loss_fn, metrics_fn


# ---- batches, scores and evaluation ------------------------------------------------------------------------


def make_collate(processor, family, max_length, stats):
    pad_id = get_tokenizer(processor).pad_token_id

    def collate_fn(pairs):
        encode = lambda p, text: encode_example(processor, family, p["question"], p["image"], text, max_length, stats,
                                                source=p.get("source"))
        batch = collate_pairs([encode(p, p["first"]) for p in pairs], [encode(p, p["second"]) for p in pairs], pad_id)
        batch["categories"] = [p["category"] for p in pairs]
        for key in ("first_sign", "second_sign"):
            if key in pairs[0]:
                batch[key] = torch.tensor([p[key] for p in pairs])
        for key in ("first_is_safe", "second_is_safe"):
            if key in pairs[0]:
                batch[key] = torch.tensor([p[key] for p in pairs])
        return batch

    return collate_fn


def split_scores(model, batch, dtype=torch.float32):
    """One forward over the 2B responses; returns (first end scores, second end scores), each (B,), fp32."""
    with autocast(batch["input_ids"].device, dtype):
        _, end_scores = model(batch)
    n = end_scores.shape[0] // 2
    return end_scores[:n], end_scores[n:]


@torch.no_grad()
def evaluate(model, loader, metrics_fn, device, dtype=torch.float32) -> dict:
    """Every metric overall and per category (means over evaluation pairs)."""
    model.eval()
    values = defaultdict(list)
    per_category = defaultdict(lambda: defaultdict(list))
    for batch in loader:
        batch = to_device(batch, device)
        first, second = split_scores(model, batch, dtype)
        for name, v in metrics_fn(first, second, batch).items():
            values[name] += v.tolist()
            for category, x in zip(batch["categories"], v.tolist()):
                per_category[category][name].append(x)
    model.train()
    result = {f"eval/{name}": sum(v) / len(v) for name, v in values.items()}
    result["eval/pairs"] = len(next(iter(values.values()), []))
    result["eval/per_category"] = {c: {n: sum(v) / len(v) for n, v in m.items()} for c, m in per_category.items()}
    return result


# ---- the training loop of both stages ----------------------------------------------------------------------


def train_score_model(args: ScoreArgs, objective, stage: str) -> dict:
    """Train a score model on preference pairs; objective: its (pair builder, loss, metrics), reward_objective's or
    cost_objective's; stage: reward_model or cost_model."""
    if args.dry_run:  # the memory plan, from the configs alone
        return dry_run(args, {"reward_model": "rm", "cost_model": "cm"}[stage])
    rank, world_size, device = init_distributed(args.dist_timeout_minutes)
    seed_everything(args.seed, rank)
    checkpoint = find_checkpoint(args.resume_from, args.output_dir)
    log = RunLog(args.output_dir, args, rank, resume=checkpoint)
    to_pair, loss_fn, metrics_fn = objective

    # ---- model: a policy checkpoint gets a new head; the vision tower stays frozen; fp32 master weights,
    #      forward/backward under autocast in the compute dtype
    refuse_quantized_training(args.quantization, args.lora_r)
    dtype = training_dtype(args.dtype, device)
    # (LoRA: a frozen base in --dtype, or quantized, with fp32 adapters; a checkpoint holds the adapter and head)
    fsdp = check_fsdp(args)  # --fsdp: loaded on the CPU, then each rank keeps its shard on the GPU
    model, processor = ScoreModel.from_pretrained(
        str(checkpoint / "model") if checkpoint else args.model_name_or_path, trained_dtype(args),
        load_device(fsdp, device),
        args.quantization, freeze_vision=args.freeze_vision_tower, gradient_checkpointing=args.gradient_checkpointing,
        lora=None if checkpoint else lora_options(args), trainable_adapter=checkpoint is not None, **model_options(args))
    family = model.family
    train_model = parallelize(model, fsdp, device, dtype)  # DDP, FSDP2 (in place: train_model is model) or itself

    # ---- data
    rows, skips = load_pairs(args.train_data, args.train_split, args.categories or None, args.skip_invalid,
                             args.max_train_pairs or None)
    # held out: --eval_data, else the eval split of train_data (a plain file has none: a one-line error says so)
    eval_from, eval_split = eval_source(args.train_data, args.eval_data, args.eval_split)
    eval_rows, eval_skips = load_pairs(eval_from, eval_split, args.categories or None, args.skip_invalid)
    rows = check_images(rows, processor, family, args.skip_invalid, skips)  # what the processor would refuse
    eval_rows = check_images(eval_rows, processor, family, args.skip_invalid, eval_skips)
    eval_overlap = warn_overlap(eval_rows, rows, "evaluation", rank)
    stats = Counter()
    collate_fn = make_collate(processor, family, args.max_length, stats)
    loader = make_loader([to_pair(r) for r in rows], args.per_device_batch_size, collate_fn, True, args.seed, rank,
                         world_size)
    # every rank evaluates the whole split (small), so the figures need no cross-rank gathering
    eval_loader = make_loader([to_pair(r) for r in eval_rows], args.eval_batch_size, collate_fn, False, args.seed)
    total_steps = total_optimizer_steps(len(loader), args.gradient_accumulation_steps, args.epochs, args.max_steps)
    optimizer, scheduler = make_optimizer(model, args.lr, (args.adam_beta1, args.adam_beta2), args.weight_decay,
                                          args.lr_scheduler, args.warmup_ratio, total_steps)
    if rank == 0:
        print(f"{stage}: {family} score model, {len(rows)} train / {len(eval_rows)} eval pairs "
              f"(skipped: {skips.report()} / {eval_skips.report()}), {total_steps} optimizer steps")

    # ---- resume: optimizer, scheduler, RNG, data position and running figures, exactly where they were
    fresh = {"step": 0, "epoch": 0, "samples_in_epoch": 0, "running": {}, "eval_result": {}, "nonfinite_steps": 0}
    state = resume_state(checkpoint, {"model": (optimizer, scheduler)}, fresh, log, rank, {"model": model})
    step, eval_result = state["step"], state["eval_result"]
    running = defaultdict(list, state["running"])
    guard = NonFiniteGuard(args.max_nonfinite_steps, state["nonfinite_steps"], state.get("nonfinite_in_a_row", 0))
    stats.update(state.get("data_stats", {}))  # what encoding did to the data so far (summary.json)

    def checkpoint_now(epoch, samples_in_epoch):
        return save_checkpoint(args.output_dir, step, {"model": model}, {"model": (optimizer, scheduler)},
                        {"epoch": epoch, "samples_in_epoch": samples_in_epoch, "running": dict(running),
                         "eval_result": eval_result, "nonfinite_steps": guard.total,
                         "nonfinite_in_a_row": guard.consecutive, "data_stats": dict(stats),
                         "seconds": time.time() - start, "metrics_lines": log.lines},
                        processor, args.keep_checkpoints, rank)

    # ---- loop
    start = time.time() - state.get("seconds", 0.0)  # a resumed run's clock goes on
    progress = tqdm(total=total_steps, initial=step, desc=stage, disable=rank != 0)
    model.train()  # the backbone comes from from_pretrained in eval mode: no dropout, no gradient checkpointing
    for epoch in range(state["epoch"], args.epochs):
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = state["samples_in_epoch"] if epoch == state["epoch"] else 0
        micro_done = loader.sampler.skip // args.per_device_batch_size
        optimizer.zero_grad(set_to_none=True)
        for micro, batch in enumerate(loader, start=micro_done):
            if step >= total_steps:
                break
            batch = to_device(batch, device)
            final_micro = (micro + 1) % args.gradient_accumulation_steps == 0
            with no_sync_unless(final_micro, train_model):  # DDP all-reduces gradients on the last micro-batch only
                first, second = split_scores(train_model, batch, dtype)
                loss = loss_fn(first, second, batch)
                (loss / args.gradient_accumulation_steps).backward()
            running["loss"].append(loss.item())
            for name, v in metrics_fn(first.detach(), second.detach(), batch).items():
                running[name].append(v.mean().item())
            running["first_score"].append(first.mean().item())
            running["second_score"].append(second.mean().item())
            if not final_micro:
                continue
            step += 1  # clip, then step unless the loss or the gradient norm is NaN/inf (skipped, counted, logged)
            grad_norm = optimizer_step({"model": train_model}, {"model": (optimizer, scheduler)}, args.max_grad_norm,
                                       guard, loss, step)["model"]
            progress.update(1)
            if step % args.logging_steps == 0 or step == total_steps:
                # the means of every rank's micro-batches (each rank saw other pairs)
                means = mean_over_ranks({f"train/{k}": sum(v) / len(v) for k, v in running.items()})
                record = {"step": step, "epoch": epoch, **means,
                          "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                          "nonfinite_steps": guard.total}
                log.metrics(record)
                progress.set_postfix(loss=f"{record['train/loss']:.3f}")
                running = defaultdict(list)
            if args.save_steps and step % args.save_steps == 0:
                checkpoint_now(epoch, (micro + 1) * args.per_device_batch_size)
        eval_result = evaluate(model, eval_loader, metrics_fn, device, dtype)
        log.metrics({"step": step, "epoch": epoch, **eval_result})
        if rank == 0:
            shown = {k: round(v, 4) for k, v in eval_result.items() if isinstance(v, float)}
            progress.write(f"epoch {epoch}: {shown}")
        if step >= total_steps:  # --max_steps reached inside this epoch
            break
    progress.close()

    # ---- save: a self-describing score-model directory that PPO and evaluate.py load with one call
    summary = {"stage": stage, "family": family, "train_pairs": len(rows), "eval_pairs": len(eval_rows),
               "optimizer_steps": step, **eval_result, "nonfinite_steps": guard.total, "skipped_train": skips.as_dict(),
               "skipped_eval": eval_skips.as_dict(), "eval_pairs_in_training": eval_overlap, "truncated": dict(stats), "seconds": round(time.time() - start, 1)}
    model.score_config["stage"] = stage
    final = checkpoint_now(args.epochs, 0)  # the end state: `--resume_from auto` on a finished run has nothing to do
    if rank == 0:
        publish_model(final, "model", args.output_dir)  # the checkpoint's files, linked: the model is written once
        if args.merge_lora and args.lora_r:
            save_merged(model, f"{args.output_dir}/merged", processor, args.output_dir, dtype)
        write_model_card(args.output_dir, stage, args.model_name_or_path, args, summary, [args.train_data])
        log.summary(summary)
        print(data_report(skips, stats))
        print(f"saved {args.output_dir}")
    return summary
