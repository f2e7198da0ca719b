"""Speed of one PPO step: our trainer (plain PPO and PPO-Lagrangian) against a bare minimal loop, on CPU.

Three systems do the same work on the same prompts with the same seeds, each in its own subprocess (so that peak
memory does not mix), interleaved over rounds:

  ppo      train_ppo_lag with --algo ppo: rollout + lambda_step + advantage_step + ppo_update on the Roles that
           infra.ppo_setup.load_roles builds (actor, reference, reward model, reward critic), optimizers from
           infra.optim.make_optimizer exactly as main() makes them
  ppo_lag  the same with the cost model and the cost critic (--algo ppo_lag)
  bare     a minimal loop written here, the cost floor of the same work: HF generate (KV cache, do_sample,
           temperature 1, top_k 0, top_p 1), old log-probs from generate's scores (no extra actor forward), one
           forward each of reference, reward model and value model, per-token KL-shaped reward, GAE (gamma 1,
           lambda 0.95) as one matmul, one forward+backward of policy + value with the clipped PPO losses, one fused
           AdamW step (foreach where fused is not supported)

Models (built offline in a temporary folder): a Llama with vocabulary 1024 (a byte-level BPE tokenizer trained
here on seeded pseudo-words), hidden 256, intermediate 512, 4 layers, 8 heads / 4 KV heads, fp32 (--dtype float32).
The reward and cost models are modeling.ScoreModel.from_pretrained(policy) + save_pretrained, as the tests do; the
critics start from them. Prompts: exactly --prompt_tokens ids drawn from the vocabulary without its special tokens,
no padding. The random-weight policy samples nearly uniformly from 1024 tokens, so EOS is rare (about 4% of
responses at 32 tokens) and responses are ~full length (the mean is printed).

    nice -n 10 python benchmarks/bench_ppo.py                      # the table: 3 rounds of 4 + 24 steps, ~3 min quiet
    nice -n 10 python benchmarks/bench_ppo.py --rounds 1 --steps 4 --warmup 1   # a quick look
    nice -n 10 python benchmarks/bench_ppo.py --sweep              # PPO-Lag at batch 8/16/32, 32/64/128 new tokens
    python benchmarks/bench_ppo.py --only ppo_lag --profile torch --steps 3    # where the time goes (one system)
    python benchmarks/bench_ppo.py --repo /tmp/old_tree            # another checkout's trainer (the bare loop is this file's)
    python benchmarks/bench_ppo.py --trainer_args='--compile' --warmup 6   # the trainer with extra options

How each figure is measured:
  step time   wall clock (time.perf_counter) of each step after --warmup steps; per run the median, per system the
              median of the run medians and the minimum over every timed step. Ratios (PPO/bare, PPO-Lag/PPO) are
              of those medians; also per round (the runs of a round run back to back), of the minima and of the CPU
              times, to show the noise. CPU s/step: time.process_time (all threads of the process) per step, median.
              '2nd half / 1st half': median step time of the second half of a run's timed steps over the first
              (a step that slows down as the run goes on shows up there).
  phases      of our step, by wrapping from outside (the trainer is never edited), exclusive time (a nested region
              pauses its parent, so the phases add up to the step):
                generate  train_ppo_lag.generate / modeling.generate / the actor's .generate
                scoring   inside rollout: the scoring helpers (policy_log_probs, token_log_probs, end_score,
                          critic_values) and any forward of a role outside generate
                update    inside ppo_update: the same helpers, actor_loss / critic_loss, any role forward, and
                          torch.autograd.backward (hence Tensor.backward, with the checkpointed log-softmax recompute)
                optimizer torch.nn.utils.clip_grad_norm_, optimizer.step (step pre/post hooks), optimizer.zero_grad
                other     the rest of the step: lambda_step, advantage_step, KL shaping, GAE, slicing, .item(), ...
              The bare loop times its own sections with the same clock. The wrappers and hooks cost well under a
              millisecond per step. "PPO-Lag's added work": the scoring and update time PPO-Lag adds (the cost
              model's forward, the cost critic's forward+backward) and PPO-Lag/PPO if it added nothing else.
  GFLOP/s     estimated FLOPs of a step / median step time. FLOPs from parameter counts x tokens: 2 N per forward
              token, 6 N per forward+backward token, N = the matmul weights (decoder layers; the LM head counted only
              at positions whose logits are needed; embeddings and attention scores not counted): generate = prefill
              + every decode token, scoring = one forward per role over prompt + response, update = forward+backward
              of every trained role. The optimizer is not counted. The bare loop gets the same count as PPO (same
              work), so its GFLOP/s ratio is the time ratio. Peak: fp32 torch.mm at 1024/2048/3072 with the same
              threads, in the parent before the runs: the fastest of 5-10 repetitions at the best size.
  memory      VmHWM of each system's subprocess (peak RSS, loading included); the peak over the timed steps alone
              (VmHWM reset through /proc/self/clear_refs after warm-up); and VmRSS after the timed steps minus after
              warm-up (anything growing per step shows up there).

It prints figures; it asserts nothing about time. Linux only (/proc). Timings on a shared machine are noisy: compare
ratios from one run, not figures across runs. On CPUs busy with other work, two threads with the default OpenMP wait
policy spin-wait for each other and steps can take 5-20x longer (measured): run with OMP_WAIT_POLICY=PASSIVE (passed
on to the subprocesses) or --threads 1 there; the table says when the load average suggests it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = "BENCH_PPO_RESULT "
SYSTEMS = ("bare", "ppo", "ppo_lag")
NAMES = {"bare": "bare", "ppo": "PPO", "ppo_lag": "PPO-Lag"}
PHASES = ("generate", "scoring", "update", "optimizer", "other")
SWEEP = ((8, 32), (16, 32), (32, 32), (8, 64), (8, 128))  # (batch, new tokens); the first is the reference


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads of every system and of the matmul peak")
    p.add_argument("--batch", type=int, default=8, help="prompts per rollout (= one PPO minibatch)")
    p.add_argument("--prompt_tokens", type=int, default=32, help="tokens of every prompt (no padding)")
    p.add_argument("--new_tokens", type=int, default=32, help="sampled tokens per response (max_new_tokens)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every system once, interleaved")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps at the start of every run")
    p.add_argument("--steps", type=int, default=24, help="timed steps per run")
    p.add_argument("--seed", type=int, default=0, help="seed of the models, the prompts and the sampling")
    p.add_argument("--sweep", action="store_true", help="instead of the table: PPO-Lag step time at batch 8/16/32 "
                   "(--new_tokens 32) and at 32/64/128 new tokens (--batch 8), with ratios to batch 8 x 32 tokens")
    p.add_argument("--only", choices=SYSTEMS, help="run one system in this process and print its figures as JSON "
                   "(what the parent runs in each subprocess)")
    p.add_argument("--model_dir", default="", help="models built by an earlier run (default: build them in a "
                   "temporary folder)")
    p.add_argument("--repo", default=str(HERE.parent), help="checkout whose train_ppo_lag / modeling / utils are "
                   "measured (the bare loop is always this file's)")
    p.add_argument("--trainer_args", default="", help="extra train_ppo_lag options for the ppo and ppo_lag systems, "
                   "as one string, e.g. --trainer_args='--compile' or --trainer_args='--lora_r 8' (give --warmup "
                   "enough steps to cover a compilation)")
    p.add_argument("--profile", choices=("torch", "cprofile"), help="with --only: profile the timed steps instead "
                   "of reporting JSON (torch.profiler: top operators per phase; cProfile: top Python functions)")
    p.add_argument("--profile_rows", type=int, default=15, help="rows per profile table")
    opts = p.parse_args(argv)
    if min(opts.threads, opts.batch, opts.prompt_tokens, opts.new_tokens, opts.rounds, opts.steps) < 1 or opts.warmup < 0:
        p.error("--threads, --batch, --prompt_tokens, --new_tokens, --rounds and --steps must be >= 1, --warmup >= 0")
    return opts


# ==========================================================================================================
# Memory and the phase clock
# ==========================================================================================================


def proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


class PhaseClock:
    """Exclusive wall-clock time per label: entering a region pauses the enclosing one, so the totals of one step
    add up to its wall clock. `context` (rollout / update) says which of our functions is running."""

    def __init__(self):
        self.totals = collections.defaultdict(float)
        self.stack: list[str] = []
        self.contexts: list[str] = []
        self.records: list = []
        self.last = 0.0
        self.profiler_labels = False  # torch.profiler: also open a record_function per region

    def enter(self, label: str) -> None:
        now = time.perf_counter()
        if self.stack:
            self.totals[self.stack[-1]] += now - self.last
        record = None
        if self.profiler_labels and label != self.top:
            import torch

            record = torch.autograd.profiler.record_function(f"phase::{label}")
            record.__enter__()
        self.stack.append(label)
        self.records.append(record)
        self.last = time.perf_counter() if record is not None else now  # profiling: its own cost goes nowhere

    def exit(self) -> None:
        now = time.perf_counter()
        self.totals[self.stack.pop()] += now - self.last
        record = self.records.pop()
        if record is not None:
            record.__exit__(None, None, None)
            now = time.perf_counter()
        self.last = now

    @property
    def top(self) -> str | None:
        return self.stack[-1] if self.stack else None

    @property
    def context(self) -> str | None:
        return self.contexts[-1] if self.contexts else None

    @contextlib.contextmanager
    def region(self, label: str):
        self.enter(label)
        try:
            yield
        finally:
            self.exit()

    def take(self) -> dict:
        totals, self.totals = dict(self.totals), collections.defaultdict(float)
        return {phase: totals.get(phase, 0.0) for phase in PHASES}


# ==========================================================================================================
# Models, built offline
# ==========================================================================================================


def pseudo_corpus(seed: int) -> list[str]:
    """Seeded pseudo-words (plus the toy world's sentences): enough variety for a 1024-token BPE vocabulary."""
    import random

    from tiny_models import default_corpus

    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "qu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    return default_corpus() + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]


def build_models(out: Path, seed: int) -> dict:
    """policy/ (Llama, vocabulary 1024, hidden 256, intermediate 512, 4 layers, 8 heads / 4 KV heads) with its
    tokenizer, rm/ and cm/ (ScoreModel on the policy, saved), as the tests build theirs."""
    import torch
    import transformers as tf

    from modeling import ScoreModel
    from tiny_models import train_tokenizer

    tokenizer = train_tokenizer(pseudo_corpus(seed), "text", 1024)
    if len(tokenizer) != 1024:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens, expected 1024")
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                            tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    policy = out / "policy"
    model = tf.LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(policy), safe_serialization=True)
    tokenizer.save_pretrained(str(policy))
    for offset, name in ((1, "rm"), (2, "cm")):
        torch.manual_seed(seed + offset)
        score, processor = ScoreModel.from_pretrained(str(policy), dtype="float32")
        score.save_pretrained(str(out / name), processor)
    return {"policy": str(policy), "rm": str(out / "rm"), "cm": str(out / "cm")}


