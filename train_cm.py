"""Stage 2: the cost model CM-V (harm; C > 0 means harmful) on BeaverTails-V safety pairs.

    L_C = -log sigma(C(y_h) - C(y_s))                       pairwise: the less safe response costs more
          - mean log sigma(s_h * C(y_h)) - mean log sigma(s_s * C(y_s))      graded sign term
          + reg * mean(C^2)                                  regularisation                  (paper section 2, CM-V)

with s = -harmless_rate in {-3..3} (harmful -> s > 0 pushes C up, harmless -> s < 0 pushes C down, a bare refusal
rated 0 -> s = 0 contributes no gradient), or s = +-1 from the binary is_safe label (--sign_source binary, the text
Safe RLHF form). Same score model and training loop as the reward model (train_rm.train_score_model).

    python train_cm.py --model_name_or_path runs/sft --train_data data/toy/pairs --output_dir runs/cm
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import train_rm
from data import cost_pair
from infra.cli import arg, run_script
from infra.runlog import quiet_transformers


@dataclasses.dataclass
class Args(train_rm.Args):
    """Train the cost model (pairwise + graded sign term + score regularisation)."""

    output_dir: str = arg("runs/cm", "receives args.json, metrics.jsonl, summary.json and the score model")
    lr_scheduler: str = arg("cosine", "transformers schedule (the paper: cosine for CM)")
    sign_source: str = arg("rate", "rate: s = -harmless_rate (graded); binary: s = +-1 from is_response_k_safe")


# ---- the math (paper section 2) ---------------------------------------------------------------------------


def cost_loss(higher: torch.Tensor, safer: torch.Tensor, higher_sign: torch.Tensor, safer_sign: torch.Tensor,
              regularization: float) -> torch.Tensor:
    """CM-V loss on a batch of pairs (higher-cost response y_h, safer response y_s) with safety signs s."""
    pairwise = -F.logsigmoid(higher - safer).mean()
    sign_term = -F.logsigmoid(higher_sign * higher).mean() - F.logsigmoid(safer_sign * safer).mean()
    return pairwise + sign_term + regularization * ((higher**2 + safer**2) / 2).mean()


def sign_correct(costs: torch.Tensor, is_safe: torch.Tensor) -> torch.Tensor:
    """Per response: does sign(C) agree with the label? C > 0 for unsafe, C < 0 for safe (C = 0 is wrong)."""
    return torch.where(is_safe.bool(), costs < 0, costs > 0).float()


def cost_objective(args):
    """(pair builder, batch loss, per-pair metrics) of the cost model."""

    def to_pair(row):
        p = cost_pair(row, args.sign_source)
        return {**p, "first": p["higher_cost"], "second": p["safer"], "first_sign": p["higher_cost_sign"],
                "second_sign": p["safer_sign"], "first_is_safe": p["higher_cost_is_safe"],
                "second_is_safe": p["safer_is_safe"]}

    def loss_fn(higher, safer, batch):
        return cost_loss(higher, safer, batch["first_sign"], batch["second_sign"], args.regularization)

    def metrics_fn(higher, safer, batch):
        sign = (sign_correct(higher, batch["first_is_safe"]) + sign_correct(safer, batch["second_is_safe"])) / 2
        return {"accuracy": train_rm.pairwise_correct(higher, safer), "sign_accuracy": sign}

    return to_pair, loss_fn, metrics_fn


def main(args: Args) -> dict:
    if args.sign_source not in ("rate", "binary"):
        raise SystemExit(f"--sign_source must be rate or binary, got {args.sign_source!r}")
    quiet_transformers()
    return train_rm.train_score_model(args, cost_objective, "cost_model")


if __name__ == "__main__":
    run_script(main, Args)
