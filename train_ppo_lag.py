"""Stage 3: PPO-Lagrangian with a reward critic and a cost critic (Safe RLHF-V), and plain PPO as the baseline.

    max_theta min_{lambda >= 0}  J_R(theta) - lambda * (J_C(theta) - d),   J_R = E[R(x, y)], J_C = E[C(x, y)]

Six roles: the actor pi_theta (from the SFT policy), the reference pi_ref (a frozen copy of the initial actor), the
reward model R and the cost model C (frozen), the reward critic V_r (initialised from R, head included) and the cost
critic V_c (initialised from C). `--algo ppo` is the plain RLHF baseline on the same code path: no cost critic,
lambda = 0, so the advantage is the reward advantage alone (a cost model, if given, is only logged).

The file reads top to bottom: arguments; the math (small pure functions, each citing REFERENCE section 3); the
four steps of one iteration, each callable on its own from a notebook:
    rollout(roles, ...)       steps 1-4: sample, score, shape, GAE -> a Rollout of tensors
    lambda_step(...)          step 9, first (as in Safe RLHF): this rollout's costs enter the window, lambda moves
    advantage_step(r, lam)    step 5: the combined advantage with the new lambda
    ppo_update(trained, ...)  steps 6-8: clipped surrogate (+ PTX), clipped value losses, optimizer steps
and main(), which loads the six roles and the data and wires them into the training loop.

    python train_ppo_lag.py --actor_model_name_or_path runs/sft --reward_model_name_or_path runs/rm \
        --cost_model_name_or_path runs/cm --train_data data/toy/pairs --output_dir runs/ppo_lag
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data import check_images, collate, encode_example, eval_source, load_prompts, load_sft, open_image, select_rows
from infra.checkpoint import find_checkpoint, publish_model, resume_state, save_checkpoint, save_merged
from infra.cli import CommonArgs, arg, dry_run, model_options, run_script
from infra.optim import NonFiniteGuard, clip_gradients, make_optimizer, training_dtype
from infra.parallel import (all_gather_cat, average_gradients, broadcast_parameters, check_fsdp, init_distributed,
                            is_sharded, load_device, mean_over_ranks, no_sync_unless, shard_model)
from infra.runlog import RunLog, data_report, quiet_transformers, warn_overlap, write_model_card
from modeling import (SCORE_CONFIG_FILE, SCORE_HEAD_FILE, AdapterBackbone, PolicyView, ScoreModel, SharedBase,
                      adapter_base, forward_kwargs, generate, hidden_size_of, is_adapter, keep_image_path_in_graph,
                      load_policy, lora_options, never_sample_ids, response_texts, unwrap_adapters)
from utils import (autocast, get_tokenizer, make_loader, masked_mean, seed_everything, sft_loss, to_device, torch_dtype,
                   write_atomic, write_json)


@dataclasses.dataclass
class Args(CommonArgs):
    """PPO-Lagrangian (default) or plain PPO for a vision-language (or text) policy. Defaults: the paper's
    LLaVA-1.5-7B settings."""

    algo: str = arg("ppo_lag", "ppo_lag (reward and cost, Lagrange multiplier) or ppo (reward only, lambda = 0)")
    actor_model_name_or_path: str = arg("runs/sft", "initial policy (the SFT model); the reference is a frozen copy")
    reward_model_name_or_path: str = arg("runs/rm", "reward model (score-model directory)")
    cost_model_name_or_path: str = arg("runs/cm", "cost model (score-model directory); with --algo ppo only logged ('' = none)")
    reward_critic_model_name_or_path: str = arg("", "reward critic initialisation ('' = the reward model)")
    cost_critic_model_name_or_path: str = arg("", "cost critic initialisation ('' = the cost model)")
    train_data: str = arg("data/toy/pairs", "prompts: the user turns of a pair dataset (hub id, local dir, .jsonl) or an SFT file")
    train_split: str = arg("train", "split of train_data")
    categories: list = arg([], "harm categories to use (empty = all)")
    ptx_data: str = arg("", "supervised image-text data for the PTX term ('' = no PTX)")
    output_dir: str = arg("runs/ppo_lag", "receives args.json, metrics.jsonl, summary.json, actor/, critics, lambda.json")
    # ---- schedule (epochs and gradient_accumulation_steps are shared options)
    max_steps: int = arg(0, "stop after N PPO steps, each a rollout + update (0 = run all epochs)")
    per_device_prompt_batch_size: int = arg(2, "prompts per device per rollout")
    per_device_train_batch_size: int = arg(2, "rollouts per device per PPO minibatch")
    update_iters: int = arg(1, "PPO epochs over each rollout batch")
    # ---- optimisation (Adam betas, weight decay and clipping are shared options)
    actor_lr: float = arg(5e-7, "actor learning rate")
    actor_lr_scheduler: str = arg("cosine", "actor schedule (transformers name)")
    actor_warmup_ratio: float = arg(0.03, "actor warmup share")
    critic_lr: float = arg(5e-7, "learning rate of both critics")
    critic_lr_scheduler: str = arg("constant", "critic schedule (transformers name)")
    critic_warmup_ratio: float = arg(0.0, "critic warmup share")
    # ---- PPO
    kl_coeff: float = arg(0.02, "beta: per-token KL penalty, in the reward (-beta kl) and in the cost (+beta kl)")
    clip_range_ratio: float = arg(0.2, "epsilon of the clipped surrogate")
    clip_range_score: float = arg(50.0, "end scores clipped to +-this")
    clip_range_value: float = arg(5.0, "epsilon_v of the clipped value loss")
    gamma: float = arg(1.0, "discount")
    gae_lambda: float = arg(0.95, "GAE lambda")
    normalize_advantages: bool = arg(False, "whiten the combined advantage per batch (not in the reference method)")
    ptx_coeff: float = arg(16.0, "gamma_ptx: weight of the SFT loss on --ptx_data")
    # ---- Lagrange multiplier
    threshold: float = arg(-0.5, "d: the cost budget, J_C <= d")
    lambda_init: float = arg(10.0, "initial lambda")
    lambda_max: float = arg(20.0, "upper bound of lambda")
    lambda_lr: float = arg(0.1, "alpha: learning rate of the lambda update")
    lambda_update_delay_steps: int = arg(1, "first PPO step at which lambda may move")
    lambda_update: str = arg("log", "log: ln lambda += alpha*lambda*(J_C - d) (SGD in log space, the paper); additive: "
                                    "lambda = clip(lambda + alpha*(J_C - d), 0, lambda_max); pid: the PID Lagrangian "
                                    "(Stooke et al. 2020) with --lambda_pid_k{p,i,d}")
    lambda_pid_kp: float = arg(1.0, "pid: proportional gain Kp on e = J_C - d (not tuned for BeaverTails-V)")
    lambda_pid_ki: float = arg(0.1, "pid: integral gain Ki (the integral starts at lambda_init / Ki, so that lambda "
                                    "starts at lambda_init)")
    lambda_pid_kd: float = arg(0.0, "pid: derivative gain Kd on the change of e between updates")
    episode_cost_window_size: int = arg(128, "J_C = mean of the last W episode costs (all ranks)")
    # ---- generation
    max_new_tokens: int = arg(512, "maximum response tokens")
    temperature: float = arg(1.0, "sampling temperature T: tokens are drawn from softmax(logits / T), and the old, "
                                  "reference and current log-probs all use the same T (on-policy)")
    top_p: float = arg(1.0, "nucleus sampling; only 1.0 is accepted: a truncated distribution is not the one the "
                            "log-probs describe (off-policy). The checkpoint's generation_config is never applied")
    missing_eos_penalty: float = arg(0.0, "subtract this from the end reward of a response that reached "
                                          "max_new_tokens without EOS (0 = off, the paper; TRL / summarize-from-"
                                          "feedback style); the cost is left alone. truncated_rate is logged")
    old_log_probs: str = arg("auto", "pi_old from: sampling (recorded during generation, no extra forward), forward "
                                     "(a fresh actor forward), auto (sampling in fp32, forward in bf16)")
    rollout_micro_batch_size: int = arg(0, "rows per scoring forward in the rollout (reference, reward, cost, "
                                           "critics; 0 = the whole prompt batch at once)")
    reuse_critic_forward: bool = arg(True, "when a rollout is a single PPO minibatch updated once (update_iters 1, "
                                           "per_device_train_batch_size = per_device_prompt_batch_size: the paper's "
                                           "setting), take the critics' rollout values V_old from the update's own "
                                           "critic forward (same weights, same inputs) instead of a second forward: "
                                           "one forward less per critic and step, same values (a critic with "
                                           "dropout would give its train-mode values; VLM critics have none)")
    compile: bool = arg(False, "generate with a static KV cache and a torch.compile'd decode step: compiled once per "
                               "batch shape (about 1-2 minutes on a CPU), then faster decoding; pays off over long "
                               "runs with repeating shapes (benchmarks/bench_ppo.py)")
    # ---- shared options whose meaning or default differs here
    max_length: int = arg(4096, "maximum prompt tokens (longer questions are truncated from the left)")
    quantization: str = arg("none", "none, 8bit or 4bit for the frozen models (reference, reward, cost)")
    skip_invalid: bool = arg(False, "skip invalid prompt rows (counted by reason)")
    logging_steps: int = arg(1, "log every N PPO steps (one step is a whole rollout: each is worth a line)")
    save_steps: int = arg(100, "write a checkpoint every N PPO steps (0 = only at the end; a PPO step costs many "
                               "SFT/RM steps)")
    toy_grader: bool = arg(False, "also log the toy world's ground truth (true helpfulness, harm, well-formed rate)")
    # ---- held-out prompts: periodic evaluation and samples
    eval_data: str = arg("", "held-out prompts for --eval_steps and --sample_steps ('' = the eval_split of train_data; "
                             "a file is read whole)")
    eval_split: str = arg("evaluation", "split of eval_data")
    eval_prompts: int = arg(64, "held-out prompts evaluated (a fixed seeded subset)")
    eval_steps: int = arg(0, "every N PPO steps and at the end: mean reward, mean cost, safe rate (and the toy's true "
                             "figures with --toy_grader) of the actor's answers to the held-out prompts, logged as "
                             "eval/* (0 = off)")
    sample_steps: int = arg(0, "every N PPO steps: the actor's answers to the first --sample_prompts held-out prompts, "
                               "with their reward and cost, appended to samples.jsonl (0 = off)")
    sample_prompts: int = arg(4, "held-out prompts shown in samples.jsonl")


# ==========================================================================================================
# The math (REFERENCE section 3). Per-action tensors are (B, T) with T = L - 1: column t holds the action
# (token) t + 1, whose log-prob comes from the logits at position t and whose value V(s_t) is the critic's score
# at position t. `mask` marks real response tokens (EOS included, padding never).
# ==========================================================================================================


def shape_rewards(end_scores: torch.Tensor, log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
                  mask: torch.Tensor, kl_coeff: float, clip_range_score: float, kl_sign: float) -> torch.Tensor:
    """Per-token shaped reward (kl_sign = -1) or cost (kl_sign = +1), step 3:
        r_t = clip(-beta * kl_t + [t = T] * r_end, +-clip_range_score),
        c_t = clip(+beta * kl_t + [t = T] * c_end, +-clip_range_score),
    the per-token total clipped, as in the text Safe RLHF code; the k1 estimate kl_t = log pi(a_t) - log pi_ref(a_t)
    and T the LAST REAL response token (**FIX**: the released code put the end score on the last padded column).
    Zero outside the mask."""
    shaped = (kl_sign * kl_coeff * (log_probs - ref_log_probs)).masked_fill(~mask.bool(), 0)  # NaN-safe padding
    mask = mask.to(log_probs.dtype)
    end = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    shaped = shaped.scatter_add(1, end.unsqueeze(1), end_scores.to(shaped.dtype).unsqueeze(1))
    return shaped.clamp(-clip_range_score, clip_range_score)


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, step 4:
        delta_t = r_t + gamma * V(t+1) - V(t),   A_t = delta_t + gamma * lambda_GAE * A_{t+1},   V(T+1) = 0,
    returns G_t = A_t + V(t). Positions outside the (contiguous) response mask get A = G = 0."""
    values = values.masked_fill(~mask.bool(), 0)  # whatever the critic says on padding never enters
    rewards = rewards.masked_fill(~mask.bool(), 0)
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    # columns before the first response token (the prompt: 600+ for LLaVA) stay 0 whatever the loop does: skip them
    active = mask.any(0).nonzero()
    first = int(active[0]) if active.numel() else values.shape[1]
    for t in reversed(range(first, values.shape[1])):
        next_mask = mask[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * gae_lambda * next_mask * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def combined_advantage(reward_advantages: torch.Tensor, cost_advantages: torch.Tensor, lam: float) -> torch.Tensor:
    """Step 5: A_t = (A^r_t - lambda * A^c_t) / (1 + lambda), lambda a constant. Because the KL enters r with -beta
    and c with +beta, the KL part of A is -beta * kl whatever lambda is."""
    return (reward_advantages - lam * cost_advantages) / (1.0 + lam)


def actor_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               clip_range_ratio: float) -> torch.Tensor:
    """Step 6, clipped surrogate: rho = exp(log pi - log pi_old),
        L = -mean_masked min(rho * A, clip(rho, 1 - eps, 1 + eps) * A),
    mean over each sequence's real tokens, then over the batch."""
    ratio = torch.exp(log_probs - old_log_probs)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_range_ratio, 1 + clip_range_ratio) * advantages)
    return -masked_mean(surrogate, mask, dim=-1).mean()


