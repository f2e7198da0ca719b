"""Stage 2: the cost model CM-V (harm; C > 0 means harmful) on BeaverTails-V safety pairs.

    L_C = -log sigma(C(y_h) - C(y_s))                       pairwise: the less safe response costs more
          - mean log sigma(s_h * C(y_h)) - mean log sigma(s_s * C(y_s))      graded sign term
          + reg * mean(C^2)                                  regularisation                  (paper section 2, CM-V)

with s = -harmless_rate in {-3..3} (harmful -> s > 0 pushes C up, harmless -> s < 0 pushes C down, a bare refusal
rated 0 -> s = 0 contributes no gradient), or s = +-1 from the binary is_safe label (--sign_source binary, the text
Safe RLHF form). Same score model, options and training loop as the reward model (score_training.py, which holds
this loss too: score_training.cost_loss).

    python train_cm.py --model_name_or_path runs/sft --train_data data/toy/pairs --output_dir runs/cm
"""

from __future__ import annotations

import dataclasses

from infra.cli import arg, run_script
from infra.runlog import quiet_transformers
from score_training import ScoreArgs, cost_objective, train_score_model


@dataclasses.dataclass
class Args(ScoreArgs):
    """Train the cost model (pairwise + graded sign term + score regularisation)."""

    output_dir: str = arg("runs/cm", "receives args.json, metrics.jsonl, summary.json and the score model")
    lr_scheduler: str = arg("cosine", "transformers schedule (the paper: cosine for CM)")
    sign_source: str = arg("rate", "rate: s = -harmless_rate (graded); binary: s = +-1 from is_response_k_safe")


def main(args: Args) -> dict:
    if args.sign_source not in ("rate", "binary"):
        raise SystemExit(f"--sign_source must be rate or binary, got {args.sign_source!r}")
    quiet_transformers()
    return train_score_model(args, cost_objective(args.sign_source, args.regularization), "cost_model")


if __name__ == "__main__":
    run_script(main, Args)
