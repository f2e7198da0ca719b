"""A prepared rehearsal of the 7B GPU path (issue 24): one command, one table.

    python scripts/gpu_rehearsal.py               # one GPU: LLaVA-1.5-7B- and Qwen2-VL-7B-shaped models
    python scripts/gpu_rehearsal.py --cpu_smoke   # the same code path with tiny models on a CPU (CI runs it)

For each model:
  1. a model of the public config's shapes (infra/configs: nothing is downloaded) with random weights, planned on
     the meta device (infra.memory_plan.build_on_meta) and materialised directly on the GPU in bf16, saved with a
     locally trained tokenizer and the family's real image processor (LLaVA: CLIP at 336 px, 576 image tokens;
     Qwen2-VL: --qwen_image_tokens per image);
  2. a LoRA reward model and a LoRA cost model on it (train_rm / train_cm, one step each): adapters on the actor's
     base, so that PPO puts all six roles on ONE base;
  3. PPO-Lag (train_ppo_lag.main, in this process), --steps steps, LoRA r 16, gradient checkpointing, on one bf16
     base, then the same on a 4-bit base. Per phase of a step (generation; scoring: old / reference log-probs,
     reward, cost and the critics' values; update) the peak memory - torch.cuda.max_memory_allocated, and reserved,
     on a GPU; on a CPU the weights and optimizer states plus infra.memory_plan.CpuPeakBytes - next to the
     --dry_run plan's figure for that phase (infra.memory_plan.plan_from_args on the same options); rollout
     tokens/s; step time;
  4. --merge_lora on those runs (--merge_models): the exported actor loaded back, checked to be full weights (not
     quantized), and its logits compared with the saved adapter applied to its base.

The table is printed and written to <output_dir>/rehearsal.md (+ rehearsal.json). The phases are measured by
wrapping train_ppo_lag's own functions for the run (generate, value_step, ppo_update, ppo_iteration), so the
code measured is the code a user runs. Steps after the first give tokens/s and step time (the first warms up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from infra.cli import arg, parse_args  # noqa: E402

GiB = 1024**3
PHASES = ("generation", "scoring", "update")
PLAN_PHASE = {"generation": "generation", "scoring": "scoring", "update": "training"}


@dataclasses.dataclass
class RehearsalArgs:
    """Rehearse the 7B path on one GPU (or, with --cpu_smoke, the same code with tiny models on a CPU)."""

    output_dir: str = arg("runs/gpu_rehearsal", "models, runs, rehearsal.md and rehearsal.json go here")
    models: list = arg(["llava-1.5-7b-hf", "Qwen2-VL-7B-Instruct"], "bundled configs (infra/configs) to rehearse")
    steps: int = arg(3, "PPO-Lag steps per run")
    max_new_tokens: int = arg(64, "tokens generated per response")
    prompt_batch: int = arg(2, "prompts per rollout (= the PPO training batch)")
    lora_r: int = arg(16, "LoRA rank of every trained role")
    qwen_image_tokens: int = arg(1024, "Qwen2-VL: image tokens per image (min_pixels = max_pixels = N x 28 x 28)")
    merge_models: list = arg(["llava-1.5-7b-hf"], "models whose two runs also export --merge_lora and reload it "
                                                  "(each export writes the whole model: 14 GB at 7B)")
    quantized_base: str = arg("4bit", "the second run's base: 4bit or 8bit ('' = bf16 only)")
    cpu_smoke: bool = arg(False, "tiny models on the CPU: the same code path, for CI (8 new tokens, LoRA r 4)")
    keep: bool = arg(False, "keep each model's folders (by default deleted once it is rehearsed: 15 GB each at 7B)")


# ---- 1. models ------------------------------------------------------------------------------------------------


def random_model(config_name: str, out: Path, device: torch.device, qwen_image_tokens: int) -> tuple[Path, dict]:
    """A model of the bundled config's shapes with random weights, built on `device` in bf16 and saved to `out`
    with a locally trained tokenizer and the family's real image processor. Returns (folder, model options)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from families import detect_family
    from infra.memory_plan import BUNDLED_CONFIGS
    from tiny_models import default_corpus, make_processor, train_tokenizer

    config = AutoConfig.from_pretrained(str(BUNDLED_CONFIGS / config_name))
    family = detect_family(config)
    tokenizer = train_tokenizer(default_corpus(), family, 512)  # the model's vocabulary stays the config's
    token_id = tokenizer.convert_tokens_to_ids
    if family in ("llava", "llava_next"):
        config.image_token_index = token_id("<image>")
    else:
        config.image_token_id, config.video_token_id = token_id("<|image_pad|>"), token_id("<|video_pad|>")
        config.vision_start_token_id, config.vision_end_token_id = (token_id("<|vision_start|>"),
                                                                    token_id("<|vision_end|>"))
    text = config.get_text_config()
    text.pad_token_id, text.eos_token_id, text.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
    torch.manual_seed(0)
    with torch.device(device):  # materialised where it runs: no 7B copy on the host
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    del model
    make_processor(family, tokenizer).save_pretrained(str(out))
    pixels = qwen_image_tokens * 28 * 28
    return out, (dict(min_pixels=pixels, max_pixels=pixels) if family.startswith("qwen") else {})