def critic_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                clip_range_value: float) -> torch.Tensor:
    """Step 7, clipped value loss: V_clip = clip(V, V_old - eps_v, V_old + eps_v),
        L_V = 0.5 * mean_masked max((V - G)^2, (V_clip - G)^2)."""
    values_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    loss = torch.max((values - returns) ** 2, (values_clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask, dim=-1).mean()


def update_lambda(lam: float, episode_cost: float, threshold: float, lr: float, lambda_max: float,
                  mode: str = "log") -> float:
    """Step 9, the dual step on J_C - d (J_C = the windowed mean episode cost).
    log:      ln lambda <- min(ln lambda + lr * lambda * (J_C - d), ln lambda_max): SGD with lr on the loss
              -(J_C - d) * exp(ln lambda); lambda stays > 0 by construction and moves in proportion to itself.
    additive: lambda <- clip(lambda + lr * (J_C - d), 0, lambda_max), the textbook projected form."""
    if mode == "log":
        if lam <= 0:
            raise ValueError(f"the log-space lambda update needs lambda > 0, got {lam} (use --lambda_update additive "
                             "or pid to start from 0)")
        log_lam = math.log(lam) + lr * lam * (episode_cost - threshold)
        # cap in log space (no overflow), then again after exp: exp(log(x)) can exceed x by one ulp
        return min(math.exp(min(log_lam, math.log(lambda_max))), lambda_max)
    if mode == "additive":
        return min(max(lam + lr * (episode_cost - threshold), 0.0), lambda_max)
    raise ValueError(f"--lambda_update must be log or additive, got {mode!r}")


def pid_lambda(error: float, integral: float, previous_error: float | None, kp: float, ki: float, kd: float,
               lambda_max: float) -> tuple[float, float]:
    """Step 9 as a PID controller (Stooke, Achiam & Abbeel 2020, "Responsive Safety in RL by PID Lagrangian
    Methods") on the violation e = J_C - d:
        I <- max(0, I + e),   lambda = clip(Kp * e + Ki * I + Kd * (e - e_prev), 0, lambda_max)
    (no derivative term at the first update). The proportional and derivative terms react to the violation now,
    so lambda does not keep rising long after the budget is met (the overshoot of the integral-only forms).
    Returns (lambda, the new integral I)."""
    integral = max(0.0, integral + error)
    derivative = error - previous_error if previous_error is not None else 0.0
    return min(max(kp * error + ki * integral + kd * derivative, 0.0), lambda_max), integral


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                    never_sampled: list[int] | tuple = (), chunk_size: int = 64,
                    with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(tokens) under the sampling distribution of modeling.generate: softmax(logits / temperature) with the
    never-sampled ids (image placeholders, pad) removed. logits (B, N, V) are those of the N positions that predict
    tokens (B, N). Used for pi_old, pi_ref and pi_theta alike, so the PPO ratio and the KL compare the distribution
    the tokens were actually drawn from (REFERENCE section 3.1-3.3).

    Memory: the fp32 log-softmax is computed `chunk_size` positions at a time; with autograd on, each chunk is
    recomputed in the backward (activation checkpointing) instead of being kept, so beyond the logits themselves
    one chunk of (B, chunk, V) fp32 is alive, not (B, N, V). with_entropy: also the per-token entropy (B, N) of
    the same distribution, computed without autograd (a diagnostic; it never enters a loss)."""
    from torch.utils.checkpoint import checkpoint

    suppress = torch.tensor(sorted(never_sampled), dtype=torch.long, device=logits.device)

    def log_softmax(chunk: torch.Tensor) -> torch.Tensor:
        scaled = chunk.float() / temperature
        if suppress.numel():
            scaled = scaled.index_fill(-1, suppress, float("-inf"))
        return torch.log_softmax(scaled, dim=-1)

    def chunk_log_probs(chunk: torch.Tensor, chunk_tokens: torch.Tensor) -> torch.Tensor:
        return log_softmax(chunk).gather(-1, chunk_tokens.unsqueeze(-1)).squeeze(-1)

    pieces, entropies = [], []
    for lo in range(0, logits.shape[1], chunk_size):
        chunk, chunk_tokens = logits[:, lo:lo + chunk_size], tokens[:, lo:lo + chunk_size]
        if torch.is_grad_enabled() and chunk.requires_grad:
            pieces.append(checkpoint(chunk_log_probs, chunk, chunk_tokens, use_reentrant=False))
        else:
            pieces.append(chunk_log_probs(chunk, chunk_tokens))
        if with_entropy:
            with torch.no_grad():
                log_p = log_softmax(chunk.detach())
                entropies.append(-torch.where(log_p.isfinite(), log_p.exp() * log_p, 0.0).sum(-1))
    log_probs = torch.cat(pieces, 1)
    return (log_probs, torch.cat(entropies, 1)) if with_entropy else log_probs


# ==========================================================================================================
# Forwards shared by rollout and update
# ==========================================================================================================


# Each runs its model under autocast in the compute dtype; log-softmax, scores and values come out in fp32.


def response_start(batch: dict) -> int:
    """The first action column holding a response token. Rollout prompts are left-padded to one length P, so every
    response starts at input position P, i.e. action column P - 1; columns before it are prompt."""
    return int(batch["response_mask"][:, 1:].any(0).nonzero()[0])


def policy_log_probs(model, batch, family, dtype=torch.float32, temperature: float = 1.0,
                     never_sampled: list[int] | tuple = (), with_entropy: bool = False):
    """log pi(a_t) for every action column (B, L-1), 0 outside the response [, mean entropy over the response].

    Lean: the model computes logits only for the positions that predict response tokens (logits_to_keep), not for
    the image tokens and the prompt (576+ positions for LLaVA-1.5), and token_log_probs takes the log-softmax in
    chunks; the entropy is computed without autograd."""
    start = response_start(batch)
    keep = batch["input_ids"].shape[1] - start  # positions start .. L-1; the last one predicts nothing
    with autocast(batch["input_ids"].device, dtype):
        logits = model(**forward_kwargs(batch, family), use_cache=False, logits_to_keep=keep).logits
    out = token_log_probs(logits[:, :-1], batch["input_ids"][:, start + 1:], temperature, never_sampled,
                          with_entropy=with_entropy)
    log_probs, entropy = out if with_entropy else (out, None)
    # 0 outside the response: after EOS the tokens are pad, which the sampling distribution excludes (log-prob -inf)
    log_probs = torch.cat([log_probs.new_zeros(log_probs.shape[0], start), log_probs], 1)
    log_probs = log_probs.masked_fill(~batch["response_mask"][:, 1:], 0.0)
    if with_entropy:
        return log_probs, masked_mean(entropy, batch["response_mask"][:, start + 1:])
    return log_probs


def critic_values(critic, batch, dtype=torch.float32):
    """V(s_t) per action column: the critic's score at position t predicts the return of action t + 1."""
    with autocast(batch["input_ids"].device, dtype):
        scores, _ = critic(batch)
    return scores[:, :-1]


def end_score(score_model, batch, dtype=torch.float32):
    """R(x, y) or C(x, y): the score at the last real token of prompt + response."""
    with autocast(batch["input_ids"].device, dtype):
        return score_model(batch)[1]


def slice_batch(batch: dict, index: torch.Tensor) -> dict:
    """Rows `index` of a rollout batch with exactly their image tensors (data.select_rows: the image tensors hold
    one entry per image, not per row, and a batch may mix rows with and without an image)."""
    return select_rows(batch, index.tolist())


# ==========================================================================================================
# One iteration: rollout (steps 1-5), ppo_update (steps 6-8), lambda_step (step 9)
# ==========================================================================================================


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


@dataclasses.dataclass
class Rollout:
    """What steps 1-5 produce for one prompt batch. Per-action tensors are (B, T), T = L - 1; the cost fields are
    None without a cost critic (end_costs is set whenever a cost model is given)."""

    batch: dict  # prompt + response: input_ids, attention_mask, response_mask, image tensors, ended (EOS emitted)
    mask: torch.Tensor  # real response actions, EOS included
    old_log_probs: torch.Tensor
    ref_log_probs: torch.Tensor
    end_rewards: torch.Tensor  # R(x, y), (B,)
    rewards: torch.Tensor  # the per-token rewards of step 3 (KL-shaped, end reward on the last token)
    end_costs: torch.Tensor | None = None  # C(x, y), (B,)
    costs: torch.Tensor | None = None  # the per-token costs of step 3
    # step 4 (value_step): in the rollout, or in the update's first critic forward (--reuse_critic_forward)
    old_reward_values: torch.Tensor | None = None
    reward_advantages: torch.Tensor | None = None
    reward_returns: torch.Tensor | None = None
    old_cost_values: torch.Tensor | None = None
    cost_advantages: torch.Tensor | None = None
    cost_returns: torch.Tensor | None = None
    advantages: torch.Tensor | None = None  # the combined advantage of step 5, set by advantage_step
    lam: float | None = None  # the lambda of step 5, kept by advantage_step while step 4 is still to come
    never_sampled: list = dataclasses.field(default_factory=list)  # token ids the sampling distribution excludes


def old_log_probs_source(args: Args, dtype: torch.dtype) -> str:
    """Where pi_old comes from (--old_log_probs): "sampling" (recorded while generating, no extra forward) or
    "forward" (a fresh actor forward over the rollout). auto: sampling when computing in fp32, where both agree to
    ~1e-6; a fresh forward in bf16, where the cached one-token-at-a-time decode and the full forward round
    differently, so that the first minibatch's ratio is exactly 1 there."""
    if args.old_log_probs != "auto":
        return args.old_log_probs
    return "sampling" if dtype == torch.float32 else "forward"


def score_in_micro_batches(batch: dict, size: int, forward) -> torch.Tensor:
    """forward(rows of batch) for consecutive slices of `size` rows (0 = all at once), concatenated: the rollout's
    scoring forwards hold the activations of one micro-batch at a time."""
    n = batch["input_ids"].shape[0]
    if not size or size >= n:
        return forward(batch)
    device = batch["input_ids"].device
    return torch.cat([forward(slice_batch(batch, torch.arange(lo, min(lo + size, n), device=device)))
                      for lo in range(0, n, size)])


@torch.no_grad()
def rollout(roles: Roles, processor, family: str, prompt_batch: dict, args: Args) -> Rollout:
    """Steps 1-4 for a left-padded prompt batch (on the models' device); step 5 (advantage_step) comes after the
    lambda update, which needs this rollout's episode costs."""
    dtype = torch_dtype(args.dtype, prompt_batch["input_ids"].device)  # the compute dtype
    for model in roles.trained().values():
        model.eval()
    never_sampled = never_sample_ids(processor)
    # 1. Rollout: sample responses for left-padded prompts from softmax(logits / T) without placeholders and pad;
    #    everything after the first EOS is padding, `response_mask` marks the real response tokens.
    with autocast(prompt_batch["input_ids"].device, dtype):
        batch = generate(roles.actor, processor, family, prompt_batch, args.max_new_tokens, args.temperature,
                         args.top_p, compile=args.compile)
    mask = batch["response_mask"][:, 1:]
    sampling_log_probs = batch.pop("sampling_log_probs")
    # 2. Score with the same image inputs everywhere, --rollout_micro_batch_size rows at a time: old log-probs (those
    #    of the sampling pass, or a fresh forward: --old_log_probs), reference log-probs (same temperature and
    #    suppressed tokens), end reward and cost, both critics' values.
    micro = lambda forward: score_in_micro_batches(batch, args.rollout_micro_batch_size, forward)
    log_probs_of = lambda model: micro(lambda b: policy_log_probs(model, b, family, dtype, args.temperature,
                                                                  never_sampled))
    if old_log_probs_source(args, dtype) == "sampling":
        old_log_probs = sampling_log_probs.masked_fill(~mask, 0.0)
    else:
        old_log_probs = log_probs_of(roles.actor)
    ref_log_probs = log_probs_of(roles.reference)
    end_rewards = micro(lambda b: end_score(roles.reward_model, b, dtype))
    end_costs = micro(lambda b: end_score(roles.cost_model, b, dtype)) if roles.cost_model is not None else None
    # 3. Shape per token with the KL penalty, end scores on the last real token; --missing_eos_penalty lowers the
    #    end reward of a response cut at max_new_tokens (unfinished is unhelpful; it is not more harmful, so the cost
    #    is left alone: a cost penalty would also be scaled by lambda and blur the budget on harm).
    penalised_rewards = end_rewards - args.missing_eos_penalty * (~batch["ended"]).float()
    rewards = shape_rewards(penalised_rewards, old_log_probs, ref_log_probs, mask, args.kl_coeff, args.clip_range_score,
                            kl_sign=-1.0)
    costs = None
    if roles.cost_critic is not None:
        costs = shape_rewards(end_costs, old_log_probs, ref_log_probs, mask, args.kl_coeff, args.clip_range_score,
                              kl_sign=+1.0)
    r = Rollout(batch, mask, old_log_probs, ref_log_probs, end_rewards, rewards, end_costs, costs,
                never_sampled=never_sampled)
    # 4. The critics' values V_old and GAE for the reward and the cost: here, or (--reuse_critic_forward, one
    #    minibatch) from the update's own critic forward, which sees the same weights and inputs.
    if not critic_values_in_update(args, mask.shape[0]):
        value_step(r, "reward", micro(lambda b: critic_values(roles.reward_critic, b, dtype)), args)
        if costs is not None:
            value_step(r, "cost", micro(lambda b: critic_values(roles.cost_critic, b, dtype)), args)
    return r


def critic_values_in_update(args: Args, rollouts: int) -> bool:
    """--reuse_critic_forward applies to a batch of `rollouts`: it is one minibatch, updated once, so the update's
    first critic forward is the rollout's critic forward (same weights, same rows)."""
    return args.reuse_critic_forward and args.update_iters == 1 and rollouts <= args.per_device_train_batch_size


@torch.no_grad()
def value_step(r: Rollout, kind: str, values: torch.Tensor, args: Args) -> Rollout:
    """Step 4 for kind "reward" or "cost": that critic's values V_old (B, T) and GAE of the shaped rewards (costs)
    with them. Sets r.old_<kind>_values, r.<kind>_advantages, r.<kind>_returns and returns r."""
    shaped = r.rewards if kind == "reward" else r.costs
    old_values = values.detach()
    advantages, returns = gae_advantages(shaped, old_values, r.mask, args.gamma, args.gae_lambda)
    setattr(r, f"old_{kind}_values", old_values)
    setattr(r, f"{kind}_advantages", advantages)
    setattr(r, f"{kind}_returns", returns)
    return r


@torch.no_grad()
def advantage_step(r: Rollout, lam: float, args: Args) -> Rollout:
    """Step 5: the combined advantage with lambda (the one just updated) held constant during the update; plain
    PPO: lambda = 0 and no cost advantage. Sets r.advantages and returns r. If step 4 is still to come (the update
    computes the critics' values: --reuse_critic_forward), lambda is kept and ppo_update calls this again."""
    if r.reward_advantages is None:
        r.lam = lam
        return r
    cost_advantages = r.cost_advantages if r.cost_advantages is not None else torch.zeros_like(r.reward_advantages)
    advantages = combined_advantage(r.reward_advantages, cost_advantages, lam)
    if args.normalize_advantages:
        mean = masked_mean(advantages, r.mask)
        var = masked_mean((advantages - mean) ** 2, r.mask)
        advantages = (advantages - mean) * torch.rsqrt(var + 1e-8) * r.mask
    r.advantages = advantages
    return r


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


def minibatches_per_rollout(args: Args) -> int:
    """PPO minibatches of one rollout (all update_iters passes). Gradient accumulation must divide it exactly, so that
    every PPO step ends on an optimizer step and no gradient leaks into the next rollout."""
    minibatches = args.update_iters * math.ceil(args.per_device_prompt_batch_size / args.per_device_train_batch_size)
    if minibatches % args.gradient_accumulation_steps:
        raise SystemExit(
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps} does not divide the "
            f"{minibatches} minibatches of a PPO step (update_iters {args.update_iters} x ceil(prompt batch "
            f"{args.per_device_prompt_batch_size} / train batch {args.per_device_train_batch_size})): choose a divisor")
    return minibatches


