"""Stage 0: supervised fine-tuning of the policy on image + question -> response.

The loss is the cross-entropy of the response tokens only (utils.sft_loss); PPO-Lagrangian reuses that same
function as its PTX term. In the toy world this stage produces the initial policy of the RL stage.

    python train_sft.py --model_name_or_path models/tiny/llava --train_data data/toy/sft/train.jsonl \
        --output_dir runs/sft
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import torch
from tqdm.auto import tqdm

from data import check_images, collate, encode_example, eval_source, load_sft
from infra.checkpoint import find_checkpoint, publish_model, resume_state, save_checkpoint, save_merged
from infra.cli import CommonArgs, arg, dry_run, lora_options, model_options, run_script
from infra.optim import (NonFiniteGuard, make_optimizer, optimizer_step, refuse_quantized_training,
                         total_optimizer_steps, trained_dtype, training_dtype)
from infra.parallel import check_fsdp, init_distributed, load_device, mean_over_ranks, no_sync_unless, parallelize
from infra.runlog import RunLog, data_report, quiet_transformers, warn_overlap, write_model_card
from modeling import forward_kwargs, load_policy
from utils import autocast, get_tokenizer, make_loader, seed_everything, sft_loss, to_device


@dataclasses.dataclass
class Args(CommonArgs):
    """Supervised fine-tuning (cross-entropy on response tokens only)."""

    model_name_or_path: str = arg("models/tiny/llava", "policy to fine-tune: hub id or local directory")
    train_data: str = arg("data/toy/sft/train.jsonl", "SFT examples: .jsonl/.json/.parquet with question, response and an optional image path")
    eval_data: str = arg("", "held-out SFT examples for an evaluation loss each epoch ('' = none)")
    output_dir: str = arg("runs/sft", "receives args.json, metrics.jsonl, summary.json and the fine-tuned model")
    per_device_batch_size: int = arg(8, "examples per device per micro-batch")
    lr: float = arg(2e-5, "peak learning rate")
    lr_scheduler: str = arg("cosine", "transformers schedule: cosine, constant_with_warmup, linear, constant")
    warmup_ratio: float = arg(0.03, "share of the optimizer steps spent warming up")
    max_train_examples: int = arg(0, "use only the first N training examples (0 = all)")


def encode_sft(rows, processor, family, max_length, stats):
    return [encode_example(processor, family, r["question"], r["image"], r["response"], max_length, stats,
                           source=r["source"]) for r in rows]


@torch.no_grad()
def evaluate_loss(model, loader, family, device, dtype=torch.float32) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, dtype):
            logits = model(**forward_kwargs(batch, family)).logits
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(sft_loss(logits, batch["labels"])) * n
        tokens += n
    model.train()
    return total / max(tokens, 1)


def main(args: Args) -> dict:
    if args.dry_run:  # the memory plan, from the configs alone
        return dry_run(args, "sft")
    quiet_transformers()
    rank, world_size, device = init_distributed(args.dist_timeout_minutes)
    seed_everything(args.seed, rank)
    checkpoint = find_checkpoint(args.resume_from, args.output_dir)
    log = RunLog(args.output_dir, args, rank, resume=checkpoint)

    # ---- model: fp32 master weights, forward/backward under autocast in the compute dtype
    refuse_quantized_training(args.quantization, args.lora_r)
    dtype = training_dtype(args.dtype, device)
    # (LoRA: a frozen base in --dtype, or quantized, with fp32 adapters; a checkpoint holds the adapter only)
    fsdp = check_fsdp(args)  # --fsdp: loaded on the CPU, then each rank keeps its shard on the GPU
    model, processor, family = load_policy(
        str(checkpoint / "model") if checkpoint else args.model_name_or_path, trained_dtype(args),
        load_device(fsdp, device),
        args.quantization, freeze_vision=args.freeze_vision_tower, gradient_checkpointing=args.gradient_checkpointing,
        lora=None if checkpoint else lora_options(args), trainable_adapter=checkpoint is not None, **model_options(args))
    train_model = parallelize(model, fsdp, device, dtype)  # DDP, FSDP2 (in place: train_model is model) or itself
    pad_id = get_tokenizer(processor).pad_token_id

    # ---- data: examples are encoded on the fly, per batch
    rows, skips = load_sft(args.train_data, args.skip_invalid, args.max_train_examples or None)
    rows = check_images(rows, processor, family, args.skip_invalid, skips)  # what the processor would refuse
    stats = Counter()
    collate_fn = lambda batch_rows: collate(encode_sft(batch_rows, processor, family, args.max_length, stats), pad_id)
    loader = make_loader(rows, args.per_device_batch_size, collate_fn, True, args.seed, rank, world_size)
    eval_loader, eval_overlap = None, 0
    if args.eval_data:
        source, split = eval_source(args.train_data, args.eval_data, None)
        eval_rows, eval_skips = load_sft(source, args.skip_invalid, split=split)
        eval_rows = check_images(eval_rows, processor, family, args.skip_invalid, eval_skips)
        skips.merge(eval_skips, "eval_")
        eval_overlap = warn_overlap(eval_rows, rows, "evaluation", rank)
        eval_loader = make_loader(eval_rows, args.per_device_batch_size, collate_fn, False, args.seed)  # all ranks: all rows
    total_steps = total_optimizer_steps(len(loader), args.gradient_accumulation_steps, args.epochs, args.max_steps)
    optimizer, scheduler = make_optimizer(model, args.lr, (args.adam_beta1, args.adam_beta2), args.weight_decay,
                                          args.lr_scheduler, args.warmup_ratio, total_steps)
    if rank == 0:
        print(f"SFT {family} on {len(rows)} examples ({skips.report()} skipped), {total_steps} optimizer steps")

    # ---- resume: optimizer, scheduler, RNG and data position exactly where they were
    fresh = {"step": 0, "epoch": 0, "samples_in_epoch": 0, "running": [], "record": {}, "eval_loss": None,
             "nonfinite_steps": 0}
    state = resume_state(checkpoint, {"model": (optimizer, scheduler)}, fresh, log, rank, {"model": model})
    step, running, record, eval_loss = state["step"], state["running"], state["record"], state["eval_loss"]
    guard = NonFiniteGuard(args.max_nonfinite_steps, state["nonfinite_steps"], state.get("nonfinite_in_a_row", 0))
    stats.update(state.get("data_stats", {}))  # what encoding did to the data so far (summary.json)

    def checkpoint_now(epoch, samples_in_epoch):
        return save_checkpoint(args.output_dir, step, {"model": model}, {"model": (optimizer, scheduler)},
                        {"epoch": epoch, "samples_in_epoch": samples_in_epoch, "running": running, "record": record,
                         "eval_loss": eval_loss, "nonfinite_steps": guard.total,
                         "nonfinite_in_a_row": guard.consecutive, "data_stats": dict(stats),
                         "seconds": time.time() - start, "metrics_lines": log.lines},
                        processor, args.keep_checkpoints, rank)

    # ---- loop
    start = time.time() - state.get("seconds", 0.0)  # a resumed run's clock goes on
    progress = tqdm(total=total_steps, initial=step, desc="sft", disable=rank != 0)
    model.train()  # from_pretrained returns eval mode: no dropout and, silently, no gradient checkpointing
    for epoch in range(state["epoch"], args.epochs):
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = state["samples_in_epoch"] if epoch == state["epoch"] else 0
        micro_done = loader.sampler.skip // args.per_device_batch_size
        optimizer.zero_grad(set_to_none=True)  # no leftover micro-batch gradients from the previous epoch
        for micro, batch in enumerate(loader, start=micro_done):
            if step >= total_steps:
                break
            batch = to_device(batch, device)
            final_micro = (micro + 1) % args.gradient_accumulation_steps == 0
            with no_sync_unless(final_micro, train_model):  # DDP all-reduces gradients on the last micro-batch only
                with autocast(device, dtype):
                    logits = train_model(**forward_kwargs(batch, family)).logits
                loss = sft_loss(logits, batch["labels"])
                del logits  # its backward needs only cross-entropy's fp32 log-softmax: the logits go before the peak
                (loss / args.gradient_accumulation_steps).backward()
            running.append(loss.item())
            if not final_micro:
                continue
            step += 1  # clip, then step unless the loss or the gradient norm is NaN/inf (skipped, counted, logged)
            grad_norm = optimizer_step({"model": train_model}, {"model": (optimizer, scheduler)}, args.max_grad_norm,
                                       guard, loss, step)["model"]
            progress.update(1)
            if step % args.logging_steps == 0 or step == total_steps:
                record = {"step": step, "epoch": epoch, **mean_over_ranks({"loss": sum(running) / len(running)}),
                          "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                          "nonfinite_steps": guard.total}
                log.metrics(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}")
                running = []
            if args.save_steps and step % args.save_steps == 0:
                checkpoint_now(epoch, (micro + 1) * args.per_device_batch_size)
        if eval_loader is not None:
            eval_loss = evaluate_loss(model, eval_loader, family, device, dtype)
            log.metrics({"step": step, "epoch": epoch, "eval_loss": eval_loss})
        if step >= total_steps:  # --max_steps reached inside this epoch
            break
    progress.close()

    # ---- save
    summary = {"family": family, "train_examples": len(rows), "optimizer_steps": step,
               "final_train_loss": record.get("loss"), "nonfinite_steps": guard.total, "skipped": skips.as_dict(),
               "truncated": dict(stats), "seconds": round(time.time() - start, 1)}
    if eval_loader is not None:
        summary.update(eval_loss=eval_loss, eval_rows_in_training=eval_overlap)
    final = checkpoint_now(args.epochs, 0)  # the end state (refuses non-finite weights): a finished run resumes to nothing
    if rank == 0:
        publish_model(final, "model", args.output_dir)  # the checkpoint's files, linked: the model is written once
        if args.merge_lora and args.lora_r:
            save_merged(model, f"{args.output_dir}/merged", processor, args.output_dir, dtype)
        write_model_card(args.output_dir, "sft", args.model_name_or_path, args, summary, [args.train_data])
        log.summary(summary)
        print(data_report(skips, stats))
        print(f"saved {args.output_dir}: {summary}")
    return summary


if __name__ == "__main__":
    run_script(main, Args)
