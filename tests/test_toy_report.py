"""scripts/toy_report.py check, the demo's self-check: it passes on a run that shows the paper's effect in the
figures any machine reproduces and fails, naming the claim, on one that does not; the RM/CM units are not read."""

import json
import subprocess
import sys

from conftest import ROOT


def fake_run(tmp_path, lag_harm: float) -> str:
    """A demo.sh output folder holding only what the check reads: 40 held-out prompts, PPO-Lag's answers graded
    more helpful than SFT's and with true harm `lag_harm` (SFT's: 1)."""
    run, base = tmp_path / "run", tmp_path / "base"
    for sub in ("eval", "ppo_lag"):
        (run / sub).mkdir(parents=True)
    for name in ("rm", "cm"):
        (base / name).mkdir(parents=True)
        (base / name / "summary.json").write_text(json.dumps({"eval/accuracy": 0.95}))
    answers = []
    for i in range(40):
        answers.append({"prompt_id": i, "model": "SFT", "grade": {"helpfulness": 1.0, "harm": 1.0}})
        answers.append({"prompt_id": i, "model": "PPO-Lag", "grade": {"helpfulness": 3.0, "harm": lag_harm}})
    (run / "eval" / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    # mean reward and cost in made-up units (any scale): the check must not depend on them
    models = {"SFT": {"mean_reward": 123.0, "mean_cost": -50.0, "safe_rate": 0.3, "true_harm": 1.0},
              "PPO-Lag": {"mean_reward": -7.0, "mean_cost": 40.0, "safe_rate": 0.7, "true_harm": lag_harm}}
    (run / "eval" / "scores.json").write_text(json.dumps({"models": models}))
    win = {"win_rate": 0.7, "ci95": [0.66, 0.74]}
    (run / "eval" / "winrate_PPO-Lag.json").write_text(json.dumps({"helpfulness": win, "harmlessness": win}))
    (run / "ppo_lag" / "args.json").write_text(json.dumps({"threshold": 0.0, "lambda_max": 5.0,
                                                           "reward_model_name_or_path": str(base / "rm")}))
    steps = [{"step": s, "J_C": 0.5 - 0.1 * s, "lambda": 1.0, "reward": 1.0} for s in range(1, 11)]
    (run / "ppo_lag" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    return str(run)


def check(run: str):
    return subprocess.run([sys.executable, "scripts/toy_report.py", "check", "--run", run], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)


def test_check_passes_on_the_papers_effect_whatever_the_rm_cm_units(tmp_path):
    result = check(fake_run(tmp_path, lag_harm=-2.0))
    assert result.returncode == 0, result.stdout
    assert "check: all 6 claims hold" in result.stdout
    assert "holds: PPO-Lag wins on harmlessness against SFT, whole 95% interval above 0.5 (grader): 1.000" \
        in result.stdout


def test_check_fails_and_names_the_claim_that_does_not_hold(tmp_path):
    result = check(fake_run(tmp_path, lag_harm=2.0))  # PPO-Lag more harmful than SFT, by the grader
    assert result.returncode == 1, result.stdout
    assert "DOES NOT HOLD: PPO-Lag's true harm (grader) below SFT's: 2.000 vs 1.000" in result.stdout
    assert "DOES NOT HOLD: PPO-Lag wins on harmlessness against SFT, whole 95% interval above 0.5 (grader)" \
        in result.stdout
    assert "check: 2 of 6 claims do not hold" in result.stdout


def test_table4_lists_every_method_with_its_grader_win_rates(tmp_path):
    """toy_report.py table4 (the paper's Table 4 analogue, scripts/seeds.sh): each method's win rates against SFT,
    mean ± std over the runs, and each run's with its Wilson interval, the grader's computed from the answers."""
    runs = []
    for seed, harm in ((1, -2.0), (2, 0.0)):
        run = tmp_path / f"seed{seed}"
        fake_run(run, lag_harm=harm)
        run = run / "run"
        answers = [json.loads(line) for line in (run / "eval" / "answers.jsonl").read_text().splitlines()]
        # DPO on safety: as harmless as PPO-Lag's, less helpful than SFT on 30 of the 40 prompts
        answers += [{"prompt_id": i, "model": "DPO-Safe", "grade": {"helpfulness": 0.0 if i < 30 else 2.0,
                                                                     "harm": -2.0}} for i in range(40)]
        (run / "eval" / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
        scores = json.loads((run / "eval" / "scores.json").read_text())
        scores["models"]["DPO-Safe"] = {"mean_cost": -1.0, "harmful_fraction": 0.1}
        (run / "eval" / "scores.json").write_text(json.dumps(scores))
        win = {"win_rate": 0.25, "ci95": [0.1, 0.4]}
        (run / "eval" / "winrate_DPO-Safe.json").write_text(json.dumps({"helpfulness": win, "harmlessness": win}))
        runs.append(f"{seed}={run}")
    out = tmp_path / "table4.md"
    result = subprocess.run([sys.executable, "scripts/toy_report.py", "table4", "--runs", *runs, "--output", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
    table = out.read_text()
    means = table.split("Each run")[0]  # the first table: mean ± std over the runs
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in means.splitlines() if line.startswith("| ")}
    # PPO-Lag: grader helpfulness win 1.0 in both runs; harmlessness 1.0 (harm -2 < 1) and 1.0 (0 < 1)
    assert rows["Safe RLHF-V (PPO-Lag)"][3] == "1.000 ± 0.000" and rows["Safe RLHF-V (PPO-Lag)"][4] == "1.000 ± 0.000"
    # DPO-Safe: helpfulness by the grader 10 wins / 30 losses = 0.25, harmlessness 40 / 0 = 1.0
    assert rows["DPO, safety"][3] == "0.250 ± 0.000" and rows["DPO, safety"][4] == "1.000 ± 0.000"
    assert rows["DPO, safety"][1] == "0.250 ± 0.000"  # the RM judge's, from its winrate file
    assert "RLHF (PPO), helpfulness" not in rows  # no such run: no row
    assert "| DPO, safety | 1 | 0.250 [0.100, 0.400] |" in table  # a run's row, with its interval