def ppo_update(trained: dict, optimizers: dict, r: Rollout, family: str, args: Args,
               guard: NonFiniteGuard | None = None, step: int = 0, ptx: PtxStream | None = None) -> dict:
    """Steps 6-8 on one rollout: `update_iters` passes over shuffled minibatches of `per_device_train_batch_size`
    rollouts; an optimizer step of every trained model each `gradient_accumulation_steps` minibatches (which must
    divide the minibatches of a step: minibatches_per_rollout). trained: Roles.trained() (DDP-wrapped under
    torchrun); optimizers: name -> (optimizer, scheduler). Returns every logged loss figure as a list over
    minibatches (the grad norms: over optimizer steps)."""
    minibatches_per_rollout(args)
    guard = guard or NonFiniteGuard(max_consecutive=0)
    device, dtype = r.batch["input_ids"].device, torch_dtype(args.dtype, r.batch["input_ids"].device)
    for model in trained.values():
        model.train()
    n = r.batch["input_ids"].shape[0]
    losses = collections.defaultdict(list)
    micro = 0
    for _ in range(args.update_iters):
        order = torch.randperm(n)
        for lo in range(0, n, args.per_device_train_batch_size):
            index = order[lo:lo + args.per_device_train_batch_size].to(device)
            mb, mb_mask = slice_batch(r.batch, index), r.mask[index]
            micro += 1
            final_micro = micro % args.gradient_accumulation_steps == 0
            with no_sync_unless(final_micro, *trained.values()):  # DDP all-reduces on the last micro-batch only
                # Each role's loss is backpropagated right after its forward, so only one role's graph is alive at
                # a time (the three models share no parameter: the gradients are those of one summed backward).
                critics_first = r.reward_advantages is None  # --reuse_critic_forward: steps 4 and 7, then 5
                if critics_first:
                    critic_losses = update_critics(trained, r, index, mb, mb_mask, dtype, args)
                    advantage_step(r, r.lam, args)
                # 6. Clipped surrogate of the actor (+ gamma_ptx * the SFT loss on a PTX batch).
                log_probs, entropy = policy_log_probs(trained["actor"], mb, family, dtype, args.temperature,
                                                      r.never_sampled, with_entropy=True)
                loss_actor = actor_loss(log_probs, r.old_log_probs[index], r.advantages[index], mb_mask,
                                        args.clip_range_ratio)
                total_actor = loss_actor
                if ptx is not None:
                    ptx_batch = to_device(next(ptx), device)
                    with autocast(device, dtype):
                        ptx_logits = trained["actor"](**forward_kwargs(ptx_batch, family), use_cache=False).logits
                    loss_ptx = sft_loss(ptx_logits, ptx_batch["labels"])
                    total_actor = total_actor + args.ptx_coeff * loss_ptx
                    losses["ptx_loss"].append(loss_ptx.item())
                (total_actor / args.gradient_accumulation_steps).backward()
                log_probs = log_probs.detach()
                # 7. Clipped value losses of both critics, one after the other.
                if not critics_first:
                    critic_losses = update_critics(trained, r, index, mb, mb_mask, dtype, args)
                total = total_actor.detach() + sum(critic_losses.values())
                for name, loss in critic_losses.items():
                    losses[f"{name}_loss"].append(loss.item())
            with torch.no_grad():
                log_ratio = (log_probs - r.old_log_probs[index]).float()
                losses["approx_kl"].append(masked_mean((log_ratio.exp() - 1) - log_ratio, mb_mask).item())
                clipped = (log_ratio.exp() - 1).abs() > args.clip_range_ratio
                losses["clip_fraction"].append(masked_mean(clipped.float(), mb_mask).item())
            losses["actor_loss"].append(loss_actor.item())
            losses["entropy"].append(entropy.item())
            if final_micro:
                # 8. Clip, and step every trained model; a NaN/inf loss or gradient (on any rank) skips this update
                #    of all of them, counted and logged.
                for model in trained.values():  # a model outside DDP and FSDP (a LoRA role) averages its gradients
                    if not isinstance(model, torch.nn.parallel.DistributedDataParallel) and not is_sharded(model):
                        average_gradients(model)
                norms = {name: clip_gradients(model, args.max_grad_norm) for name, model in trained.items()}
                finite = guard.finite(total, *norms.values(), step=step + 1)
                for name, (optimizer, scheduler) in optimizers.items():
                    losses[f"{name}_grad_norm"].append(float(norms[name]))
                    if finite:
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
    return losses


