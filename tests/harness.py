"""Test harness: fault injection and probes for the reliability and distributed tests. It lives here, not in the
training code: the tests patch it in.

In-process: `nan_on_steps(loss_fn, "3,4")` wraps a loss function so that it returns NaN at the given optimizer
steps (the test monkeypatches it over e.g. score_training.reward_loss).

As a script (also as the entry point of `torchrun`), it runs a training script unchanged except for the options
given before the script's name:

    python tests/harness.py [--pause_in_save STEP SECONDS] [--fail_save STEP] [--dump_weights]
                            [--nan_on_rank RANK FUNCTION STEPS CALLS_PER_STEP] train_script.py [options]

--pause_in_save  once checkpoint STEP has written its last file (trainer_state.json, still inside the `.tmp` folder,
                 before the rename), create PAUSED there and sleep SECONDS: a window to kill the run mid-write
--fail_save      rank 0 raises OSError("injected") while writing checkpoint STEP (as a full disk would)
--nan_on_rank    on rank RANK only, the script's loss FUNCTION (e.g. actor_loss) returns NaN at STEPS, as
                 nan_on_steps does (the other ranks see finite losses)
--dump_weights   every rank writes, at every checkpoint, the digest of every trained model's parameters to
                 <output_dir>/weights_rank<R>_step<S>.json, so that the ranks can be compared
--sample_per_prompt
                 PPO samples each prompt alone, without padding, from a random stream seeded by its tokens: the
                 rollouts no longer depend on which rank (or batch) a prompt falls in, so that runs on different
                 numbers of ranks with the same global batch can be compared

Under torchrun, once the script has returned (and run_script has destroyed the process group), each rank prints
`harness: rank R gloo threads after teardown: [...]`: tests/test_distributed.py's torchrun() asserts the list is
empty after every run that succeeded (a group that outlives its teardown can abort the interpreter's exit).
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def nan_on_steps(loss_fn, steps: str, calls_per_step: int = 1):
    """loss_fn, but returning loss + NaN on the calls that fall in `steps` (1-based, comma-separated), when it is
    called `calls_per_step` times per optimizer step. The gradients stay finite (NaN + a constant): the
    non-finite guard must catch the loss itself."""
    bad = {int(s) for s in steps.split(",") if s}
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += 1
        loss = loss_fn(*args, **kwargs)
        return loss + float("nan") if (calls - 1) // calls_per_step + 1 in bad else loss

    return wrapped


def pause_in_save(step: int, seconds: float) -> None:
    """Make checkpoint `step` pause (PAUSED marker, then sleep) after its last file and before its rename."""
    from infra import checkpoint

    write_json = checkpoint.write_json

    def pausing_write_json(path, obj):
        write_json(path, obj)
        path = Path(path)
        if path.name == "trainer_state.json" and path.parent.name == f"{checkpoint.CHECKPOINT_PREFIX}{step:08d}.tmp":
            (path.parent / "PAUSED").touch()
            time.sleep(seconds)

    checkpoint.write_json = pausing_write_json


def fail_save(step: int) -> None:
    """Make rank 0's write of checkpoint `step` raise, as a full disk would."""
    from infra import checkpoint

    write_checkpoint = checkpoint._write_checkpoint

    def failing_write_checkpoint(final, checkpoint_step, *args, **kwargs):
        if checkpoint_step == step:
            raise OSError(f"injected: no space left while writing checkpoint {step}")
        return write_checkpoint(final, checkpoint_step, *args, **kwargs)

    checkpoint._write_checkpoint = failing_write_checkpoint


def weights_digest(model) -> dict:
    """name -> sha256 of the parameter's bytes (the DDP wrapper's `module.` prefix removed)."""
    model = getattr(model, "module", model)
    return {name: hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for name, p in model.named_parameters()}


def dump_weights() -> None:
    """Every rank writes the digests of the models it checkpoints (save_checkpoint is called on every rank)."""
    from infra import checkpoint

    save_checkpoint = checkpoint.save_checkpoint

    def dumping_save_checkpoint(output_dir, step, models, *args, **kwargs):
        rank = int(os.environ.get("RANK", "0"))
        digests = {name: weights_digest(model) for name, model in models.items()}
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / f"weights_rank{rank}_step{step}.json").write_text(json.dumps(digests))
        return save_checkpoint(output_dir, step, models, *args, **kwargs)

    checkpoint.save_checkpoint = dumping_save_checkpoint


