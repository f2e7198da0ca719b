"""What a run writes besides checkpoints: args.json (and the check that a resumed run continues the same run),
metrics.jsonl, summary.json, TensorBoard / W&B trackers, model cards, the data report; rank 0 writes."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from utils import _jsonable, write_atomic, write_json

# Options a resumed run may change: where and how often it logs and saves, and held-out evaluation (own RNG).
RESUME_FREE = {"resume_from", "output_dir", "logging_steps", "save_steps", "keep_checkpoints", "report_to",
               "dist_timeout_minutes", "dry_run", "gpu_memory_gb", "model_card_license", "max_nonfinite_steps",
               "merge_lora", "eval_steps", "sample_steps", "sample_prompts", "eval_prompts", "eval_batch_size"}

# Options it may change with a warning: speed and memory knobs (the run goes on, no longer bit-identical).
RESUME_WARN = {"gradient_checkpointing", "rollout_micro_batch_size", "reuse_critic_forward", "compile",
               "old_log_probs", "fsdp"}


def resumed_args(checkpoint: Path, current: dict, rank: int = 0) -> None:
    """A resumed run must continue the run its checkpoint belongs to: its options are compared with that run's
    args.json. Changed options that shape the training (data, model, batch sizes, learning rates, steps, seed,
    algorithm, ...) stop it with one line naming them, before anything is written; speed and memory knobs
    (RESUME_WARN) are allowed with a warning; logging and saving options (RESUME_FREE) freely."""
    saved_path = Path(checkpoint).parent.parent / "args.json"
    if not saved_path.is_file():
        if rank == 0:
            print(f"warning: no args.json next to {checkpoint}: the resumed run's options cannot be compared with "
                  "the original run's", file=sys.stderr)
        return
    saved = json.loads(saved_path.read_text())
    now = json.loads(json.dumps(_jsonable(current)))
    changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k] and k not in RESUME_FREE}
    refused = {k: v for k, v in changed.items() if k not in RESUME_WARN}
    describe = lambda items: ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in items.items())
    if refused:
        raise SystemExit(f"--resume_from {checkpoint}: these options differ from the run it continues "
                         f"({saved_path}): {describe(refused)}. Resume with the run's options, or start a new run "
                         "(from the checkpoint's models if you like) in another --output_dir")
    if changed and rank == 0:
        print(f"warning: resuming with changed options ({describe(changed)}): the run goes on, but not "
              "bit-identical to an uninterrupted one", file=sys.stderr)


class RunLog:
    """The files every stage writes to --output_dir: args.json, metrics.jsonl (one object per logged step) and
    summary.json. Only rank 0 writes; every write is flushed so a crash loses nothing already logged.
    metrics.jsonl is the source of truth; with --report_to tensorboard / wandb every numeric value of every record
    also goes to the tracker under the same name (nested dicts joined with "/"), at the record's step."""

    def __init__(self, output_dir: str, args, rank: int = 0, resume: Path | str | bool | None = None):
        """resume: the checkpoint a resumed run starts from (its run's options are compared with these: resumed_args;
        trackers drop what was logged after it), or None for a fresh run."""
        self.output_dir = Path(output_dir)
        self.rank = rank
        self.lines = 0  # records written so far (a checkpoint stores it, resume truncates to it)
        args_dict = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
        # Secrets never reach a file: any option whose name says key/token/secret is masked.
        for name in args_dict:
            if name.lower().endswith(("api_key", "_token", "secret", "password")):
                args_dict[name] = "***" if args_dict[name] else args_dict[name]
        checkpoint = Path(resume) if isinstance(resume, (str, Path)) else None
        if checkpoint is not None:  # every rank: all of them stop on changed options, not rank 0 alone
            resumed_args(checkpoint, args_dict, rank)
        resume_step = json.loads((checkpoint / "trainer_state.json").read_text())["step"] if checkpoint else None
        if rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if not resume:  # a fresh run into an old folder must not mix its metrics with the old ones
                (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
            write_json(self.output_dir / "args.json", args_dict)
        self.trackers = (open_trackers(getattr(args, "report_to", []), self.output_dir, args_dict, resume_step)
                         if rank == 0 else [])

    def metrics(self, record: dict) -> None:
        self.lines += 1
        if self.rank == 0:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")
            scalars = {k: v for k, v in _flatten(record).items() if k != "step"}
            for tracker in self.trackers:
                tracker.scalars(scalars, int(record.get("step", self.lines)))

    def text(self, tag: str, markdown: str, step: int) -> None:
        """A text panel in the trackers (e.g. a markdown table of samples); nothing without one."""
        for tracker in self.trackers:
            tracker.text(tag, markdown, step)

    def truncate(self, n_lines: int) -> None:
        """On resume: keep the first n_lines records (those logged up to the checkpoint), drop what a killed run
        logged after it."""
        path = self.output_dir / "metrics.jsonl"
        if self.rank == 0 and path.is_file():
            lines = [line for line in path.read_text().splitlines() if line.strip()][:n_lines]
            write_atomic(path, "".join(line + "\n" for line in lines))
        self.lines = n_lines

    def summary(self, record: dict) -> None:
        """The final figures; closes the trackers (the run is over)."""
        if self.rank == 0:
            write_json(self.output_dir / "summary.json", record)
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def data_report(skips, stats) -> str:
    """One console line on what was done to the data: rows skipped (by reason, with the first rows named), questions
    and responses truncated to fit --max_length, images dropped for a text-only model."""
    said = {"truncated_question": "questions truncated from the left", "truncated_response":
            "responses cut on the right (no EOS)", "dropped_image": "images dropped (text-only model)"}
    changes = [f"{n} {said.get(k, k)}" for k, n in sorted(stats.items()) if n]
    return (f"data: skipped rows: {skips.report()}; "
            + ("; ".join(changes) + " (to fit --max_length where truncated)" if changes else "nothing truncated"))


def warn_overlap(eval_rows: list, train_rows: list, what: str, rank: int = 0) -> int:
    """Count the evaluation rows that are also training rows (same question, responses and image) and warn loudly:
    figures measured on them flatter the model. Returns the count (for summary.json)."""
    from data import overlapping_rows

    shared = overlapping_rows(eval_rows, train_rows)
    if shared and rank == 0:
        print(f"WARNING: {len(shared)} of {len(eval_rows)} {what} rows are also training rows (first: "
              f"{', '.join(shared[:3])}); the evaluation is not held out. Give held-out rows with --eval_data.",
              file=sys.stderr)
    return len(shared)


def write_model_card(path, stage: str, base_model: str, args, metrics: dict, datasets: list[str] = ()) -> None:
    """README.md in the Hugging Face model-card format (YAML front matter, then what it is, how it was trained, its
    final figures and how to load it), so that a saved folder pushed to a hub reads well."""
    def is_hub_id(name):
        return bool(name) and not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/"))

    front = {"base_model": base_model if is_hub_id(base_model) else None, "library_name": "transformers",
             "license": getattr(args, "model_card_license", "cc-by-nc-4.0"),
             "tags": ["safe-rlhf-v", stage.replace("_", "-"), "rlhf", "safety"],
             "datasets": [d for d in datasets if is_hub_id(d)] or None}
    lines = ["---"] + [f"{k}: {json.dumps(v)}" for k, v in front.items() if v is not None] + ["---", ""]
    loader = ("modeling.ScoreModel.from_pretrained(path)" if stage in ("reward_model", "cost_model", "reward_critic",
                                                                         "cost_critic")
              else "modeling.load_policy(path)  # or transformers' AutoModelForImageTextToText")
    options = _jsonable(dataclasses.asdict(args)) if dataclasses.is_dataclass(args) else dict(args)
    shown = {k: v for k, v in options.items() if k in _CARD_OPTIONS or k.endswith(("_model_name_or_path", "_lr"))}
    figures = {k: v for k, v in _flatten(metrics).items() if "per_category" not in k}
    lines += [f"# {stage.replace('_', ' ')} (Safe RLHF-V)", "",
              f"Trained from `{base_model}` with this repository's Safe RLHF-V implementation (stage `{stage}`).",
              "The training data of Safe RLHF-V (BeaverTails-V, PKU-SafeRLHF) is CC BY-NC 4.0; the base model's "
              "licence applies as well.", "", "## Training options", "", "| option | value |", "|---|---|"]
    lines += [f"| `{k}` | `{v}` |" for k, v in shown.items()]
    lines += ["", "## Final figures", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in figures.items()]
    lines += ["", "## Load", "", "```python", f"# from the repository root: {loader}", "```", ""]
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "README.md").write_text("\n".join(lines), encoding="utf-8")