def update_critics(trained: dict, r: Rollout, index: torch.Tensor, mb: dict, mb_mask: torch.Tensor,
                   dtype: torch.dtype, args: Args) -> dict:
    """Step 7 on minibatch `index` (rows mb): each critic's clipped value loss, backpropagated right after its
    forward. Returns name -> the detached loss. A critic whose V_old the rollout left out (--reuse_critic_forward:
    this minibatch is the whole rollout, first and only pass) gets them from this forward first: step 4 on its
    detached values, so that the loss starts, as after a separate forward, from V = V_old."""
    losses = {}
    for name, kind in (("reward_critic", "reward"), ("cost_critic", "cost")):
        if name not in trained:
            continue
        values = critic_values(trained[name], mb, dtype)
        if getattr(r, f"old_{kind}_values") is None:
            assert len(index) == r.mask.shape[0], "the critics' values come from the update only for one minibatch"
            rollout_order = torch.empty_like(values.detach())
            rollout_order[index] = values.detach()
            value_step(r, kind, rollout_order, args)
        loss = critic_loss(values, getattr(r, f"old_{kind}_values")[index], getattr(r, f"{kind}_returns")[index],
                           mb_mask, args.clip_range_value)
        (loss / args.gradient_accumulation_steps).backward()
        losses[name] = loss.detach()
    return losses


