"""Stage 3: PPO-Lagrangian with a reward critic and a cost critic (Safe RLHF-V), and plain PPO as the baseline.

    max_theta min_{lambda >= 0}  J_R(theta) - lambda * (J_C(theta) - d),   J_R = E[R(x, y)], J_C = E[C(x, y)]

Six roles: the actor pi_theta (from the SFT policy), the reference pi_ref (a frozen copy of the initial actor), the
reward model R and the cost model C (frozen), the reward critic V_r (initialised from R, head included) and the cost
critic V_c (initialised from C). `--algo ppo` is the plain RLHF baseline on the same code path: no cost critic,
lambda = 0, so the advantage is the reward advantage alone (a cost model, if given, is only logged).

The file reads top to bottom: arguments; the method's math (one block of pure tensor functions that needs only
torch: a notebook copies it whole); the forwards; one iteration, ppo_iteration, whose steps run in this order on
every path (the numbers are REFERENCE section 3's):
    rollout(...)          steps 1-3: sample, score (pi_old, pi_ref, R, C), shape the per-token rewards and costs
    value_step(...)       step 4: the critics' V_old and GAE for the reward and the cost
    lambda_step(...)      step 9, before 5 as in Safe RLHF: this rollout's costs enter the window, lambda moves
    advantage_step(...)   step 5: the combined advantage with the new lambda
    ppo_update(...)       steps 6-8: clipped surrogate (+ PTX), clipped value losses, optimizer steps
then main(), which loads the six roles and the data and runs the iterations; loading and logging come last.

    python train_ppo_lag.py --actor_model_name_or_path runs/sft --reward_model_name_or_path runs/rm \
        --cost_model_name_or_path runs/cm --train_data data/toy/pairs --output_dir runs/ppo_lag
"""

from __future__ import annotations

import collections
import dataclasses
import time

from tqdm.auto import tqdm

from data import select_rows
from infra.checkpoint import find_checkpoint, resume_state, save_checkpoint
from infra.cli import CommonArgs, arg, dry_run, run_script
from infra.optim import NonFiniteGuard, optimizer_step
from infra.parallel import all_gather_cat, check_fsdp, init_distributed, mean_over_ranks, no_sync_unless
from infra.ppo_setup import (PtxStream, Roles, check_args, fresh_state, held_out_step, keep_samples_up_to, load_data,
                             load_roles, make_optimizers, minibatches_per_rollout, publish, replicate,
                             report_initial_kl, toy_figures)
from infra.runlog import RunLog, quiet_transformers
from modeling import forward_kwargs, generate, never_sample_ids, token_log_probs
from utils import autocast, seed_everything, sft_loss, to_device, torch_dtype


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
# The method's math (REFERENCE section 3): pure functions on tensors, each citing its step. This block, down to
# "end of the math block", needs nothing but the two imports below: a notebook copies it whole.
# Per-action tensors are (B, T) with T = L - 1: column t holds the action (token) t + 1, whose log-prob comes from
# the logits at position t and whose value V(s_t) is the critic's score at position t. `mask` marks real response
# tokens (EOS included, padding never).
# ==========================================================================================================
import math  # noqa: E402  (the block's own imports, so that it can be copied alone)

import torch  # noqa: E402


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is true (padding never counts). dim=None: over all masked elements."""
    values = values.masked_fill(~mask.bool(), 0)  # not values * mask: a NaN in the padding must not leak in
    mask = mask.to(values.dtype)
    if dim is None:
        return values.sum() / mask.sum().clamp(min=1)
    return values.sum(dim) / mask.sum(dim).clamp(min=1)


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


def whiten(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(A - mean) / std over the batch's response tokens (--normalize_advantages; not in the reference method)."""
    mean = masked_mean(advantages, mask)
    var = masked_mean((advantages - mean) ** 2, mask)
    return (advantages - mean) * torch.rsqrt(var + 1e-8) * mask


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