def sample_per_prompt() -> None:
    """Patch train_ppo_lag.generate: each prompt row is sampled alone (its left padding removed) under
    torch.manual_seed(digest of its tokens), and the rows are put back into one batch the way generate() lays it out
    (prompts left-padded to the longest, responses right-padded)."""
    import torch

    import train_ppo_lag
    from data import select_rows

    generate = train_ppo_lag.generate

    def pad(value: torch.Tensor, left: int, right: int, fill) -> torch.Tensor:
        return torch.cat([value.new_full((1, left), fill), value, value.new_full((1, right), fill)], 1)

    def per_prompt(model, processor, family, prompt_batch, *args, **kwargs):
        outputs, prompt_lengths = [], []
        for i in range(prompt_batch["input_ids"].shape[0]):
            row = select_rows(prompt_batch, [i])
            keep = row["attention_mask"][0].bool()
            for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
                if key in row:
                    row[key] = row[key][:, keep]
            seed = int(hashlib.sha256(row["input_ids"].numpy().tobytes()).hexdigest()[:8], 16)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                outputs.append(generate(model, processor, family, row, *args, **kwargs))
            prompt_lengths.append(int(keep.sum()))
        longest_prompt = max(prompt_lengths)
        longest_response = max(o["input_ids"].shape[1] - n for o, n in zip(outputs, prompt_lengths))
        fills = {"input_ids": get_pad(processor), "attention_mask": 0, "response_mask": False,
                 "mm_token_type_ids": 0, "sampling_log_probs": 0.0}
        batch = {}
        for key, fill in fills.items():
            if key in outputs[0]:
                batch[key] = torch.cat([pad(o[key], longest_prompt - n, longest_response - (o[key].shape[1] - n
                                            + (key == "sampling_log_probs")), fill)
                                        for o, n in zip(outputs, prompt_lengths)])
        batch["ended"] = torch.cat([o["ended"] for o in outputs])
        for key in ("has_image", "pixel_values", "image_sizes", "image_grid_thw"):
            if key in outputs[0]:
                batch[key] = torch.cat([o[key] for o in outputs if key in o])
        return batch

    def get_pad(processor):
        from utils import get_tokenizer

        return get_tokenizer(processor).pad_token_id

    train_ppo_lag.generate = per_prompt


def main(argv: list[str]) -> None:
    import importlib

    sys.path.insert(0, str(ROOT))
    nan, after_import = None, []
    while argv and argv[0].startswith("--"):
        option = argv.pop(0)
        if option == "--pause_in_save":
            pause_in_save(int(argv.pop(0)), float(argv.pop(0)))
        elif option == "--fail_save":
            fail_save(int(argv.pop(0)))
        elif option == "--dump_weights":
            dump_weights()
        elif option == "--sample_per_prompt":
            after_import.append(sample_per_prompt)
        elif option == "--nan_on_rank":
            nan = (int(argv.pop(0)), argv.pop(0), argv.pop(0), int(argv.pop(0)))
        else:
            raise SystemExit(f"harness: unknown option {option}\n\n{__doc__}")
    if not argv:
        raise SystemExit(__doc__)
    # imported (not run as __main__), so that its functions can be patched; then run as its own
    # `if __name__ == "__main__"` runs it
    module = importlib.import_module(argv[0].removesuffix(".py"))
    for patch in after_import:
        patch()
    if nan is not None and int(os.environ.get("RANK", "0")) == nan[0]:
        _, function, steps, calls_per_step = nan
        setattr(module, function, nan_on_steps(getattr(module, function), steps, calls_per_step))
    from infra.cli import run_script

    sys.argv = argv
    run_script(module.main, module.Args, argv[1:])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        report_gloo_threads()


def report_gloo_threads() -> None:
    """Print `harness: rank R gloo threads after teardown: [...]`, the names of this process's threads that belong
    to a gloo group (Linux: from /proc; elsewhere nothing is printed, and the tests skip the check)."""
    if Path("/proc/self/task").is_dir():
        names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
        gloo = sorted(name for name in names if "gloo" in name)
        print(f"harness: rank {os.environ['RANK']} gloo threads after teardown: {gloo}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