def make_optimizers(trained: dict, args: Args, updates: int) -> dict:
    """name -> (AdamW, schedule) of each trained role (Roles.trained()): the actor's learning rate, schedule and
    warmup, or the critics', over `updates` optimizer steps."""
    betas = (args.adam_beta1, args.adam_beta2)
    return {name: make_optimizer(model, args.actor_lr if name == "actor" else args.critic_lr, betas, args.weight_decay,
                                 args.actor_lr_scheduler if name == "actor" else args.critic_lr_scheduler,
                                 args.actor_warmup_ratio if name == "actor" else args.critic_warmup_ratio, updates)
            for name, model in trained.items()}


def new_pid_state(args: Args) -> dict:
    """The PID controller's memory, chosen so that lambda starts at lambda_init: I = lambda_init / Ki."""
    return {"integral": args.lambda_init / args.lambda_pid_ki if args.lambda_pid_ki else 0.0, "previous_error": None}


@torch.no_grad()
def lambda_step(lam: float, cost_window: collections.deque, episode_costs: torch.Tensor | None, step: int,
                args: Args, pid_state: dict | None = None) -> tuple[float, float]:
    """Step 9, at the start of PPO step `step` (1-based), as in Safe RLHF: this rollout's episode costs C(x, y) (of
    every rank) enter the moving window first, J_C = the window's mean, then (PPO-Lag, from step
    `lambda_update_delay_steps` on) the dual step on J_C - d; the step's advantages are then combined with the new
    lambda. Returns (lambda, J_C); the window (and, for --lambda_update pid, pid_state from new_pid_state) are
    updated in place, identical on every rank."""
    if episode_costs is not None:
        cost_window.extend(all_gather_cat(episode_costs.float()).tolist())
    window_cost = sum(cost_window) / len(cost_window) if cost_window else float("nan")
    if args.algo == "ppo_lag" and step >= args.lambda_update_delay_steps:
        if args.lambda_update == "pid":
            error = window_cost - args.threshold
            lam, pid_state["integral"] = pid_lambda(error, pid_state["integral"], pid_state["previous_error"],
                                                    args.lambda_pid_kp, args.lambda_pid_ki, args.lambda_pid_kd,
                                                    args.lambda_max)
            pid_state["previous_error"] = error
        else:
            lam = update_lambda(lam, window_cost, args.threshold, args.lambda_lr, args.lambda_max, args.lambda_update)
    return lam, window_cost


