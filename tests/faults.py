"""Fault injection for the reliability tests. It lives here, not in the training code: the tests patch it in.

In-process: `nan_on_steps(loss_fn, "3,4")` wraps a loss function so that it returns NaN at the given optimizer
steps (the test monkeypatches it over e.g. train_rm.reward_loss).

As a script, for a run that a test kills while a checkpoint is being written:

    python tests/faults.py --pause_in_save STEP SECONDS train_ppo_lag.py [options ...]

runs the training script unchanged, except that once checkpoint STEP has written its last file (trainer_state.json,
still inside the `.tmp` folder, before the rename), it creates PAUSED there and sleeps SECONDS.
"""

import runpy
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
    import utils

    write_json = utils.write_json

    def pausing_write_json(path, obj):
        write_json(path, obj)
        path = Path(path)
        if path.name == "trainer_state.json" and path.parent.name == f"{utils.CHECKPOINT_PREFIX}{step:08d}.tmp":
            (path.parent / "PAUSED").touch()
            time.sleep(seconds)

    utils.write_json = pausing_write_json


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] != "--pause_in_save":
        raise SystemExit(__doc__)
    sys.path.insert(0, str(ROOT))
    pause_in_save(int(sys.argv[2]), float(sys.argv[3]))
    script = sys.argv[4]
    sys.argv = [script] + sys.argv[5:]
    runpy.run_path(str(ROOT / script), run_name="__main__")