def tiny_model(config_name: str, out: Path) -> tuple[Path, dict]:
    """--cpu_smoke: the tiny model of the same family (tiny_models), built from a config and saved."""
    from tiny_models import TinyArgs, build_tiny_model, default_corpus

    family = "qwen2_vl" if config_name.lower().startswith("qwen2-vl") else "llava"
    return build_tiny_model(family, str(out), TinyArgs(), default_corpus()), {}


# ---- 2. measuring the phases of train_ppo_lag -------------------------------------------------------------------


def unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


class PhaseMeter:
    """Peak memory and time of each phase of each PPO step. CUDA: max_memory_allocated / max_memory_reserved since
    the phase began. CPU: the bytes held when the step began (weights, optimizer states) + the peak of what the phase
    allocates (CpuPeakBytes)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.records: list[dict] = []  # one per step: phase -> {peak, reserved, seconds}, tokens, prompt_tokens
        self.static = 0
        self._open = None

    def begin_step(self, roles, optimizers):
        self.records.append({"started": time.perf_counter()})
        if not self.cuda:
            models = [m for m in vars(roles).values() if isinstance(m, torch.nn.Module)]
            tensors = [t for m in models for t in (*m.parameters(), *m.buffers())]
            tensors += [v for opt, _ in optimizers.values() for state in opt.state.values() for v in state.values()]
            self.static = unique_bytes(tensors)

    def start(self, phase: str):
        from infra.memory_plan import CpuPeakBytes

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._open = CpuPeakBytes().__enter__()
        self.records[-1][phase] = {"began": time.perf_counter()}

    def stop(self, phase: str):
        entry = self.records[-1][phase]
        if self.cuda:
            torch.cuda.synchronize()
            entry.update(peak=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
        else:
            self._open.__exit__(None, None, None)
            entry.update(peak=self.static + self._open.peak, reserved=None)
            self._open = None
        entry["seconds"] = time.perf_counter() - entry.pop("began")

    def end_step(self):
        record = self.records[-1]
        record["seconds"] = time.perf_counter() - record.pop("started")


@contextlib.contextmanager
def measured(meter: PhaseMeter):
    """train_ppo_lag's step functions wrapped for one run: generation = generate (inside a PPO step), scoring =
    from its end to the end of value_step (step 2's forwards and step 4's critic values), update = ppo_update."""
    import train_ppo_lag as ppo

    originals = {name: getattr(ppo, name) for name in ("ppo_iteration", "generate", "value_step", "ppo_update")}
    in_step = [False]

    def ppo_iteration(roles, trained, optimizers, *args, **kwargs):
        meter.begin_step(roles, optimizers)
        in_step[0] = True
        try:
            return originals["ppo_iteration"](roles, trained, optimizers, *args, **kwargs)
        finally:
            in_step[0] = False
            meter.end_step()

    def generate(model, processor, family, prompt_batch, *args, **kwargs):
        if not in_step[0]:  # a held-out evaluation, not a PPO step
            return originals["generate"](model, processor, family, prompt_batch, *args, **kwargs)
        meter.start("generation")
        batch = originals["generate"](model, processor, family, prompt_batch, *args, **kwargs)
        meter.stop("generation")
        meter.records[-1].update(tokens=int(batch["response_mask"].sum()),
                                 prompt_tokens=int(prompt_batch["input_ids"].shape[1]))
        meter.start("scoring")
        return batch

    def value_step(*args, **kwargs):
        out = originals["value_step"](*args, **kwargs)
        meter.stop("scoring")
        return out

    def ppo_update(*args, **kwargs):
        meter.start("update")
        out = originals["ppo_update"](*args, **kwargs)
        meter.stop("update")
        return out

    for name, wrapper in (("ppo_iteration", ppo_iteration), ("generate", generate), ("value_step", value_step),
                          ("ppo_update", ppo_update)):
        setattr(ppo, name, wrapper)
    try:
        yield meter
    finally:
        for name, fn in originals.items():
            setattr(ppo, name, fn)


# ---- 3. the runs -------------------------------------------------------------------------------------------------


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_model(stage: str, base: Path, data: Path, out: Path, options: dict, smoke: bool) -> Path:
    """A LoRA reward (rm) or cost (cm) model on `base`, one optimizer step."""
    import train_cm
    import train_rm

    module = train_rm if stage == "rm" else train_cm
    module.main(module.Args(model_name_or_path=str(base), train_data=str(data / "pairs"), output_dir=str(out),
                            lora_r=options["lora_r"], max_steps=1, per_device_batch_size=1, eval_batch_size=2,
                            save_steps=0, dtype="float32" if smoke else "auto", **options["model"]))
    free_memory()
    return out


def ppo_run(base: Path, rm: Path, cm: Path, data: Path, out: Path, quantization: str, merge: bool,
            args: RehearsalArgs, options: dict, device: torch.device) -> dict:
    """PPO-Lag on one shared base, measured per phase; the plan of the same options; the merge check."""
    import train_ppo_lag
    from infra.memory_plan import plan_from_args

    ppo_args = train_ppo_lag.Args(
        actor_model_name_or_path=str(base), reward_model_name_or_path=str(rm), cost_model_name_or_path=str(cm),
        train_data=str(data / "pairs"), output_dir=str(out), max_steps=args.steps,
        per_device_prompt_batch_size=args.prompt_batch, per_device_train_batch_size=args.prompt_batch,
        max_new_tokens=args.max_new_tokens, lora_r=args.lora_r, gradient_checkpointing=True, save_steps=0,
        quantization=quantization, merge_lora=merge, dtype="float32" if args.cpu_smoke else "auto",
        **options["model"])
    meter = PhaseMeter(device)
    with measured(meter):
        train_ppo_lag.main(ppo_args)
    free_memory()
    steps = meter.records
    prompt_tokens = max(r["prompt_tokens"] for r in steps)
    plan = plan_from_args(ppo_args, "ppo", gpu_memory_gb=80.0, image_tokens=0, prompt_tokens=prompt_tokens,
                          response_tokens=args.max_new_tokens)
    timed = steps[1:] or steps  # the first step warms up (kernels, allocator, autotuning)
    result = {
        "base": quantization if quantization != "none" else ("fp32" if args.cpu_smoke else "bf16"),
        "prompt_tokens": prompt_tokens,
        "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["generation"]["seconds"] for r in timed),
        "step_s": statistics.median(r["seconds"] for r in timed),
        "phases": {phase: {"peak": max(r[phase]["peak"] for r in steps),
                           "reserved": max((r[phase]["reserved"] or 0) for r in steps) or None,
                           "planned": plan.phases[PLAN_PHASE[phase]] * 1.0,
                           "seconds": statistics.median(r[phase]["seconds"] for r in timed)} for phase in PHASES},
        "planned_peak": plan.peak,
    }
    if merge:
        result["merge"] = merge_check(out, device, args.cpu_smoke)
    return result


def merge_check(out: Path, device: torch.device, smoke: bool) -> dict:
    """The exported actor (<out>/actor/merged) loaded back: full weights, not quantized, and its logits against the
    saved adapter (<out>/actor) applied to its base in full precision."""
    from modeling import is_quantized, load_policy, saved_quantization

    started = time.perf_counter()
    dtype = "float32" if smoke else "bfloat16"
    merged, _, _ = load_policy(str(out / "actor" / "merged"), dtype, device)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13, 17, 19]], device=device)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits.float()
    full_weights = saved_quantization(str(out / "actor" / "merged")) is None and not is_quantized(merged)
    del merged
    free_memory()
    adapter, _, _ = load_policy(str(out / "actor"), dtype, device)
    with torch.no_grad():
        adapter_logits = adapter(input_ids=ids).logits.float()
    del adapter
    free_memory()
    return {"full_weights": full_weights, "max_logit_diff": float((merged_logits - adapter_logits).abs().max()),
            "reload_s": time.perf_counter() - started}


def rehearse(config_name: str, args: RehearsalArgs, device: torch.device) -> list[dict]:
    from data import toy_world

    root = Path(args.output_dir) / config_name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    data = root / "toy"
    toy_world.generate(str(data), seed=0, train_pairs_per_category=4, eval_pairs_per_category=1, sft_examples=4)
    started = time.perf_counter()
    if args.cpu_smoke:
        base, model_options = tiny_model(config_name, root / "base")
    else:
        base, model_options = random_model(config_name, root / "base", device, args.qwen_image_tokens)
    free_memory()
    print(f"[rehearsal] {config_name}: random model saved in {time.perf_counter() - started:.0f} s", flush=True)
    options = {"lora_r": args.lora_r, "model": model_options}
    rm = score_model("rm", base, data, root / "rm", options, args.cpu_smoke)
    cm = score_model("cm", base, data, root / "cm", options, args.cpu_smoke)
    runs = []
    for quantization in ("none", *([args.quantized_base] if args.quantized_base else [])):
        merge = config_name in args.merge_models
        result = ppo_run(base, rm, cm, data, root / f"ppo_{quantization}", quantization, merge, args, options, device)
        runs.append({"model": config_name, **result})
        print(f"[rehearsal] {config_name} {result['base']}: done", flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return runs


# ---- 4. the table ------------------------------------------------------------------------------------------------


def table(runs: list[dict], device_name: str) -> str:
    big = any(p["peak"] > GiB for run in runs for p in run["phases"].values())
    unit, scale = ("GiB", GiB) if big else ("MiB", 1024**2)  # (tiny models: MiB)
    gib = lambda v: "" if v is None else f"{v / scale:.2f}"
    lines = [f"GPU rehearsal on {device_name} (random weights)", "",
             f"| model | base | phase | peak {unit} | planned {unit} | peak / planned | reserved {unit} | phase s "
             "| tokens/s | step s | check |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for i, phase in enumerate(PHASES):
            p = run["phases"][phase]
            head = [run["model"], run["base"]] if i == 0 else ["", ""]
            speed = [f"{run['tokens_per_s']:.1f}", f"{run['step_s']:.2f}"] if i == 0 else ["", ""]
            cells = head + [phase, gib(p["peak"]), gib(p["planned"]), f"{p['peak'] / p['planned']:.2f}",
                            gib(p["reserved"]), f"{p['seconds']:.2f}"] + speed + [""]
            lines.append("| " + " | ".join(cells) + " |")
        if "merge" in run:
            m = run["merge"]
            check = ("full weights" if m["full_weights"] else "QUANTIZED") + f", max |Δ logit| {m['max_logit_diff']:.4f}"
            lines.append(f"|  |  | merge_lora + reload |  |  |  |  | {m['reload_s']:.1f} |  |  | {check} |")
    lines += ["", "peak: torch.cuda.max_memory_allocated in the phase (on a CPU: weights + optimizer states + "
              "CpuPeakBytes); planned: the --dry_run plan's figure for that phase (before its allocator margin and "
              "runtime overhead) for the same options and the measured prompt length (" +
              ", ".join(f"{r['model']} {r['prompt_tokens']} tokens" for r in runs[::max(1, len(runs) // 2)]) +
              "); reserved: torch.cuda.max_memory_reserved (the allocator margin); tokens/s, phase s and step s: "
              "medians over the steps after the first."]
    return "\n".join(lines)


def main(args: RehearsalArgs) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cpu_smoke:  # short: every op is counted in Python (CpuPeakBytes)
        args = dataclasses.replace(args, max_new_tokens=8, lora_r=4)
        device = torch.device("cpu")
        device_name = "CPU (--cpu_smoke: tiny models)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_rehearsal: no CUDA device (use --cpu_smoke to run the same code path on a CPU)")
        device = torch.device("cuda")
        device_name = torch.cuda.get_device_name(0)
    started = time.perf_counter()
    runs = [run for name in args.models for run in rehearse(name, args, device)]
    text = table(runs, device_name) + f"\n\ntotal {time.perf_counter() - started:.0f} s"
    print("\n" + text)
    out = Path(args.output_dir)
    (out / "rehearsal.md").write_text(text + "\n")
    (out / "rehearsal.json").write_text(json.dumps({"device": device_name, "runs": runs}, indent=2) + "\n")
    return runs


if __name__ == "__main__":
    main(parse_args(RehearsalArgs))
