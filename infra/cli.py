"""The command line: argparse generated from a dataclass of documented options (`arg`), the options every script
takes (ModelArgs) and every trainer takes (CommonArgs), and run_script, the entry point of every stage."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from families import LORA_TARGETS
from infra.parallel import destroy_distributed


def arg(default, help: str):
    """A dataclass field with a help string (shown by --help together with its default)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ModelArgs:
    """How every script loads its models (the training scripts through CommonArgs, evaluate.py directly)."""

    max_length: int = arg(4096, "maximum prompt + response tokens (longer questions are truncated from the left)")
    dtype: str = arg("auto", "weights and compute of the (frozen) models: auto (bf16 on GPU, fp32 on CPU), float32, "
                             "bfloat16 or float16; score heads always fp32")
    quantization: str = arg("none", "none, 8bit or 4bit (bitsandbytes; the vision tower stays unquantized)")
    trust_remote_code: bool = arg(False, "allow code from the checkpoints (off: only transformers' own classes)")
    max_pixels: int = arg(0, "Qwen2(.5)-VL: resize every image to at most this many pixels (bounds its vision "
                             "tokens; 0 = the processor's own limit)")
    min_pixels: int = arg(0, "Qwen2(.5)-VL: resize every image to at least this many pixels (0 = the processor's)")


