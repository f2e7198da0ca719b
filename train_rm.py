"""Stage 1: the reward model RM-V (helpfulness) on BeaverTails-V helpfulness pairs.

    L_R = -log sigma(R(y_w) - R(y_l)) + reg * mean(R(y_w)^2 + R(y_l)^2) / 2          (paper section 2, RM-V)

R is a score model (modeling.ScoreModel): the whole VLM with a linear head read at the last non-pad token. It starts
from a policy checkpoint (a new head) and trains with the vision tower frozen. The loss (score_training.reward_loss),
the options and the training loop are the cost model's too: they live in score_training.py.

    python train_rm.py --model_name_or_path runs/sft --train_data data/toy/pairs --output_dir runs/rm

--preference safe trains the same model on the safety annotation (chosen = the safer response): the reward of the
paper's single-dimension RLHF baseline on safety (plain PPO, train_ppo_lag.py --algo ppo, on it).
"""

from __future__ import annotations

import dataclasses

from data import PREFERENCES
from infra.cli import arg, run_script
from infra.runlog import quiet_transformers
from score_training import ScoreArgs, reward_objective, train_score_model


@dataclasses.dataclass
class Args(ScoreArgs):
    """Train the reward model (Bradley-Terry on helpfulness pairs + score regularisation)."""

    preference: str = arg("helpful", "which annotation makes the chosen response: helpful (the paper's RM-V: "
                                     "more_helpful_response_id) or safe (safer_response_id: a reward model of safety "
                                     "alone, for the single-dimension RLHF baseline, plain PPO on it)")


def main(args: Args) -> dict:
    if args.preference not in PREFERENCES:
        raise SystemExit(f"--preference must be helpful or safe, got {args.preference!r}")
    quiet_transformers()
    return train_score_model(args, reward_objective(args.regularization, args.preference), "reward_model")


if __name__ == "__main__":
    run_script(main, Args)