_CARD_OPTIONS = ("algo", "train_data", "epochs", "max_steps", "lr", "lr_scheduler", "per_device_batch_size",
                 "per_device_prompt_batch_size", "gradient_accumulation_steps", "regularization", "kl_coeff",
                 "threshold", "lambda_init", "lambda_max", "lambda_lr", "dtype", "seed", "preference", "beta")


def _flatten(record: dict, prefix: str = "") -> dict:
    """{name: number} of every int/float in a (nested) record; nested names are joined with "/"."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class TensorBoardTracker:
    """Event files in <output_dir>/tensorboard (`tensorboard --logdir <output_dir>`). Resumed after step N
    (resume_step), it purges the events a killed run logged after N, which the resumed run logs again."""

    def __init__(self, output_dir: Path, config: dict, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
        purge = {} if resume_step is None else {"purge_step": resume_step + 1}
        self.writer = SummaryWriter(str(output_dir / "tensorboard"), **purge)
        if resume_step is None:
            self.writer.add_text("args", "```\n" + json.dumps(_jsonable(config), indent=2) + "\n```", 0)

    def scalars(self, values: dict, step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.writer.add_text(tag, markdown, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run in <output_dir>/wandb; WANDB_MODE=offline works without an account or network."""

    def __init__(self, output_dir: Path, config: dict, resume_step: int | None = None):
        try:
            import wandb
        except ImportError:
            raise SystemExit("--report_to wandb needs the wandb package (pip install wandb; it is optional); "
                             "set WANDB_MODE=offline to log without an account")
        self.wandb = wandb
        # one wandb run per training run: a resumed run continues the id the first one kept in the output folder
        id_file = output_dir / "wandb_run_id"
        if resume_step is None or not id_file.is_file():
            id_file.write_text(wandb.util.generate_id())
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "safe-rlhf-v"), dir=str(output_dir),
                              name=output_dir.name, config=_jsonable(config), id=id_file.read_text().strip(),
                              resume="allow")

    def scalars(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{markdown}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(report_to, output_dir: Path, config: dict, resume_step: int | None = None) -> list:
    """The trackers named by --report_to (none, tensorboard, wandb; several allowed); resume_step: the step of the
    checkpoint a resumed run starts from."""
    kinds = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}
    names = [n for n in (report_to or []) if n != "none"]
    unknown = [n for n in names if n not in kinds]
    if unknown:
        raise SystemExit(f"--report_to: unknown {unknown}; choose from none, tensorboard, wandb")
    return [kinds[n](output_dir, config, resume_step) for n in dict.fromkeys(names)]


def quiet_transformers() -> None:
    """No per-load progress bars or warnings from transformers (our own tqdm bars say what happens)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