def step_figures(r: Rollout, losses: dict) -> dict:
    """The logged figures of one PPO step, each averaged over ranks."""
    kl_per_sequence = ((r.old_log_probs - r.ref_log_probs) * r.mask).sum(-1)
    figures = {
        "reward": r.end_rewards.float().mean(), "kl": kl_per_sequence.mean(), "response_length": r.mask.sum(-1).float().mean(),
        "eos_rate": r.batch["ended"].float().mean(), "truncated_rate": 1.0 - r.batch["ended"].float().mean(),
        "reward_advantage": masked_mean(r.reward_advantages, r.mask),
        "advantage": masked_mean(r.advantages, r.mask), "reward_value": masked_mean(r.old_reward_values, r.mask),
    }
    if r.end_costs is not None:
        figures["cost"] = r.end_costs.float().mean()
    if r.old_cost_values is not None:
        figures["cost_value"] = masked_mean(r.old_cost_values, r.mask)
    figures.update({k: sum(v) / len(v) for k, v in losses.items()})
    return mean_over_ranks(figures)


# ==========================================================================================================
# Held-out prompts: periodic evaluation and samples (they never touch the training RNG streams)
# ==========================================================================================================


@torch.no_grad()
def held_out_answers(roles: Roles, processor, family: str, prompts: list[dict], args: Args) -> list[dict]:
    """The actor's answers to fixed prompts with their R, C: sampled as in training, from a private RNG seeded with
    --seed, so that the same policy gives the same answers and the training streams (and exact resume) are not
    disturbed."""
    device = next(roles.actor.parameters()).device
    dtype, pad_id = torch_dtype(args.dtype, device), get_tokenizer(processor).pad_token_id
    roles.actor.eval()
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        for start in range(0, len(prompts), args.per_device_prompt_batch_size):
            chunk = prompts[start:start + args.per_device_prompt_batch_size]
            batch = to_device(collate([encode_example(processor, family, p["question"], p["image"], None,
                                                      args.max_length, source=p.get("source")) for p in chunk],
                                      pad_id, "left"), device)
            with autocast(device, dtype):
                out = generate(roles.actor, processor, family, batch, args.max_new_tokens, args.temperature,
                               args.top_p, compile=args.compile)
            rewards = end_score(roles.reward_model, out, dtype).tolist()
            costs = end_score(roles.cost_model, out, dtype).tolist() if roles.cost_model is not None else None
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