def model_paths(model_dir: str) -> dict:
    return {name: str(Path(model_dir) / name) for name in ("policy", "rm", "cm")}


def make_prompts(policy_dir: str, batch: int, prompt_tokens: int, seed: int):
    """(B, prompt_tokens) ids drawn uniformly from the vocabulary without its special tokens, seeded."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    special = set(tokenizer.all_special_ids) | {i for t, i in tokenizer.get_added_vocab().items()}
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(len(allowed), (batch, prompt_tokens), generator=generator)]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ==========================================================================================================
# FLOPs (estimate) and the matmul peak
# ==========================================================================================================


def matmul_weights(model) -> tuple[int, int]:
    """(weights of the decoder layers' matmuls, weights of the LM head) of a Llama causal LM."""
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    head = model.lm_head.weight.numel() if hasattr(model, "lm_head") else 0
    return layers, head


def step_flops(layers: int, head: int, batch: int, prompt: int, new: int, cost_roles: bool) -> dict:
    """FLOPs of one PPO step by phase (estimate, see the module docstring): `layers` the decoder matmul weights (the
    same for every role), `head` the LM head's; generate: prefill + decode positions through the layers, LM head at
    the `new` sampling positions; scoring: reference (LM head at the response positions), reward model, reward
    critic (+ cost model, cost critic); update: forward+backward of the actor and the critic(s)."""
    seq = prompt + new
    generate = 2 * layers * batch * (prompt + new - 1) + 2 * head * batch * new
    score_roles = 2 + (2 if cost_roles else 0)  # reward model, reward critic (+ cost model, cost critic)
    scoring = (2 * layers * batch * seq + 2 * head * batch * new) + score_roles * 2 * layers * batch * seq
    critics = 2 if cost_roles else 1
    update = (6 * layers * batch * seq + 6 * head * batch * new) + critics * 6 * layers * batch * seq
    return {"generate": generate, "scoring": scoring, "update": update, "total": generate + scoring + update}


def matmul_peak_gflops(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    best = {}
    for n in (1024, 2048, 3072):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        times = []
        for _ in range(10 if n < 3072 else 5):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        best[n] = 2 * n ** 3 / min(times) / 1e9  # the fastest repetition: what the cores can do (shared machine)
    size = max(best, key=best.get)
    return {"gflops": best[size], "size": size, "by_size": {str(k): round(v, 1) for k, v in best.items()}}


# ==========================================================================================================
# Our step: train_ppo_lag's functions, instrumented from outside
# ==========================================================================================================


def instrument(clock: PhaseClock, roles, optimizers) -> None:
    """Wrap the trainer's functions and the roles' methods (in this process only) so that the clock attributes
    each step's time to the phases (see the module docstring). The trainer's files are not touched."""
    import torch

    import modeling
    import train_ppo_lag as T

    def wrap(owner, name, label_of, context=None):
        fn = getattr(owner, name, None)
        if fn is None or getattr(fn, "_bench_ppo", False):
            return

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if context is not None:
                clock.contexts.append(context)
            try:
                with clock.region(label_of()):
                    return fn(*args, **kwargs)
            finally:
                if context is not None:
                    clock.contexts.pop()

        timed._bench_ppo = True
        setattr(owner, name, timed)

    keep = lambda: clock.top or "other"  # a context marker: its own time stays with the enclosing region
    wrap(T, "rollout", keep, context="rollout")
    wrap(T, "ppo_update", keep, context="update")

    def work() -> str:
        """Forward work: inside generate it is generate's; otherwise scoring (rollout) or update (ppo_update)."""
        if clock.top in ("generate", "optimizer"):
            return clock.top
        return {"rollout": "scoring", "update": "update"}.get(clock.context, clock.top or "other")

    for module in (T, modeling):
        wrap(module, "generate", lambda: "generate")
    for name in ("policy_log_probs", "token_log_probs", "critic_values", "end_score", "actor_loss", "critic_loss"):
        wrap(T, name, work)
    wrap(torch.autograd, "backward", lambda: "update" if clock.context == "update" else work())
    wrap(torch.nn.utils, "clip_grad_norm_", lambda: "optimizer")
    models = [m for m in vars(roles).values() if isinstance(m, torch.nn.Module)]
    for model in models:
        wrap(model, "generate", lambda: "generate")
        model.register_forward_pre_hook(lambda *_: clock.enter(work()))
        model.register_forward_hook(lambda *_: clock.exit())
    for optimizer, _ in optimizers.values():
        optimizer.register_step_pre_hook(lambda *_: clock.enter("optimizer"))
        optimizer.register_step_post_hook(lambda *_: clock.exit())
        wrap(optimizer, "zero_grad", lambda: "optimizer")


def ours(opts, paths: dict, algo: str, clock: PhaseClock):
    """A step function running train_ppo_lag's PPO step as main() does; returns (step, info)."""
    import collections as co

    import torch

    import train_ppo_lag as T
    from infra import ppo_setup as S
    from infra.cli import parse_args
    from infra.optim import NonFiniteGuard
    from infra.runlog import quiet_transformers

    quiet_transformers()
    total_steps = opts.warmup + opts.steps
    args = parse_args(T.Args, [
        "--algo", algo, "--actor_model_name_or_path", paths["policy"], "--reward_model_name_or_path", paths["rm"],
        "--cost_model_name_or_path", paths["cm"] if algo == "ppo_lag" else "",
        "--per_device_prompt_batch_size", str(opts.batch), "--per_device_train_batch_size", str(opts.batch),
        "--update_iters", "1", "--max_new_tokens", str(opts.new_tokens), "--temperature", "1.0",
        "--dtype", "float32", "--max_steps", str(total_steps), "--seed", str(opts.seed),
        *shlex.split(opts.trainer_args)])
    S.check_args(args)
    device = torch.device("cpu")
    roles, processor, family = S.load_roles(args, device, None)
    trained = roles.trained()
    # as main() makes them
    updates = total_steps * (S.minibatches_per_rollout(args.update_iters, args.per_device_prompt_batch_size,
                                                       args.per_device_train_batch_size,
                                                       args.gradient_accumulation_steps)
                             // args.gradient_accumulation_steps)
    optimizers = S.make_optimizers(trained, args, updates)
    instrument(clock, roles, optimizers)
    prompts = make_prompts(paths["policy"], opts.batch, opts.prompt_tokens, opts.seed)
    fresh = S.fresh_state(args)
    state = {"step": 0, "lambda": fresh["lambda"], "window": co.deque(maxlen=args.episode_cost_window_size),
             "pid": fresh["pid"], "guard": NonFiniteGuard(args.max_nonfinite_steps)}
    seen = {"response_tokens": [], "ended": []}

    def step():
        r, state["lambda"], _, _ = T.ppo_iteration(roles, trained, optimizers, processor, family, prompts,
                                                   state["lambda"], state["window"], state["pid"], state["step"],
                                                   state["guard"], None, args)
        state["step"] += 1
        seen["response_tokens"].append(float(r.mask.sum(-1).float().mean()))
        seen["ended"].append(float(r.batch["ended"].float().mean()))

    layers, head = matmul_weights(roles.actor)
    optimizer = optimizers["actor"][0]
    flavour = [k for k in ("fused", "foreach") if optimizer.defaults.get(k)] or ["for-loop"]
    return step, {"layers": layers, "head": head, "seen": seen,
                  "optimizer": f"{type(optimizer).__name__} ({flavour[0]}) x {len(optimizers)}"}


# ==========================================================================================================
# The bare loop: the same work, nothing else
# ==========================================================================================================


def bare(opts, paths: dict, clock: PhaseClock):
    """The cost floor of one PPO step (reward only, as --algo ppo), self-contained; returns (step, info)."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging

    logging.set_verbosity_error()
    lr, beta, gamma, lam_gae, eps, eps_v = 5e-7, 0.02, 1.0, 0.95, 0.2, 5.0
    tokenizer = AutoTokenizer.from_pretrained(paths["policy"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    actor = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=torch.float32).eval().requires_grad_(False)

    def score_model(path: str, trained: bool):
        backbone = AutoModel.from_pretrained(path, dtype=torch.float32)
        head = torch.nn.Linear(backbone.config.hidden_size, 1)
        head.load_state_dict(load_file(str(Path(path) / "score_head.safetensors")))
        model = torch.nn.ModuleDict({"backbone": backbone, "head": head})
        return model if trained else model.eval().requires_grad_(False)

    reward_model, critic = score_model(paths["rm"], False), score_model(paths["rm"], True)
    params = [p for m in (actor, critic) for p in m.parameters()]
    try:
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
        flavour = "fused"
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
        flavour = "foreach"
    sampling = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_beams=1,
                                max_new_tokens=opts.new_tokens, eos_token_id=eos, pad_token_id=pad, use_cache=True,
                                output_scores=True, return_dict_in_generate=True)
    actor.generation_config = GenerationConfig()
    prompts = make_prompts(paths["policy"], opts.batch, opts.prompt_tokens, opts.seed)
    P = prompts["input_ids"].shape[1]
    seen = {"response_tokens": [], "ended": []}

    def values_of(model, ids, attention):  # V(s_t) for the actions t = P .. L-1: scores at positions P-1 .. L-2
        hidden = model["backbone"](input_ids=ids, attention_mask=attention).last_hidden_state
        return model["head"](hidden[:, P - 1:-1]).squeeze(-1)

    def step():
        # 1. sample, with the old log-probs from generate's scores
        actor.eval()
        with torch.no_grad():
            with clock.region("generate"):
                out = actor.generate(**prompts, generation_config=sampling)
                response = out.sequences[:, P:]
                old_log_probs = torch.stack(out.scores, 1).float().log_softmax(-1).gather(
                    -1, response.unsqueeze(-1)).squeeze(-1)
            T = response.shape[1]
            is_eos = response == eos
            mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # up to and including the first EOS
            ids = torch.cat([prompts["input_ids"], response.masked_fill(~mask, pad)], 1)
            attention = torch.cat([prompts["attention_mask"], mask.long()], 1)
            fmask = mask.float()
            # 2. reference log-probs, end reward, values: one forward each
            with clock.region("scoring"):
                ref_logits = reference(input_ids=ids, attention_mask=attention, logits_to_keep=T + 1).logits[:, :-1]
                ref_log_probs = ref_logits.float().log_softmax(-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
                last = mask.sum(-1) - 1  # last real response token (column)
                hidden = reward_model["backbone"](input_ids=ids, attention_mask=attention).last_hidden_state
                end_reward = reward_model["head"](hidden[torch.arange(ids.shape[0]), P + last]).squeeze(-1)
                old_values = values_of(critic, ids, attention)
            # 3. KL-shaped reward, 4. GAE as one matmul: A_t = sum_{s >= t} (gamma lambda)^(s-t) delta_s
            rewards = (-beta * (old_log_probs - ref_log_probs) * fmask).scatter_add(
                1, last.unsqueeze(1), end_reward.unsqueeze(1))
            v = old_values * fmask
            delta = (rewards + gamma * F.pad(v[:, 1:], (0, 1)) - v) * fmask
            t = torch.arange(T)
            weights = ((gamma * lam_gae) ** (t.view(1, -1) - t.view(-1, 1)).clamp(min=0).float()) * (
                t.view(1, -1) >= t.view(-1, 1))
            advantages = (delta @ weights.T) * fmask
            returns = advantages + v
        # 6-7. one forward+backward of policy + value with the clipped losses, 8. one AdamW step
        actor.train()
        with clock.region("update"):
            logits = actor(input_ids=ids, attention_mask=attention, logits_to_keep=T + 1).logits[:, :-1]
            log_probs = logits.float().log_softmax(-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
            ratio = torch.exp(log_probs - old_log_probs)
            surrogate = torch.min(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)
            count = fmask.sum(-1).clamp(min=1)
            loss_actor = -((surrogate * fmask).sum(-1) / count).mean()
            values = values_of(critic, ids, attention)
            clipped = old_values + (values - old_values).clamp(-eps_v, eps_v)
            loss_critic = 0.5 * ((torch.max((values - returns) ** 2, (clipped - returns) ** 2) * fmask).sum(-1)
                                 / count).mean()
            (loss_actor + loss_critic).backward()
        with clock.region("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seen["response_tokens"].append(float(fmask.sum(-1).mean()))
        seen["ended"].append(float(is_eos.any(-1).float().mean()))

    layers, head = matmul_weights(actor)
    return step, {"layers": layers, "head": head, "seen": seen, "optimizer": f"AdamW ({flavour})"}


# ==========================================================================================================
# One system in this process (--only)
# ==========================================================================================================


def run_one(opts) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, opts.repo)
    import torch

    torch.set_num_threads(opts.threads)
    clock = PhaseClock()
    with contextlib.ExitStack() as stack:
        model_dir = build_or_reuse(opts, stack)
        paths = model_paths(model_dir)
        if opts.only == "bare":
            step, info = bare(opts, paths, clock)
        else:
            step, info = ours(opts, paths, opts.only, clock)
        rss_loaded = rss_after_warmup = proc_status_mib("VmRSS")
        peak_before, peak_reset = proc_status_mib("VmHWM"), False
        times, cpu_times, phases = [], [], []
        for i in range(opts.warmup + opts.steps):
            if i == opts.warmup:
                rss_after_warmup, peak_before = proc_status_mib("VmRSS"), proc_status_mib("VmHWM")
                peak_reset = reset_peak_rss()
                if opts.profile:
                    return profile(opts, step, clock, i)
            torch.manual_seed(opts.seed * 1000 + i)  # the same sampling seeds in every system and every round
            clock.take()
            start, cpu_start = time.perf_counter(), time.process_time()
            with clock.region("other"):
                step()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            phases.append(clock.take())
        peak_timed = proc_status_mib("VmHWM")
        timed = slice(opts.warmup, None)
        seen = info.pop("seen")
        return {
            "system": opts.only, "batch": opts.batch, "prompt_tokens": opts.prompt_tokens,
            "new_tokens": opts.new_tokens, "threads": opts.threads, "times": times[timed], "cpu_times": cpu_times[timed],
            "phases": phases[timed],
            "warmup_times": times[:opts.warmup], "rss_loaded_mib": rss_loaded, "rss_after_warmup_mib": rss_after_warmup,
            "rss_end_mib": proc_status_mib("VmRSS"), "peak_rss_mib": max(peak_before, peak_timed),
            "peak_timed_rss_mib": peak_timed if peak_reset else None, "response_tokens": statistics.mean(seen["response_tokens"]),
            "eos_rate": statistics.mean(seen["ended"]), "torch": torch.__version__, **info,
            "flops": step_flops(info["layers"], info["head"], opts.batch, opts.prompt_tokens, opts.new_tokens,
                                opts.only == "ppo_lag"),
        }


def profile(opts, step, clock: PhaseClock, first: int) -> dict:
    """Profile opts.steps steps (after warm-up) and print the top costs: torch.profiler per phase, or cProfile."""
    import torch

    def steps():
        for i in range(first, first + opts.steps):
            torch.manual_seed(opts.seed * 1000 + i)
            with clock.region("other"):
                step()

    if opts.profile == "cprofile":
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(steps)
        stats = pstats.Stats(profiler).strip_dirs()
        print(f"\n## cProfile of {opts.steps} steps of {opts.only}: top functions by own time")
        stats.sort_stats("tottime").print_stats(opts.profile_rows)
        print("\n## ... by cumulative time")
        stats.sort_stats("cumulative").print_stats(opts.profile_rows)
        return {}
    from torch.profiler import ProfilerActivity, profile as torch_profile

    clock.profiler_labels = True
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        steps()
    clock.profiler_labels = False
    events = prof.events()
    # every operator event, attributed to the innermost phase::* range that contains it (same thread)
    ranges = sorted(((e.time_range.start, e.time_range.end, e.name.split("::", 1)[1], e.thread) for e in events
                     if e.name.startswith("phase::")), key=lambda r: r[0])
    per_phase = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
    for e in events:
        if e.name.startswith("phase::"):
            continue
        phase, width = "other", float("inf")
        for lo, hi, label, thread in ranges:
            if lo > e.time_range.start:
                break
            if e.time_range.end <= hi and hi - lo < width and thread == e.thread:
                phase, width = label, hi - lo
        cell = per_phase[phase][e.name]
        cell[0] += e.self_cpu_time_total / 1000  # ms (self time: children not double counted)
        cell[1] += 1
    totals = {p: sum(v[0] for v in ops.values()) for p, ops in per_phase.items()}
    print(f"\n## torch.profiler, {opts.steps} steps of {opts.only} (batch {opts.batch}, {opts.new_tokens} new tokens): "
          "operator self CPU time per phase, ms per step")
    for phase in PHASES:
        ops = per_phase.get(phase)
        if not ops:
            continue
        print(f"\n### {phase}: {totals[phase] / opts.steps:.1f} ms/step of operator self time")
        print("| operator | ms/step | calls/step |\n|---|---|---|")
        for name, (ms, calls) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:opts.profile_rows]:
            print(f"| {name} | {ms / opts.steps:.2f} | {calls / opts.steps:.0f} |")
    return {}


# ==========================================================================================================
# The parent: subprocesses, interleaved, and the tables
# ==========================================================================================================


def child(opts, system: str, model_dir: str, batch: int, new_tokens: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", system, "--model_dir", model_dir,
           "--threads", str(opts.threads), "--batch", str(batch), "--prompt_tokens", str(opts.prompt_tokens),
           "--new_tokens", str(new_tokens), "--warmup", str(opts.warmup), "--steps", str(opts.steps),
           "--seed", str(opts.seed), "--repo", opts.repo, f"--trainer_args={opts.trainer_args}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads),
               TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"the {system} subprocess failed (exit status {done.returncode})")
    return json.loads(lines[-1][len(RESULT):])


def summarise(runs: list[dict]) -> dict:
    medians = [statistics.median(r["times"]) for r in runs]
    every = [t for r in runs for t in r["times"]]
    phases = {p: [s[p] for r in runs for s in r["phases"]] for p in PHASES}
    mean_step = statistics.mean(every)
    return {
        "median": statistics.median(medians), "min": min(every), "run_medians": medians, "mean": mean_step,
        "cpu": statistics.median(statistics.median(r["cpu_times"]) for r in runs),
        "phase_median": {p: statistics.median(v) for p, v in phases.items()},
        "phase_share": {p: statistics.mean(v) / mean_step for p, v in phases.items()},
        "peak_rss": max(r["peak_rss_mib"] for r in runs),
        "peak_timed": max(r["peak_timed_rss_mib"] for r in runs) if all(r["peak_timed_rss_mib"] for r in runs) else None,
        "growth": statistics.median(r["rss_end_mib"] - r["rss_after_warmup_mib"] for r in runs),
        "flops": runs[0]["flops"], "response_tokens": statistics.mean(r["response_tokens"] for r in runs),
        "eos_rate": statistics.mean(r["eos_rate"] for r in runs), "optimizer": runs[0]["optimizer"],
        "drift": statistics.median(statistics.median(r["times"][len(r["times"]) // 2:])
                                   / statistics.median(r["times"][:max(1, len(r["times"]) // 2)]) for r in runs),
    }


def build_or_reuse(opts, stack: contextlib.ExitStack) -> str:
    if opts.model_dir:
        if not (Path(opts.model_dir) / "policy" / "config.json").is_file():
            build_models(Path(opts.model_dir), opts.seed)
        return opts.model_dir
    model_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_ppo_"))
    build_models(Path(model_dir), opts.seed)
    return model_dir


def header(opts, peak: dict, started: float, load_start: tuple) -> str:
    import platform

    import torch
    import transformers

    load = lambda avg: " / ".join(f"{x:.2f}" for x in avg)
    busy = max(load_start[0], os.getloadavg()[0]) > (os.cpu_count() or 1) - 0.5
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    note = ("\nnote: the machine was busy (load average near or above the CPU count). With more than one thread and "
            "OMP_WAIT_POLICY unset or ACTIVE, OpenMP threads spin-wait for each other while the CPUs are shared, and "
            "step times can grow several-fold; OMP_WAIT_POLICY=PASSIVE or --threads 1 give steadier figures there."
            if busy and opts.threads > 1 and policy.upper() != "PASSIVE" else "")
    return (f"bench_ppo: torch {torch.__version__}, transformers {transformers.__version__}, {opts.threads} threads "
            f"(OMP_WAIT_POLICY {policy}), {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), nice "
            f"{os.nice(0)}; load average (1/5/15 min) at the start {load(load_start)}, at the end "
            f"{load(os.getloadavg())}; {opts.rounds} rounds x ({opts.warmup} warm-up + {opts.steps} timed steps) per "
            f"run; {time.time() - started:.0f} s in all{note}\n"
            f"trainer: {opts.repo}{' with ' + opts.trainer_args if opts.trainer_args else ''}\n"
            f"matmul peak: {peak['gflops']:.1f} GFLOP/s (fp32 torch.mm {peak['size']}^3; by size {peak['by_size']})")


def fmt_ratios(a: list[dict], b: list[dict]) -> str:
    return ", ".join(f"{statistics.median(x['times']) / statistics.median(y['times']):.2f}" for x, y in zip(a, b))


def table(opts, model_dir: str, peak: dict, started: float, load_start: tuple) -> None:
    runs = {s: [] for s in SYSTEMS}
    for round_index in range(opts.rounds):
        order = SYSTEMS[round_index % 3:] + SYSTEMS[:round_index % 3]  # rotate who goes first
        for system in order:
            runs[system].append(child(opts, system, model_dir, opts.batch, opts.new_tokens))
            print(f"  round {round_index + 1}: {NAMES[system]:8s} median "
                  f"{statistics.median(runs[system][-1]['times']):.3f} s/step", file=sys.stderr, flush=True)
    s = {name: summarise(r) for name, r in runs.items()}
    print()
    print(header(opts, peak, started, load_start))
    print(f"step: batch {opts.batch}, prompts of {opts.prompt_tokens} tokens, {opts.new_tokens} new tokens (mean "
          f"response {s['ppo']['response_tokens']:.1f} tokens, EOS in {100 * s['ppo']['eos_rate']:.1f}% of responses),"
          " one PPO epoch, one minibatch, fp32\n")
    print("| system | median s/step | min s/step | run medians | CPU s/step | GFLOP/step | GFLOP/s | % of matmul peak | peak RSS MiB "
          "| peak RSS, timed steps MiB | RSS growth over timed steps MiB | 2nd half / 1st half | optimizer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in SYSTEMS:
        x = s[name]
        flops = (s["ppo"] if name == "bare" else x)["flops"]["total"]  # bare: the same work as PPO
        gflops = flops / x["median"] / 1e9
        timed = f"{x['peak_timed']:.0f}" if x["peak_timed"] is not None else "n/a"
        print(f"| {NAMES[name]} | {x['median']:.3f} | {x['min']:.3f} | "
              f"{', '.join(f'{m:.3f}' for m in x['run_medians'])} | {x['cpu']:.3f} | {flops / 1e9:.2f} | {gflops:.2f} | "
              f"{100 * gflops / peak['gflops']:.1f}% | {x['peak_rss']:.0f} | {timed} | {x['growth']:+.1f} | "
              f"{x['drift']:.2f} | {x['optimizer']} |")
    def ratio(a: str, b: str) -> str:
        return (f"{s[a]['median'] / s[b]['median']:.2f}  (per round: {fmt_ratios(runs[a], runs[b])}; of the minima "
                f"{s[a]['min'] / s[b]['min']:.2f}; of the CPU times {s[a]['cpu'] / s[b]['cpu']:.2f})")

    print(f"\nPPO/bare     = {ratio('ppo', 'bare')}")
    print(f"PPO-Lag/PPO  = {ratio('ppo_lag', 'ppo')}; FLOP ratio "
          f"{s['ppo_lag']['flops']['total'] / s['ppo']['flops']['total']:.2f}")
    print(f"PPO-Lag/bare = {ratio('ppo_lag', 'bare')}\n")
    print("Per phase: median s/step over every timed step, and share of the mean step (exclusive time; see --help)\n")
    print("| phase | " + " | ".join(f"{NAMES[n]} s/step | {NAMES[n]} share" for n in SYSTEMS) +
          " | PPO/bare | PPO-Lag - PPO s/step | GFLOP/step PPO | GFLOP/step PPO-Lag |")
    print("|---|" + "---|---|" * len(SYSTEMS) + "---|---|---|---|")
    for phase in PHASES:
        cells = " | ".join(f"{s[n]['phase_median'][phase]:.4f} | {100 * s[n]['phase_share'][phase]:.1f}%"
                           for n in SYSTEMS)
        ratio = s["ppo"]["phase_median"][phase] / s["bare"]["phase_median"][phase] \
            if s["bare"]["phase_median"][phase] > 1e-6 else float("nan")
        f_ppo, f_lag = (s[n]["flops"].get(phase) for n in ("ppo", "ppo_lag"))
        flops = " | ".join(f"{f / 1e9:.2f}" if f is not None else "" for f in (f_ppo, f_lag))
        extra = s["ppo_lag"]["phase_median"][phase] - s["ppo"]["phase_median"][phase]
        print(f"| {phase} | {cells} | {ratio:.2f} | {extra:+.4f} | {flops} |")
    # What PPO-Lag adds is work, not overhead: the cost model's forward (scoring) and the cost critic's
    # forward+backward (update). Timed at their own measured speed they bound PPO-Lag/PPO from below.
    added = {phase: s["ppo_lag"]["phase_median"][phase] - s["ppo"]["phase_median"][phase]
             for phase in ("scoring", "update")}
    added_flops = sum(s["ppo_lag"]["flops"][p] - s["ppo"]["flops"][p] for p in added)
    print(f"\nPPO-Lag's added work: the cost model's forward (scoring {added['scoring']:+.4f} s) and the cost critic's "
          f"forward+backward (update {added['update']:+.4f} s), {added_flops / 1e9:.2f} GFLOP at "
          f"{added_flops / max(sum(added.values()), 1e-9) / 1e9:.1f} GFLOP/s; with nothing else added, PPO-Lag/PPO "
          f"would be {1 + sum(added.values()) / s['ppo']['median']:.2f}")


def sweep(opts, model_dir: str, peak: dict, started: float, load_start: tuple) -> None:
    runs = {config: [] for config in SWEEP}
    for round_index in range(opts.rounds):
        order = SWEEP[round_index % len(SWEEP):] + SWEEP[:round_index % len(SWEEP)]
        for batch, new in order:
            runs[(batch, new)].append(child(opts, "ppo_lag", model_dir, batch, new))
            print(f"  round {round_index + 1}: PPO-Lag batch {batch:2d}, {new:3d} new tokens: median "
                  f"{statistics.median(runs[(batch, new)][-1]['times']):.3f} s/step", file=sys.stderr, flush=True)
    s = {config: summarise(r) for config, r in runs.items()}
    base = s[SWEEP[0]]
    print()
    print(header(opts, peak, started, load_start))
    print(f"PPO-Lag step, prompts of {opts.prompt_tokens} tokens; ratios to batch {SWEEP[0][0]} x {SWEEP[0][1]} new "
          "tokens. 'work' = the FLOP ratio; time ratio / work ratio < 1 means the larger step is more efficient\n")
    print("| batch | new tokens | median s/step | min s/step | CPU s/step | time ratio | ratio of minima | work ratio | "
          "time / work | GFLOP/s | generate | scoring | update | optimizer | other | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (batch, new), x in s.items():
        ratio, work = x["median"] / base["median"], x["flops"]["total"] / base["flops"]["total"]
        shares = " | ".join(f"{100 * x['phase_share'][p]:.0f}%" for p in PHASES)
        print(f"| {batch} | {new} | {x['median']:.3f} | {x['min']:.3f} | {x['cpu']:.3f} | {ratio:.2f} | "
              f"{x['min'] / base['min']:.2f} | {work:.2f} | {ratio / work:.2f} | "
              f"{x['flops']['total'] / x['median'] / 1e9:.2f} | {shares} | {x['peak_rss']:.0f} |")
    print("\n(generate ... other: each phase's share of the mean step)")


def main() -> None:
    opts = parse()
    if opts.only:
        result = run_one(opts)
        if not opts.profile:
            print(RESULT + json.dumps(result))
        return
    if opts.profile:
        raise SystemExit("--profile needs --only SYSTEM")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started, load_start = time.time(), os.getloadavg()
    sys.path.insert(0, str(HERE.parent))  # the models are built with this checkout's modeling / tiny_models
    with contextlib.ExitStack() as stack:
        model_dir = build_or_reuse(opts, stack)
        peak = matmul_peak_gflops(opts.threads)
        (sweep if opts.sweep else table)(opts, model_dir, peak, started, load_start)


if __name__ == "__main__":
    main()