def policy_drift(log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor,
                 clip_range_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagnostics of step 6: the k3 estimate of KL(pi_old || pi) = mean((rho - 1) - log rho), and the share of
    tokens whose ratio rho lies outside [1 - eps, 1 + eps] (where the clip takes the gradient away)."""
    log_ratio = (log_probs - old_log_probs).float()
    approx_kl = masked_mean((log_ratio.exp() - 1) - log_ratio, mask)
    clipped = (log_ratio.exp() - 1).abs() > clip_range_ratio
    return approx_kl, masked_mean(clipped.float(), mask)


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

# ---- end of the math block ---------------------------------------------------------------------------------


# ==========================================================================================================
# Forwards shared by rollout and update. Each runs its model under autocast in the compute dtype; log-probs,
# scores and values come out in fp32.
# ==========================================================================================================


def response_start(batch: dict) -> int:
    """The first action column holding a response token. Rollout prompts are left-padded to one length P, so every
    response starts at input position P, i.e. action column P - 1; columns before it are prompt."""
    return int(batch["response_mask"][:, 1:].any(0).nonzero()[0])


def policy_log_probs(model, batch, family, dtype=torch.float32, temperature: float = 1.0,
                     never_sampled: list[int] | tuple = (), with_entropy: bool = False):
    """log pi(a_t) for every action column (B, L-1), 0 outside the response [, mean entropy over the response],
    under the sampling distribution (modeling.token_log_probs: temperature, never-sampled ids removed).

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


def score_in_micro_batches(batch: dict, size: int, forward) -> torch.Tensor:
    """forward(rows of batch) for consecutive slices of `size` rows (0 = all at once), concatenated: the rollout's
    scoring forwards hold the activations of one micro-batch at a time."""
    n = batch["input_ids"].shape[0]
    if not size or size >= n:
        return forward(batch)
    device = batch["input_ids"].device
    return torch.cat([forward(slice_batch(batch, torch.arange(lo, min(lo + size, n), device=device)))
                      for lo in range(0, n, size)])


# ==========================================================================================================
# One iteration: rollout (steps 1-3), value_step (4), lambda_step (9), advantage_step (5), ppo_update (6-8)
# ==========================================================================================================


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
    never_sampled: list = dataclasses.field(default_factory=list)  # token ids the sampling distribution excludes
    # step 4 (value_step)
    old_reward_values: torch.Tensor | None = None
    reward_advantages: torch.Tensor | None = None
    reward_returns: torch.Tensor | None = None
    old_cost_values: torch.Tensor | None = None
    cost_advantages: torch.Tensor | None = None
    cost_returns: torch.Tensor | None = None
    advantages: torch.Tensor | None = None  # the combined advantage of step 5 (advantage_step)


def ppo_iteration(roles: Roles, trained: dict, optimizers: dict, processor, family: str, prompt_batch: dict,
                  lam: float, cost_window: collections.deque, pid_state: dict, step: int, guard: NonFiniteGuard,
                  ptx, args: Args) -> tuple[Rollout, float, float, dict]:
    """One PPO step on a prompt batch (on the models' device), the steps in the order they run; `step` counts the
    steps done before this one. Returns (the rollout, the new lambda, J_C, the update's loss figures)."""
    device = prompt_batch["input_ids"].device
    r = rollout(roles, processor, family, prompt_batch, **rollout_settings(args, device))  # steps 1-3
    # The update's first shuffled minibatch order, drawn now: with --reuse_critic_forward step 4 runs on it.
    order = torch.randperm(r.mask.shape[0])
    reuse = reuses_critic_forward(args.reuse_critic_forward, args.update_iters, r.mask.shape[0],
                                  args.per_device_train_batch_size)
    critics = {name: m for name, m in (trained if reuse else roles.trained()).items() if name != "actor"}
    critic_losses = value_step(r, critics, order, reuse, **value_settings(args, device))  # step 4
    lam, window_cost = lambda_step(lam, cost_window, r.end_costs,  # step 9
                                   args.algo == "ppo_lag" and step + 1 >= args.lambda_update_delay_steps,
                                   **lambda_settings(args), pid_state=pid_state)
    advantage_step(r, lam, args.normalize_advantages)  # step 5
    losses = ppo_update(trained, optimizers, r, family, order, critic_losses, guard=guard, step=step, ptx=ptx,
                        **update_settings(args, device))  # steps 6-8
    return r, lam, window_cost, losses


@torch.no_grad()
def rollout(roles: Roles, processor, family: str, prompt_batch: dict, *, dtype: torch.dtype, max_new_tokens: int,
            temperature: float, top_p: float, compile: bool, micro_batch_size: int, old_log_probs: str,
            missing_eos_penalty: float, kl_coeff: float, clip_range_score: float) -> Rollout:
    """Steps 1-3 for a left-padded prompt batch (on the models' device). old_log_probs: "sampling" or "forward"
    (old_log_probs_source)."""
    for model in roles.trained().values():
        model.eval()
    never_sampled = never_sample_ids(processor)
    # 1. Rollout: sample responses for left-padded prompts from softmax(logits / T) without placeholders and pad;
    #    everything after the first EOS is padding, `response_mask` marks the real response tokens.
    with autocast(prompt_batch["input_ids"].device, dtype):
        batch = generate(roles.actor, processor, family, prompt_batch, max_new_tokens, temperature, top_p,
                         compile=compile)
    mask = batch["response_mask"][:, 1:]
    sampling_log_probs = batch.pop("sampling_log_probs")
    # 2. Score with the same image inputs everywhere, --rollout_micro_batch_size rows at a time: old log-probs (those
    #    of the sampling pass, or a fresh forward: --old_log_probs), reference log-probs (same temperature and
    #    suppressed tokens), end reward and cost. (The critics' values are step 4's.)
    micro = lambda forward: score_in_micro_batches(batch, micro_batch_size, forward)
    log_probs_of = lambda model: micro(lambda b: policy_log_probs(model, b, family, dtype, temperature, never_sampled))
    if old_log_probs == "sampling":
        old = sampling_log_probs.masked_fill(~mask, 0.0)
    else:
        old = log_probs_of(roles.actor)
    ref_log_probs = log_probs_of(roles.reference)
    end_rewards = micro(lambda b: end_score(roles.reward_model, b, dtype))
    end_costs = micro(lambda b: end_score(roles.cost_model, b, dtype)) if roles.cost_model is not None else None
    # 3. Shape per token with the KL penalty, end scores on the last real token; --missing_eos_penalty lowers the
    #    end reward of a response cut at max_new_tokens (unfinished is unhelpful; it is not more harmful, so the cost
    #    is left alone: a cost penalty would also be scaled by lambda and blur the budget on harm).
    penalised_rewards = end_rewards - missing_eos_penalty * (~batch["ended"]).float()
    rewards = shape_rewards(penalised_rewards, old, ref_log_probs, mask, kl_coeff, clip_range_score, kl_sign=-1.0)
    costs = None
    if roles.cost_critic is not None:
        costs = shape_rewards(end_costs, old, ref_log_probs, mask, kl_coeff, clip_range_score, kl_sign=+1.0)
    return Rollout(batch, mask, old, ref_log_probs, end_rewards, rewards, end_costs, costs, never_sampled)


def reuses_critic_forward(reuse_critic_forward: bool, update_iters: int, rollouts: int, train_batch_size: int) -> bool:
    """--reuse_critic_forward applies to a batch of `rollouts`: it is one minibatch, updated once, so the update's
    only critic forward can be the rollout's critic forward (same weights, same rows)."""
    return reuse_critic_forward and update_iters == 1 and rollouts <= train_batch_size


def value_step(r: Rollout, critics: dict, order: torch.Tensor, reuse: bool, *, dtype: torch.dtype,
               micro_batch_size: int, gamma: float, gae_lambda: float, clip_range_value: float,
               accumulation: int) -> dict:
    """Step 4: each critic's values V_old(s_t) over the rollout and GAE of the shaped rewards (costs) with them.
    Sets r.old_<kind>_values, r.<kind>_advantages, r.<kind>_returns. critics: name -> model.

    Without reuse: a no-grad forward of each critic (as the rollout left them, in eval mode), micro-batched.
    With reuse (--reuse_critic_forward, the rollout is the update's one minibatch, rows `order`): V_old comes from
    the update's own training forward of each critic on that minibatch (same weights, same inputs, one forward
    less), and that critic's step 7 follows at once, its clipped value loss backpropagated right after the forward,
    as the update would (only one role's graph is alive at a time). Returns name -> the detached value loss of
    the critics whose step 7 is done ({} without reuse), for ppo_update."""
    losses = {}
    for name, kind in (("reward_critic", "reward"), ("cost_critic", "cost")):
        if name not in critics:
            continue
        if not reuse:
            with torch.no_grad():
                values = score_in_micro_batches(r.batch, micro_batch_size,
                                                lambda b: critic_values(critics[name], b, dtype))
            gae_step(r, kind, values, gamma, gae_lambda)
            continue
        critics[name].train()
        index = order.to(r.mask.device)
        values = critic_values(critics[name], slice_batch(r.batch, index), dtype)
        in_rollout_order = torch.empty_like(values.detach())
        in_rollout_order[index] = values.detach()
        gae_step(r, kind, in_rollout_order, gamma, gae_lambda)  # so step 7 starts, as after a separate forward, at V_old
        losses[name] = value_loss_backward(values, r, kind, index, r.mask[index], clip_range_value, accumulation)
    return losses


@torch.no_grad()
def gae_step(r: Rollout, kind: str, values: torch.Tensor, gamma: float, gae_lambda: float) -> None:
    """Step 4 for kind "reward" or "cost" given that critic's values (B, T): V_old, GAE advantages and returns."""
    shaped = r.rewards if kind == "reward" else r.costs
    old_values = values.detach()
    advantages, returns = gae_advantages(shaped, old_values, r.mask, gamma, gae_lambda)
    setattr(r, f"old_{kind}_values", old_values)
    setattr(r, f"{kind}_advantages", advantages)
    setattr(r, f"{kind}_returns", returns)


@torch.no_grad()
def lambda_step(lam: float, cost_window: collections.deque, episode_costs: torch.Tensor | None, update: bool, *,
                mode: str, threshold: float, lr: float, lambda_max: float, pid_gains: tuple[float, float, float],
                pid_state: dict | None = None) -> tuple[float, float]:
    """Step 9, as in Safe RLHF before step 5: this rollout's episode costs C(x, y) (of every rank) enter the moving
    window, J_C = the window's mean, then (if `update`: PPO-Lag, from --lambda_update_delay_steps on) the dual step
    on J_C - d with update_lambda, or pid_lambda (--lambda_update pid; pid_state from infra.ppo_setup.fresh_state). Returns
    (lambda, J_C); the window and pid_state are updated in place, identical on every rank."""
    if episode_costs is not None:
        cost_window.extend(all_gather_cat(episode_costs.float()).tolist())
    window_cost = sum(cost_window) / len(cost_window) if cost_window else float("nan")
    if update:
        if mode == "pid":
            error = window_cost - threshold
            lam, pid_state["integral"] = pid_lambda(error, pid_state["integral"], pid_state["previous_error"],
                                                    *pid_gains, lambda_max)
            pid_state["previous_error"] = error
        else:
            lam = update_lambda(lam, window_cost, threshold, lr, lambda_max, mode)
    return lam, window_cost


@torch.no_grad()
def advantage_step(r: Rollout, lam: float, normalize: bool = False) -> Rollout:
    """Step 5: the combined advantage with lambda (the one just updated) held constant during the update; plain
    PPO: lambda = 0 and no cost advantage. normalize: --normalize_advantages. Sets r.advantages and returns r."""
    cost_advantages = r.cost_advantages if r.cost_advantages is not None else torch.zeros_like(r.reward_advantages)
    advantages = combined_advantage(r.reward_advantages, cost_advantages, lam)
    r.advantages = whiten(advantages, r.mask) if normalize else advantages
    return r


def ppo_update(trained: dict, optimizers: dict, r: Rollout, family: str, first_order: torch.Tensor | None = None,
               done_critic_losses: dict | None = None, *, dtype: torch.dtype, update_iters: int,
               train_batch_size: int, accumulation: int, temperature: float, clip_range_ratio: float,
               clip_range_value: float, max_grad_norm: float, ptx_coeff: float, guard: NonFiniteGuard | None = None,
               step: int = 0, ptx=None) -> dict:
    """Steps 6-8 on one rollout: `update_iters` passes over shuffled minibatches of `train_batch_size` rollouts (the
    first pass in `first_order`, drawn by the caller; None: drawn here); an optimizer step of every trained model
    each `accumulation` minibatches (which must divide the minibatches of a step: minibatches_per_rollout).
    trained: Roles.trained() (DDP-wrapped under torchrun); optimizers: name -> (optimizer, scheduler);
    done_critic_losses: the critics whose step 7 on the first minibatch value_step did (--reuse_critic_forward).
    Returns every logged loss figure as a list over minibatches (the grad norms: over optimizer steps)."""
    minibatches_per_rollout(update_iters, r.mask.shape[0], train_batch_size, accumulation)
    guard = guard or NonFiniteGuard(max_consecutive=0)
    device = r.batch["input_ids"].device
    for model in trained.values():
        model.train()
    n = r.batch["input_ids"].shape[0]
    losses = collections.defaultdict(list)
    micro = 0
    for epoch in range(update_iters):
        order = first_order if epoch == 0 and first_order is not None else torch.randperm(n)
        for lo in range(0, n, train_batch_size):
            index = order[lo:lo + train_batch_size].to(device)
            mb, mb_mask = slice_batch(r.batch, index), r.mask[index]
            micro += 1
            final_micro = micro % accumulation == 0
            with no_sync_unless(final_micro, *trained.values()):  # DDP all-reduces on the last micro-batch only
                # Each role's loss is backpropagated right after its forward, so only one role's graph is alive at
                # a time (the three models share no parameter: the gradients are those of one summed backward).
                # 6. Clipped surrogate of the actor + gamma_ptx * the SFT loss on a PTX batch. The PTX term is
                #    backpropagated first, on its own (under DDP without an all-reduce: the actor's backward
                #    reduces both), so that its full-sequence logits and the actor's graph are never alive at once.
                total_actor = 0.0
                if ptx is not None:
                    ptx_batch = to_device(next(ptx), device)
                    with no_sync_unless(False, trained["actor"]):
                        with autocast(device, dtype):
                            ptx_logits = trained["actor"](**forward_kwargs(ptx_batch, family), use_cache=False).logits
                        loss_ptx = sft_loss(ptx_logits, ptx_batch["labels"])
                        del ptx_logits  # (as in train_sft: not needed by the backward)
                        (ptx_coeff * loss_ptx / accumulation).backward()
                    total_actor = ptx_coeff * loss_ptx.detach()
                    losses["ptx_loss"].append(loss_ptx.item())
                log_probs, entropy = policy_log_probs(trained["actor"], mb, family, dtype, temperature,
                                                      r.never_sampled, with_entropy=True)
                loss_actor = actor_loss(log_probs, r.old_log_probs[index], r.advantages[index], mb_mask,
                                        clip_range_ratio)
                (loss_actor / accumulation).backward()
                total_actor = total_actor + loss_actor.detach()
                # 7. Clipped value losses of both critics, one after the other (value_step did the first
                #    minibatch's with --reuse_critic_forward).
                critic_losses = dict(done_critic_losses or {}) if micro == 1 else {}
                for name, kind in (("reward_critic", "reward"), ("cost_critic", "cost")):
                    if name in trained and name not in critic_losses:
                        values = critic_values(trained[name], mb, dtype)
                        critic_losses[name] = value_loss_backward(values, r, kind, index, mb_mask, clip_range_value,
                                                                  accumulation)
                total = total_actor.detach() + sum(critic_losses.values())
                for name, loss in critic_losses.items():
                    losses[f"{name}_loss"].append(loss.item())
            approx_kl, clip_fraction = policy_drift(log_probs.detach(), r.old_log_probs[index], mb_mask,
                                                    clip_range_ratio)
            losses["approx_kl"].append(approx_kl.item())
            losses["clip_fraction"].append(clip_fraction.item())
            losses["actor_loss"].append(loss_actor.item())
            losses["entropy"].append(entropy.item())
            if final_micro:
                # 8. Clip, and step every trained model; a NaN/inf loss or gradient (on any rank) skips this update
                #    of all of them, counted and logged (a LoRA role, outside DDP and FSDP, averages its gradients).
                norms = optimizer_step(trained, optimizers, max_grad_norm, guard, total, step + 1)
                for name in optimizers:
                    losses[f"{name}_grad_norm"].append(float(norms[name]))
    return losses


def value_loss_backward(values: torch.Tensor, r: Rollout, kind: str, index: torch.Tensor, mb_mask: torch.Tensor,
                        clip_range_value: float, accumulation: int) -> torch.Tensor:
    """Step 7 for one critic on minibatch `index`: its clipped value loss against V_old and the returns of step 4,
    backpropagated at once (divided by the accumulation steps). Returns the detached loss."""
    loss = critic_loss(values, getattr(r, f"old_{kind}_values")[index], getattr(r, f"{kind}_returns")[index],
                       mb_mask, clip_range_value)
    (loss / accumulation).backward()
    return loss.detach()


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
# Main: the six roles, the data, the loop, the save
# ==========================================================================================================


def main(args: Args) -> dict:
    check_args(args)
    if args.dry_run:  # the memory plan, from the configs alone
        return dry_run(args, "ppo")
    quiet_transformers()
    rank, world_size, device = init_distributed(args.dist_timeout_minutes)
    seed_everything(args.seed, rank)
    checkpoint = find_checkpoint(args.resume_from, args.output_dir)
    log = RunLog(args.output_dir, args, rank, resume=checkpoint)

    # ---- models: actor, reference, reward, cost, reward critic, cost critic (trained: DDP-wrapped under torchrun)
    fsdp = check_fsdp(args)  # --fsdp: every role sharded over the ranks (FSDP2) instead of replicated (DDP)
    roles, processor, family = load_roles(args, device, checkpoint, fsdp)
    trained = replicate(roles.trained(), world_size, args.lora_r, fsdp)

    # ---- data: prompts encoded per batch (left padding for generation), PTX batches, held-out prompts
    data = load_data(args, processor, family, rank, world_size)
    loader, total_steps, skips, stats = data["loader"], data["total_steps"], data["skips"], data["stats"]
    optimizers = make_optimizers(trained, args, total_steps * minibatches_per_rollout(
        args.update_iters, args.per_device_prompt_batch_size, args.per_device_train_batch_size,
        args.gradient_accumulation_steps) // args.gradient_accumulation_steps)

    # ---- state: lambda and the window of recent episode costs (identical on every rank), the data positions;
    #      on resume also the optimizers, schedulers and RNG states, exactly as they were (restored last)
    state = resume_state(checkpoint, optimizers, fresh_state(args), log, rank, trained)
    step, lam, record, optimizer_steps = state["step"], state["lambda"], state["record"], state["optimizer_steps"]
    keep_samples_up_to(args.output_dir, step, rank)  # none of an earlier run, none from after the checkpoint
    cost_window = collections.deque(state["cost_window"], maxlen=args.episode_cost_window_size)
    ptx = PtxStream(data["ptx_loader"], state["ptx_batches"]) if data["ptx_loader"] is not None else None
    guard = NonFiniteGuard(args.max_nonfinite_steps, state["nonfinite_steps"], state.get("nonfinite_in_a_row", 0))
    stats.update(state.get("data_stats", {}))  # what encoding did to the data so far (summary.json)

    def checkpoint_now(epoch: int, samples_in_epoch: int):
        return save_checkpoint(args.output_dir, step, trained, optimizers, {
            "epoch": epoch, "samples_in_epoch": samples_in_epoch, "lambda": lam, "cost_window": list(cost_window),
            "ptx_batches": ptx.consumed if ptx else 0, "nonfinite_steps": guard.total,
            "nonfinite_in_a_row": guard.consecutive, "optimizer_steps": optimizer_steps,
            "initial_kl": state["initial_kl"], "pid": state["pid"], "record": record, "data_stats": dict(stats),
            "seconds": time.time() - start, "metrics_lines": log.lines}, processor, args.keep_checkpoints, rank)

    # ---- loop: one PPO iteration per prompt batch
    start = time.time() - state.get("seconds", 0.0)  # a resumed run's clock goes on
    progress = tqdm(total=total_steps, initial=step, desc=args.algo, disable=rank != 0)
    for epoch in range(state["epoch"], args.epochs):
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = state["samples_in_epoch"] if epoch == state["epoch"] else 0
        batches_done = loader.sampler.skip // args.per_device_prompt_batch_size
        for prompt_batch in loader:
            if step >= total_steps:
                break
            batches_done, rows = batches_done + 1, prompt_batch.pop("rows")
            r, lam, window_cost, losses = ppo_iteration(roles, trained, optimizers, processor, family, to_device(
                prompt_batch, device), lam, cost_window, state["pid"], step, guard, ptx, args)
            step, optimizer_steps = step + 1, optimizer_steps + len(losses["actor_grad_norm"])
            record = {"step": step, "epoch": epoch, **step_figures(r, losses), "J_C": window_cost, "lambda": lam,
                      "actor_lr": optimizers["actor"][1].get_last_lr()[0], "nonfinite_steps": guard.total,
                      "optimizer_steps": optimizer_steps, "seconds": round(time.time() - start, 1)}
            if step == 1:  # the first rollout comes from the initial actor: its KL to the reference should be ~0
                state["initial_kl"] = report_initial_kl(record["kl"], args.quantization, args.lora_r, rank)
            record.update(toy_figures(data["toy_world"], rows, processor, r.batch))
            if step % args.logging_steps == 0 or step == total_steps:
                log.metrics(record)
            held_out_step(step, step == total_steps, roles, processor, family, data["held_out"], args, log,
                          data["toy_world"])
            progress.update(1)
            progress.set_postfix(R=f"{record['reward']:.2f}", C=f"{record.get('cost', float('nan')):.2f}",
                                 lam=f"{lam:.3f}", kl=f"{record['kl']:.2f}")
            if args.save_steps and step % args.save_steps == 0:
                checkpoint_now(epoch, batches_done * args.per_device_prompt_batch_size)
    progress.close()

    # ---- save: the end state (a finished run resumes to nothing), the actor in HF format, both critics, lambda
    summary = {"algo": args.algo, "family": family, "steps": step, "final": record, "lambda": lam,
               "J_C": record.get("J_C"), "nonfinite_steps": guard.total, "optimizer_steps": optimizer_steps,
               "initial_kl": state["initial_kl"], "skipped": skips.as_dict(), "held_out_in_training":
               data["held_out_overlap"], "truncated": dict(stats), "seconds": round(time.time() - start, 1)}
    final = checkpoint_now(args.epochs, 0)  # (refuses non-finite weights)
    if rank == 0:
        publish(final, trained, roles, processor, summary, lam, cost_window, step, log, skips, stats, args)
    return summary


# ==========================================================================================================
# The options each step takes (main's plumbing of loading, data, held-out prompts and the save: infra/ppo_setup)
# ==========================================================================================================


def rollout_settings(args: Args, device) -> dict:
    """rollout's keyword values from the options (--dtype "auto" resolved on `device`)."""
    dtype = torch_dtype(args.dtype, device)
    return dict(dtype=dtype, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                compile=args.compile, micro_batch_size=args.rollout_micro_batch_size,
                old_log_probs=old_log_probs_source(args.old_log_probs, dtype),
                missing_eos_penalty=args.missing_eos_penalty, kl_coeff=args.kl_coeff,
                clip_range_score=args.clip_range_score)


def value_settings(args: Args, device) -> dict:
    return dict(dtype=torch_dtype(args.dtype, device), micro_batch_size=args.rollout_micro_batch_size,
                gamma=args.gamma, gae_lambda=args.gae_lambda, clip_range_value=args.clip_range_value,
                accumulation=args.gradient_accumulation_steps)


def lambda_settings(args: Args) -> dict:
    return dict(mode=args.lambda_update, threshold=args.threshold, lr=args.lambda_lr, lambda_max=args.lambda_max,
                pid_gains=(args.lambda_pid_kp, args.lambda_pid_ki, args.lambda_pid_kd))


def update_settings(args: Args, device) -> dict:
    return dict(dtype=torch_dtype(args.dtype, device), update_iters=args.update_iters,
                train_batch_size=args.per_device_train_batch_size, accumulation=args.gradient_accumulation_steps,
                temperature=args.temperature, clip_range_ratio=args.clip_range_ratio,
                clip_range_value=args.clip_range_value, max_grad_norm=args.max_grad_norm, ptx_coeff=args.ptx_coeff)


def old_log_probs_source(choice: str, dtype: torch.dtype) -> str:
    """Where pi_old comes from (--old_log_probs): "sampling" (recorded while generating, no extra forward) or
    "forward" (a fresh actor forward over the rollout). auto: sampling when computing in fp32, where both agree to
    ~1e-6; a fresh forward in bf16, where the cached one-token-at-a-time decode and the full forward round
    differently, so that the first minibatch's ratio is exactly 1 there."""
    if choice != "auto":
        return choice
    return "sampling" if dtype == torch.float32 else "forward"


if __name__ == "__main__":
    run_script(main, Args)