def held_out_step(step: int, final: bool, roles: Roles, processor, family: str, prompts: list[dict], args: Args,
                  log: RunLog, toy_world=None) -> None:
    """--eval_steps: log eval/* figures; --sample_steps: append samples to samples.jsonl (and a table in the
    trackers). Every rank computes the same answers (no collective); rank 0 writes."""
    evaluate_now = args.eval_steps and (step % args.eval_steps == 0 or final)
    sample_now = args.sample_steps and step % args.sample_steps == 0
    if not (evaluate_now or sample_now):
        return
    shown = prompts[:args.eval_prompts] if evaluate_now else prompts[:args.sample_prompts]
    rows = held_out_answers(roles, processor, family, shown, args)
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


def keep_samples_up_to(output_dir, step: int) -> None:
    """On resume: drop the samples a killed run wrote after its checkpoint (they are written again); step 0 (a
    fresh run): drop them all."""
    path = Path(output_dir) / "samples.jsonl"
    if path.is_file():
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        write_atomic(path, "".join(line + "\n" for line in rows if json.loads(line)["step"] <= step))


# ==========================================================================================================
# Main: the six roles, the data, the loop, the save
# ==========================================================================================================


def report_initial_kl(kl: float, args: Args) -> None:
    """Print the KL of the first rollout. The actor and the reference start from the same weights, so it is ~0
    unless they hold them differently: a quantized (or lower-precision) reference adds a constant to the penalty."""
    line = f"KL(actor || reference) of the first rollout: {kl:.4f} nats per response"
    if args.quantization not in ("", "none") and not args.lora_r:
        line += (f" (the reference is {args.quantization}-quantized, the actor is not: this KL is a bias in the "
                 "penalty from the first step on; drop --quantization, or train LoRA adapters on the quantized base "
                 "(--lora_r), for an exact reference)")
    print(line)


def load_roles(args: Args, device, checkpoint, fsdp: bool = False) -> tuple[Roles, object, str]:
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
        return shard_model(model, device, compute_dtype if is_trained else None) if fsdp else model

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


