"""Baseline: DPO, direct preference optimisation of the policy on one dimension of the preference pairs, helpfulness
or safety (the DPO rows of the paper's Table 4; Ji et al., Safe RLHF-V, NeurIPS 2025). No reward or cost model, no
rollouts: the policy is trained on the pairs themselves.

    L_DPO = -log sigma(beta * [(log pi_theta(y_w|x) - log pi_ref(y_w|x)) - (log pi_theta(y_l|x) - log pi_ref(y_l|x))])
                                                                                  (Rafailov et al. 2023, eq. 7)

log pi(y|x) is the sum of the log-probabilities of the response tokens (prompt, image and pad tokens excluded);
beta * (log pi_theta(y|x) - log pi_ref(y|x)) is DPO's implicit reward. pi_ref is the frozen policy the run starts
from (the SFT model): with --lora_r the same model with its adapter disabled (no second copy), otherwise a second
frozen copy loaded from the same checkpoint. --preference says which response is y_w (chosen): the more helpful one
(the reward model's pairs) or the safer one (the cost model's pairs). The output is a policy checkpoint, loaded by
evaluate.py and modeling.load_policy as train_sft.py's is.

    python train_dpo.py --model_name_or_path runs/sft --train_data data/toy/pairs --preference helpful \
        --output_dir runs/dpo_helpful
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data import PREFERENCES, check_images, eval_source, load_pairs, preference_pair
from infra.checkpoint import find_checkpoint, publish_model, resume_state, save_checkpoint, save_merged
from infra.cli import CommonArgs, arg, dry_run, lora_options, model_options, run_script
from infra.optim import (NonFiniteGuard, make_optimizer, optimizer_step, refuse_quantized_training,
                         total_optimizer_steps, trained_dtype, training_dtype)
from infra.parallel import (check_fsdp, init_distributed, load_device, mean_over_ranks, no_sync_unless, parallelize,
                            shard_model)
from infra.runlog import RunLog, data_report, quiet_transformers, warn_overlap, write_model_card
from lora import refuse_adapter_on_quantized_base
from modeling import forward_kwargs, load_policy, token_log_probs
from score_training import make_collate, pairwise_correct
from utils import autocast, make_loader, seed_everything, to_device

@dataclasses.dataclass
class Args(CommonArgs):
    """DPO on one preference dimension (helpfulness or safety), from the SFT policy, which is also the reference."""

    model_name_or_path: str = arg("runs/sft", "policy to train, and the frozen reference pi_ref: hub id, local "
                                              "directory or LoRA adapter folder (train_sft.py's output)")
    train_data: str = arg("data/toy/pairs", "hub id, local dir with <category>/{train,evaluation}.parquet, or a "
                                            ".jsonl/.json file (BeaverTails-V or PKU-SafeRLHF schema)")
    train_split: str = arg("train", "split of train_data to train on")
    eval_data: str = arg("", "held-out evaluation pairs ('' = the eval_split of train_data); a file is read whole")
    eval_split: str = arg("evaluation", "split evaluated after every epoch (of eval_data if it is a folder or hub id, "
                                        "else of train_data); '' without --eval_data: no held-out evaluation")
    categories: list = arg([], "harm categories to use (empty = all)")
    preference: str = arg("helpful", "which annotation makes the chosen response y_w: helpful = the more helpful "
                                     "one (more_helpful_response_id; PKU-SafeRLHF: better_response_id), as in the "
                                     "reward model's pairs; safe = the safer one (safer_response_id), as in the cost "
                                     "model's pairs, whether or not either response is labelled safe. The other "
                                     "response is y_l (rejected)")
    beta: float = arg(0.1, "DPO beta: the implicit reward is beta * log(pi_theta / pi_ref); a larger beta keeps "
                           "the policy closer to the reference")
    output_dir: str = arg("runs/dpo", "receives args.json, metrics.jsonl, summary.json and the trained policy")
    per_device_batch_size: int = arg(4, "preference pairs per device per micro-batch (2x as many sequences per "
                                        "forward: chosen and rejected)")
    eval_batch_size: int = arg(16, "pairs per evaluation batch")
    # Defaults after align-anything's text_image_to_text/dpo.yaml (PKU-Alignment, the paper's group; the version
    # read): lr 1e-6, cosine, beta (its scale_coeff) 0.1, 2 epochs, gradient checkpointing, vision tower frozen. 1e-6
    # is also the DPO paper's learning rate (Rafailov et al. 2023, appendix B): DPO moves a 7B policy far with few
    # steps, and full fine-tuning recipes stay at or below it. That config takes 4 pairs per device with 8
    # accumulation steps (--gradient_accumulation_steps 8 for its global batch). LoRA adapters usually want
    # ~1e-5..5e-5: pass --lr with --lora_r.
    epochs: int = arg(2, "passes over the training pairs")
    lr: float = arg(1e-6, "peak learning rate (full fine-tuning; raise it for --lora_r)")
    lr_scheduler: str = arg("cosine", "transformers schedule: cosine, constant_with_warmup, linear, constant")
    warmup_ratio: float = arg(0.03, "share of the optimizer steps spent warming up")
    # Two sequences per pair through the whole VLM, with a backward: the memory of a reward-model step, and the
    # paper's reward and cost models train with checkpointing on (as does align-anything's DPO).
    gradient_checkpointing: bool = arg(True, "trade compute for memory in the trained policy")
    max_train_pairs: int = arg(0, "use a seeded random subset of N training pairs, nested across N (0 = all)")


# ---- the math (Rafailov et al. 2023) --------------------------------------------------------------------------


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) = sum over the response tokens y_t of log pi(y_t | x, y_<t), per row, in fp32. logits (B, N, V)
    are those of the N positions that predict labels (B, N) (shifted by one already); labels are -100 outside the
    response (prompt, image and pad tokens: data.collate), which count for nothing."""
    response = labels != -100
    per_token = token_log_probs(logits, labels.masked_fill(~response, 0))  # log-softmax in fp32, in chunks
    return torch.where(response, per_token, 0.0).sum(-1)