@dataclasses.dataclass
class CommonArgs(ModelArgs):
    """Options every training script takes (train_sft, train_rm, train_cm and train_ppo_lag extend this). A stage
    redeclares one only where its default or its meaning differs, with a comment saying why."""

    epochs: int = arg(3, "passes over the training data")
    max_steps: int = arg(0, "stop after N optimizer steps (0 = run all epochs); the schedule spans these N steps")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    dtype: str = arg("auto", "compute precision: auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16. Trained models "
                             "keep fp32 weights, gradients and AdamW states and run forward/backward under autocast "
                             "in this dtype; frozen models (PPO's reference, reward and cost models) are stored in it; "
                             "score heads, losses, log-softmax and the PPO math are fp32. float16 is refused (it "
                             "would need loss scaling)")
    adam_beta1: float = arg(0.9, "Adam beta1")
    adam_beta2: float = arg(0.95, "Adam beta2")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0 = off)")
    freeze_vision_tower: bool = arg(True, "keep the vision encoder frozen (the projector and language model train)")
    # Off by default: the paper states checkpointing only for the reward and cost models (train_rm turns it on).
    gradient_checkpointing: bool = arg(False, "trade compute for memory in the trained models")
    skip_invalid: bool = arg(False, "skip invalid rows (counted by reason) instead of stopping at the first")
    lora_r: int = arg(0, "LoRA rank of the trained models (0 = full fine-tuning): adapters on the language model, "
                         "base frozen in --dtype (or --quantization), the projector and score heads trained in full")
    lora_alpha: float = arg(32.0, "LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = arg(0.0, "dropout on the LoRA input (keep 0 for PPO: dropout makes the rollout's and the "
                                   "update's log-probs differ)")
    lora_target_modules: list = arg(list(LORA_TARGETS), "language-model modules that get adapters (the vision tower "
                                                         "never does)")
    merge_lora: bool = arg(False, "with --lora_r: also write the adapters merged into full weights, in "
                                  "<output_dir>/merged (the adapters are always written; on a --quantization base "
                                  "the merge is made on the base reloaded in full precision, on the CPU)")
    logging_steps: int = arg(10, "log every N optimizer steps")
    save_steps: int = arg(500, "write a checkpoint every N optimizer steps (0 = only at the end)")
    keep_checkpoints: int = arg(2, "keep the newest K checkpoints")
    resume_from: str = arg("", "'' = start fresh; auto = the newest checkpoint in output_dir; or a checkpoint folder")
    max_nonfinite_steps: int = arg(3, "stop after this many NaN/inf updates in a row (each one is skipped)")
    model_card_license: str = arg("cc-by-nc-4.0", "licence in the model cards (README.md) of saved models: that of "
                                                  "the training data; set the base model's if it is stricter")
    report_to: list = arg(["none"], "trackers that receive every logged scalar too (rank 0): none, tensorboard, "
                                    "wandb (several allowed; metrics.jsonl is always written)")
    seed: int = arg(42, "random seed (each rank adds its rank)")
    dry_run: bool = arg(False, "print the memory plan (per role and per GPU: weights, adapters, gradients, AdamW "
                               "states, activations, KV cache) from the model configs alone, without reading any "
                               "weight, and exit (memory_plan.py)")
    gpu_memory_gb: float = arg(0.0, "--dry_run: GPU memory to plan against (0 = the visible CUDA device's, if any)")
    dist_timeout_minutes: float = arg(60.0, "under torchrun: how long a rank waits for the others in a collective "
                                            "(while rank 0 writes a checkpoint or loads a model) before the run "
                                            "fails (NCCL's own default: 10)")
    fsdp: bool = arg(False, "under torchrun: shard every model over the ranks with FSDP2 (fully_shard; weights, "
                            "gradients and AdamW states 1/world_size per rank) instead of replicating it with DDP; "
                            "for full fine-tuning that does not fit one GPU (not with --lora_r or --quantization)")


def run_script(main, args_cls, argv: list[str] | None = None):
    """`python train_*.py ...`: parse the options and run main. Bad input data (a DataError: the message names the
    file, row and field) ends the run with that one line and exit status 1, not a traceback. Every rank that meets
    it prints it (another rank's own batches may hold the bad row: printed on rank 0 only, it would be lost)."""
    from data.sources import DataError

    args = parse_args(args_cls, argv)
    try:
        return main(args)
    except DataError as e:
        rank = int(os.environ.get("RANK", "0"))
        print(f"error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        raise SystemExit(1)
    finally:
        destroy_distributed()


def dry_run(args, stage: str) -> dict:
    """--dry_run: print the memory plan of `stage` (sft, rm, cm, ppo, dpo) for these options and return it."""
    from infra import memory_plan

    plan = memory_plan.plan_from_args(args, stage, gpu_memory_gb=args.gpu_memory_gb or None)
    print(memory_plan.format_plan(plan))
    return plan.to_dict()


def model_options(args) -> dict:
    """The loading options of ModelArgs that every from_pretrained call of a script takes."""
    return dict(trust_remote_code=args.trust_remote_code, max_pixels=args.max_pixels, min_pixels=args.min_pixels)


def lora_options(args) -> dict | None:
    """The LoRA options of a script's arguments (--lora_r 0: none, full fine-tuning)."""
    if not getattr(args, "lora_r", 0):
        return None
    return {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
            "target_modules": list(args.lora_target_modules)}


def _str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def parse_args(cls, argv: list[str] | None = None, description: str | None = None):
    """argparse generated from a dataclass: one --option per field, help text and default shown. A training
    script lists its own options first, then those it shares with every training script (CommonArgs)."""
    parser = argparse.ArgumentParser(
        description=description or cls.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    shared = {f.name for f in dataclasses.fields(CommonArgs)} if issubclass(cls, CommonArgs) else set()
    own = parser.add_argument_group("options of this script") if shared else parser
    common = parser.add_argument_group("options shared by every training script") if shared else parser
    hints = typing.get_type_hints(cls)  # resolves the string annotations of `from __future__ import annotations`
    for f in dataclasses.fields(cls):
        group = common if f.name in shared else own
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        ftype = hints[f.name]
        if ftype is bool:
            group.add_argument(f"--{f.name}", type=_str2bool, nargs="?", const=True, default=default, help=help_text)
        elif ftype in (int, float, str):
            group.add_argument(f"--{f.name}", type=ftype, default=default, help=help_text)
        else:  # optional str / int / float, or a list
            origin = getattr(ftype, "__args__", (str,))
            base = next((t for t in origin if t in (int, float, str)), str)
            if isinstance(default, list):
                group.add_argument(f"--{f.name}", type=base, nargs="*", default=default, help=help_text)
            else:
                group.add_argument(f"--{f.name}", type=base, default=default, help=help_text)
    return cls(**vars(parser.parse_args(argv)))