def load_lora_roles(args: Args, device, checkpoint) -> tuple[Roles, object, str]:
    """--lora_r > 0: every trained role is a LoRA adapter (a critic: + its score head) on a frozen base that is
    loaded once and shared (modeling.SharedBase):
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


def check_args(args: Args) -> None:
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
    minibatches_per_rollout(args)


def main(args: Args) -> dict:
    check_args(args)
    if args.dry_run:  # the memory plan, from the configs alone
        return dry_run(args, "ppo")
    quiet_transformers()
    rank, world_size, device = init_distributed(args.dist_timeout_minutes)
    seed_everything(args.seed, rank)
    checkpoint = find_checkpoint(args.resume_from, args.output_dir)
    log = RunLog(args.output_dir, args, rank, resume=checkpoint)

    # ---- models: actor, reference, reward, cost, reward critic, cost critic
    fsdp = check_fsdp(args)  # --fsdp: every role sharded over the ranks (FSDP2) instead of replicated (DDP)
    roles, processor, family = load_roles(args, device, checkpoint, fsdp)
    trained = roles.trained()
    if world_size > 1 and not args.lora_r and not fsdp:
        trained = {k: torch.nn.parallel.DistributedDataParallel(m) for k, m in trained.items()}
    for model in trained.values():  # LoRA roles share bases, so no DDP: rank 0's adapters, gradients averaged by hand
        if world_size > 1 and args.lora_r:
            broadcast_parameters(model)
    pad_id = get_tokenizer(processor).pad_token_id

    # ---- data: prompts encoded per batch (left padding for generation), PTX batches on their own loader
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
    total_steps = len(loader) * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    if total_steps == 0:
        raise SystemExit(f"no PPO step to run: {len(prompts)} prompts < batch size {args.per_device_prompt_batch_size}"
                         f" x {world_size} ranks")
    updates_per_step = minibatches_per_rollout(args) // args.gradient_accumulation_steps  # exact (checked there)
    updates = total_steps * updates_per_step
    optimizers = make_optimizers(trained, args, updates)
    if rank == 0:
        print(f"{args.algo}: {family} actor, {len(prompts)} prompts (skipped: {skips.report()}), {total_steps} steps")
    held_out, held_out_overlap = [], 0
    if args.eval_steps or args.sample_steps:  # --eval_data, else the eval split of train_data
        held_out, held_out_skips = load_prompts(*eval_source(args.train_data, args.eval_data, args.eval_split),
                                                args.categories or None, args.skip_invalid,
                                                max(args.eval_prompts, args.sample_prompts))
        held_out = check_images(held_out, processor, family, args.skip_invalid, held_out_skips)
        skips.merge(held_out_skips, "eval_")
        held_out_overlap = warn_overlap(held_out, prompts, "held-out", rank)
    toy_world = None
    if args.toy_grader:
        from data import toy_world

    # ---- state: lambda and the window of recent episode costs (identical on every rank), the data positions;
    #      on resume also the optimizers, schedulers and RNG states, exactly as they were (restored last)
    fresh = {"step": 0, "epoch": 0, "samples_in_epoch": 0, "lambda": args.lambda_init if args.algo == "ppo_lag" else 0.0,
             "cost_window": [], "ptx_batches": 0, "nonfinite_steps": 0, "optimizer_steps": 0, "initial_kl": None,
             "pid": new_pid_state(args), "record": {}}
    state = resume_state(checkpoint, optimizers, fresh, log, rank, trained)
    step, lam, record, optimizer_steps = state["step"], state["lambda"], state["record"], state["optimizer_steps"]
    initial_kl, pid_state = state["initial_kl"], state["pid"]
    if rank == 0:  # fresh: no samples of an earlier run in this folder; resumed: none from after the checkpoint
        keep_samples_up_to(args.output_dir, step)
    cost_window = collections.deque(state["cost_window"], maxlen=args.episode_cost_window_size)
    ptx = PtxStream(ptx_loader, state["ptx_batches"]) if ptx_loader is not None else None
    guard = NonFiniteGuard(args.max_nonfinite_steps, state["nonfinite_steps"], state.get("nonfinite_in_a_row", 0))
    stats.update(state.get("data_stats", {}))  # what encoding did to the data so far (summary.json)

    def checkpoint_now(epoch: int, samples_in_epoch: int):
        return save_checkpoint(args.output_dir, step, trained, optimizers,
                        {"epoch": epoch, "samples_in_epoch": samples_in_epoch, "lambda": lam,
                         "cost_window": list(cost_window), "ptx_batches": ptx.consumed if ptx else 0,
                         "nonfinite_steps": guard.total, "nonfinite_in_a_row": guard.consecutive,
                         "optimizer_steps": optimizer_steps, "initial_kl": initial_kl, "pid": pid_state,
                         "record": record, "data_stats": dict(stats), "seconds": time.time() - start,
                         "metrics_lines": log.lines},
                        processor, args.keep_checkpoints, rank)

    # ---- loop: rollout -> update -> lambda, one PPO step per prompt batch
    start = time.time() - state.get("seconds", 0.0)  # a resumed run's clock goes on
    progress = tqdm(total=total_steps, initial=step, desc=args.algo, disable=rank != 0)
    for epoch in range(state["epoch"], args.epochs):
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = state["samples_in_epoch"] if epoch == state["epoch"] else 0
        batches_done = loader.sampler.skip // args.per_device_prompt_batch_size
        for prompt_batch in loader:
            if step >= total_steps:
                break
            batches_done += 1
            rows = prompt_batch.pop("rows")
            r = rollout(roles, processor, family, to_device(prompt_batch, device), args)
            lam, window_cost = lambda_step(lam, cost_window, r.end_costs, step + 1, args, pid_state)
            losses = ppo_update(trained, optimizers, advantage_step(r, lam, args), family, args, guard, step, ptx)
            step += 1
            optimizer_steps += len(losses["actor_grad_norm"])
            record = {"step": step, "epoch": epoch, **step_figures(r, losses), "J_C": window_cost, "lambda": lam,
                      "actor_lr": optimizers["actor"][1].get_last_lr()[0], "nonfinite_steps": guard.total,
                      "optimizer_steps": optimizer_steps, "seconds": round(time.time() - start, 1)}
            if step == 1:  # the first rollout comes from the initial actor: its KL to the reference should be ~0
                initial_kl = record["kl"]
                if rank == 0:
                    report_initial_kl(initial_kl, args)
            if toy_world is not None:
                images = [open_image(row["image"], row.get("source")) for row in rows]
                grades = [toy_world.grade(image, row["question"], text, bool(ended)) for image, row, text, ended
                          in zip(images, rows, response_texts(processor, r.batch), r.batch["ended"].tolist())]
                record.update({f"true_{k}": v for k, v in toy_world.summarize(grades).items() if k != "n"})
            if step % args.logging_steps == 0 or step == total_steps:
                log.metrics(record)
            held_out_step(step, step == total_steps, roles, processor, family, held_out, args, log, toy_world)
            progress.update(1)
            progress.set_postfix(R=f"{record['reward']:.2f}", C=f"{record.get('cost', float('nan')):.2f}",
                                 lam=f"{lam:.3f}", kl=f"{record['kl']:.2f}")
            if args.save_steps and step % args.save_steps == 0:
                checkpoint_now(epoch, batches_done * args.per_device_prompt_batch_size)
    progress.close()

    # ---- save: the actor in HF format (loadable by evaluate.py), both critics, the lambda state
    summary = {"algo": args.algo, "family": family, "steps": step, "final": record, "lambda": lam,
               "J_C": record.get("J_C"), "nonfinite_steps": guard.total, "optimizer_steps": optimizer_steps,
               "initial_kl": initial_kl, "skipped": skips.as_dict(), "held_out_in_training": held_out_overlap,
               "truncated": dict(stats), "seconds": round(time.time() - start, 1)}
    final = checkpoint_now(args.epochs, 0)  # the end state (refuses non-finite weights): a finished run resumes to nothing
    if rank == 0:
        for name, model in trained.items():
            publish_model(final, name, f"{args.output_dir}/{name}")  # linked from the checkpoint: written once
            base = {"actor": args.actor_model_name_or_path,
                    "reward_critic": args.reward_critic_model_name_or_path or args.reward_model_name_or_path,
                    "cost_critic": args.cost_critic_model_name_or_path or args.cost_model_name_or_path}[name]
            write_model_card(f"{args.output_dir}/{name}", name if name != "actor" else args.algo, base, args,
                             summary["final"], [args.train_data])
        if args.merge_lora and args.lora_r:  # the actor with its adapter merged into the base, for any loader
            save_merged(roles.actor, f"{args.output_dir}/actor/merged", processor)
        write_json(f"{args.output_dir}/lambda.json", {"lambda": lam, "episode_cost_window": list(cost_window),
                                                     "threshold": args.threshold, "step": step})
        log.summary(summary)
        print(data_report(skips, stats))
        print(f"saved {args.output_dir}: lambda={lam:.4f} J_C={record.get('J_C')}")
    return summary


if __name__ == "__main__":
    run_script(main, Args)