def implicit_reward(policy_log_probs: torch.Tensor, reference_log_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward of a response: beta * (log pi_theta(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023,
    section 5)."""
    return beta * (policy_log_probs - reference_log_probs)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss (Rafailov et al. 2023, eq. 7) of a batch of pairs, from sequence log-probs (B,) of the chosen
    response y_w and the rejected one y_l under the policy and the reference:

        -log sigma(beta * [(log pi_theta(y_w) - log pi_ref(y_w)) - (log pi_theta(y_l) - log pi_ref(y_l))])

    averaged over the pairs. Returns (loss, chosen implicit rewards (B,), rejected implicit rewards (B,))."""
    chosen = implicit_reward(policy_chosen, reference_chosen, beta)
    rejected = implicit_reward(policy_rejected, reference_rejected, beta)
    return -F.logsigmoid(chosen - rejected).mean(), chosen, rejected


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """Per pair: the DPO loss, the reward margin (chosen - rejected implicit reward), each implicit reward, and
    whether the chosen reward is the higher one, strictly (a tie counts as wrong: at step 0 every pair is a tie)."""
    margin = chosen_rewards - rejected_rewards
    return {"loss": -F.logsigmoid(margin), "reward_margin": margin, "chosen_reward": chosen_rewards,
            "rejected_reward": rejected_rewards, "accuracy": pairwise_correct(chosen_rewards, rejected_rewards)}


# ---- the pairs and the forwards ---------------------------------------------------------------------------------


def dpo_pair(row: dict, preference: str) -> dict:
    """A pair row -> {first: chosen y_w, second: rejected y_l, ...} for score_training.make_collate, the RM's and
    CM's encoding (rows 0..B-1 of a batch are the chosen responses, B..2B-1 the rejected ones): data.preference_pair
    (helpful: the reward model's pair; safe: the safer response chosen)."""
    pair = preference_pair(row, preference)
    return {**pair, "first": pair["chosen"], "second": pair["rejected"]}


def response_log_probs(model, batch: dict, family: str, dtype=torch.float32) -> torch.Tensor:
    """log pi(y|x) of every row of a collated batch (2B,), fp32, in one forward. The model computes logits only from
    the first position that predicts a response token on (logits_to_keep), not over the image and the prompt."""
    start = int(batch["response_mask"][:, 1:].any(0).nonzero()[0])  # right padding: the earliest response start
    keep = batch["input_ids"].shape[1] - start
    with autocast(batch["input_ids"].device, dtype):
        logits = model(**forward_kwargs(batch, family), use_cache=False, logits_to_keep=keep).logits
    return sequence_log_probs(logits[:, :-1], batch["labels"][:, start + 1:])


@torch.no_grad()
def reference_log_probs(policy, reference, batch: dict, family: str, dtype=torch.float32) -> torch.Tensor:
    """log pi_ref(y|x) of every row (2B,), without autograd: the frozen copy `reference` (in eval mode), or
    (reference None, LoRA) `policy` with its adapter disabled (peft), i.e. the frozen model it started from.
    `policy` is the bare model, not its DDP wrapper (no gradient to reduce). The LoRA reference runs in the policy's
    mode, train mode during training: an 8-bit base computes differently in train and eval mode (bitsandbytes'
    CPU kernel, measured: 0.005 nats per sequence), and in the same mode the first step's log-ratios are exactly
    0. The supported families set no dropout by default (attention_dropout 0.0), so train mode is deterministic; a
    checkpoint whose config sets dropout would make this reference noisy, as it makes the policy."""
    if reference is not None:
        return response_log_probs(reference, batch, family, dtype)
    with policy.disable_adapter():
        return response_log_probs(policy, batch, family, dtype)


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves of a (2B,) tensor laid out as collate_pairs lays out the batch."""
    n = values.shape[0] // 2
    return values[:n], values[n:]


@torch.no_grad()
def evaluate(model, reference, loader, family: str, beta: float, device, dtype=torch.float32) -> dict:
    """Every pair metric (pair_metrics) and the policy's sequence log-probs, overall and per category (means over
    the evaluation pairs)."""
    model.eval()
    values = defaultdict(list)
    per_category = defaultdict(lambda: defaultdict(list))
    for batch in loader:
        batch = to_device(batch, device)
        reference_chosen, reference_rejected = split_pairs(reference_log_probs(model, reference, batch, family, dtype))
        policy_chosen, policy_rejected = split_pairs(response_log_probs(model, batch, family, dtype))
        _, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
        metrics = {**pair_metrics(chosen, rejected), "chosen_log_prob": policy_chosen,
                   "rejected_log_prob": policy_rejected}
        for name, v in metrics.items():
            values[name] += v.tolist()
            for category, x in zip(batch["categories"], v.tolist()):
                per_category[category][name].append(x)
    model.train()
    result = {f"eval/{name}": sum(v) / len(v) for name, v in values.items()}
    result["eval/pairs"] = len(next(iter(values.values()), []))
    result["eval/per_category"] = {c: {n: sum(v) / len(v) for n, v in m.items()} for c, m in per_category.items()}
    return result


def check_args(args: Args) -> None:
    """Bad options: one line each, before any model is loaded."""
    if args.preference not in PREFERENCES:
        raise SystemExit(f"--preference must be helpful or safe, got {args.preference!r}")
    if not args.beta > 0:
        raise SystemExit(f"--beta must be > 0, got {args.beta}")
    refuse_quantized_training(args.quantization, args.lora_r)
    refuse_adapter_on_quantized_base(args.model_name_or_path, "--model_name_or_path", args.lora_r, args.quantization)


# ---- the training loop -------------------------------------------------------------------------------------------


def main(args: Args) -> dict:
    check_args(args)
    if args.dry_run:  # the memory plan, from the configs alone
        return dry_run(args, "dpo")
    quiet_transformers()
    rank, world_size, device = init_distributed(args.dist_timeout_minutes)
    seed_everything(args.seed, rank)
    checkpoint = find_checkpoint(args.resume_from, args.output_dir)
    log = RunLog(args.output_dir, args, rank, resume=checkpoint)

    # ---- models: the policy with fp32 master weights, forward/backward under autocast in the compute dtype
    dtype = training_dtype(args.dtype, device)
    # (LoRA: a frozen base in --dtype, or quantized, with fp32 adapters; a checkpoint holds the adapter only)
    fsdp = check_fsdp(args)  # --fsdp: loaded on the CPU, then each rank keeps its shard on the GPU
    model, processor, family = load_policy(
        str(checkpoint / "model") if checkpoint else args.model_name_or_path, trained_dtype(args),
        load_device(fsdp, device),
        args.quantization, freeze_vision=args.freeze_vision_tower, gradient_checkpointing=args.gradient_checkpointing,
        lora=None if checkpoint else lora_options(args), trainable_adapter=checkpoint is not None, **model_options(args))
    # The reference: with LoRA, the policy itself with its adapter disabled (reference None). Otherwise a frozen
    # copy of the starting checkpoint (also on resume: the reference never moves), stored in the compute dtype as
    # PPO's reference is (autocast rounds the policy's matmul weights to it too), sharded like it under --fsdp.
    reference = None
    if not args.lora_r:
        reference = load_policy(args.model_name_or_path, str(dtype).removeprefix("torch."), load_device(fsdp, device),
                                freeze_vision=True, **model_options(args))[0]
        reference.eval().requires_grad_(False)
        if fsdp:
            reference = shard_model(reference, device, None, frozen=True)
    train_model = parallelize(model, fsdp, device, dtype)  # DDP, FSDP2 (in place: train_model is model) or itself

    # ---- data: pairs as (chosen, rejected), encoded on the fly per batch exactly as the reward model's
    rows, skips = load_pairs(args.train_data, args.train_split, args.categories or None, args.skip_invalid,
                             args.max_train_pairs or None)
    rows = check_images(rows, processor, family, args.skip_invalid, skips)  # what the processor would refuse
    stats = Counter()
    collate_fn = make_collate(processor, family, args.max_length, stats)
    loader = make_loader([dpo_pair(r, args.preference) for r in rows], args.per_device_batch_size, collate_fn, True,
                         args.seed, rank, world_size)
    eval_loader, eval_rows, eval_skips, eval_overlap = None, [], None, 0
    if args.eval_data or args.eval_split:  # held out: --eval_data, else the eval split of train_data
        eval_from, eval_split = eval_source(args.train_data, args.eval_data, args.eval_split)
        eval_rows, eval_skips = load_pairs(eval_from, eval_split, args.categories or None, args.skip_invalid)
        eval_rows = check_images(eval_rows, processor, family, args.skip_invalid, eval_skips)
        eval_overlap = warn_overlap(eval_rows, rows, "evaluation", rank)
        # every rank evaluates the whole split (small), so the figures need no cross-rank gathering
        eval_loader = make_loader([dpo_pair(r, args.preference) for r in eval_rows], args.eval_batch_size,
                                  collate_fn, False, args.seed)
    total_steps = total_optimizer_steps(len(loader), args.gradient_accumulation_steps, args.epochs, args.max_steps)
    optimizer, scheduler = make_optimizer(model, args.lr, (args.adam_beta1, args.adam_beta2), args.weight_decay,
                                          args.lr_scheduler, args.warmup_ratio, total_steps)
    if rank == 0:
        reference_is = "the policy with its LoRA adapter disabled" if args.lora_r else "a frozen copy of the policy"
        print(f"DPO ({args.preference}, beta {args.beta}) of a {family} policy on {len(rows)} train / "
              f"{len(eval_rows)} eval pairs (skipped: {skips.report()}"
              + (f" / {eval_skips.report()}" if eval_skips is not None else "")
              + f"), {total_steps} optimizer steps; reference: {reference_is}")

    # ---- resume: optimizer, scheduler, RNG, data position and running figures, exactly where they were
    fresh = {"step": 0, "epoch": 0, "samples_in_epoch": 0, "running": {}, "record": {}, "eval_result": {},
             "nonfinite_steps": 0}
    state = resume_state(checkpoint, {"model": (optimizer, scheduler)}, fresh, log, rank, {"model": model})
    step, record, eval_result = state["step"], state["record"], state["eval_result"]
    running = defaultdict(list, state["running"])
    guard = NonFiniteGuard(args.max_nonfinite_steps, state["nonfinite_steps"], state.get("nonfinite_in_a_row", 0))
    stats.update(state.get("data_stats", {}))  # what encoding did to the data so far (summary.json)

    def checkpoint_now(epoch, samples_in_epoch):
        return save_checkpoint(args.output_dir, step, {"model": model}, {"model": (optimizer, scheduler)},
                        {"epoch": epoch, "samples_in_epoch": samples_in_epoch, "running": dict(running),
                         "record": record, "eval_result": eval_result, "nonfinite_steps": guard.total,
                         "nonfinite_in_a_row": guard.consecutive, "data_stats": dict(stats),
                         "seconds": time.time() - start, "metrics_lines": log.lines},
                        processor, args.keep_checkpoints, rank)

    # ---- loop
    start = time.time() - state.get("seconds", 0.0)  # a resumed run's clock goes on
    progress = tqdm(total=total_steps, initial=step, desc="dpo", disable=rank != 0)
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
                # the reference's log-probs first, once per batch and without autograd (through the bare model:
                # no gradient for DDP to reduce); then the policy's forward, through DDP / FSDP
                reference_chosen, reference_rejected = split_pairs(
                    reference_log_probs(model, reference, batch, family, dtype))
                policy_chosen, policy_rejected = split_pairs(response_log_probs(train_model, batch, family, dtype))
                loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                                  reference_rejected, args.beta)
                (loss / args.gradient_accumulation_steps).backward()
            running["loss"].append(loss.item())
            for name, v in pair_metrics(chosen.detach(), rejected.detach()).items():
                if name != "loss":
                    running[name].append(v.mean().item())
            running["chosen_log_prob"].append(policy_chosen.detach().mean().item())
            running["rejected_log_prob"].append(policy_rejected.detach().mean().item())
            if not final_micro:
                continue
            step += 1  # clip, then step unless the loss or the gradient norm is NaN/inf (skipped, counted, logged)
            grad_norm = optimizer_step({"model": train_model}, {"model": (optimizer, scheduler)}, args.max_grad_norm,
                                       guard, loss, step)["model"]
            progress.update(1)
            if step % args.logging_steps == 0 or step == total_steps:
                # the means of every rank's micro-batches (each rank saw other pairs, as many as the others)
                means = mean_over_ranks({f"train/{k}": sum(v) / len(v) for k, v in running.items()})
                record = {"step": step, "epoch": epoch, **means, "grad_norm": float(grad_norm),
                          "lr": scheduler.get_last_lr()[0], "nonfinite_steps": guard.total}
                log.metrics(record)
                progress.set_postfix(loss=f"{record['train/loss']:.3f}", acc=f"{record['train/accuracy']:.2f}")
                running = defaultdict(list)
            if args.save_steps and step % args.save_steps == 0:
                checkpoint_now(epoch, (micro + 1) * args.per_device_batch_size)
        if eval_loader is not None:
            eval_result = evaluate(model, reference, eval_loader, family, args.beta, device, dtype)
            log.metrics({"step": step, "epoch": epoch, **eval_result})
            if rank == 0:
                shown = {k: round(v, 4) for k, v in eval_result.items() if isinstance(v, float)}
                progress.write(f"epoch {epoch}: {shown}")
        if step >= total_steps:  # --max_steps reached inside this epoch
            break
    progress.close()

    # ---- save: a policy directory, as train_sft.py writes it (LoRA: the adapter, naming its base)
    summary = {"stage": "dpo", "family": family, "preference": args.preference, "beta": args.beta,
               "train_pairs": len(rows), "eval_pairs": len(eval_rows), "optimizer_steps": step,
               **{k: v for k, v in record.items() if k.startswith("train/")}, **eval_result,
               "nonfinite_steps": guard.total, "skipped_train": skips.as_dict(),
               "skipped_eval": eval_skips.as_dict() if eval_skips is not None else {},
               "eval_pairs_in_training": eval_overlap, "truncated": dict(stats),
               "seconds": round(time.time() - start, 1)}
    final = checkpoint_now(args.epochs, 0)  # the end state (refuses non-finite weights): a finished run resumes to nothing
    if rank == 0:
        publish_model(final, "model", args.output_dir)  # the checkpoint's files, linked: the model is written once
        if args.merge_lora and args.lora_r:
            save_merged(model, f"{args.output_dir}/merged", processor, args.output_dir, dtype)
        write_model_card(args.output_dir, "dpo", args.model_name_or_path, args, summary, [args.train_data])
        log.summary(summary)
        print(data_report(skips, stats))
        print(f"saved {args.output_dir}: last logged train/loss {record.get('train/loss', float('nan')):.4f}, "
              f"train/accuracy {record.get('train/accuracy', float('nan')):.3f}")
    return summary


if __name__ == "__main__":
    run_script(main, Args)
