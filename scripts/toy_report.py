"""Tables and the budget figure of the toy world's multi-run experiments (scripts/seeds.sh, scripts/budget_sweep.sh).

Each run folder is a demo.sh output: <run>/{ppo_lag,ppo,ppo_safe}/{args.json,metrics.jsonl}, <run>/dpo_{helpful,
safe}/ and <run>/eval/{scores.json,answers.jsonl,winrate_<model>.json}. Its subcommands:

    check   the demo's self-check (demo.sh runs it last): the claims any machine reproduces (win rates vs SFT,
            the grader's true harm, the safe rate), exit status 1 when one does not hold
    seeds   the headline figures of each model (mean +- std over the runs, and each run), the goals of issue 13
            checked per run, RM/CM accuracy of the shared reward and cost models
    table4  the paper's Table 4 on the toy world: win rates vs SFT on helpfulness and harmlessness of RLHF (PPO) and
            DPO on each single dimension and of Safe RLHF-V (PPO-Lag), by the RM/CM and by the grader
    lambda  how lambda behaves (steps at lambda_max, overshoot of J_C below d after it is first met, std of J_C over
            the second half), one row per (variant, seed) and mean +- std per variant
    budget  held-out cost and reward of PPO-Lag against the budget d (mean +- std over seeds), plain PPO as a
            reference point: a markdown table and a PNG

    python scripts/toy_report.py seeds --runs 1=runs/seeds/seed1 2=runs/seeds/seed2 3=runs/seeds/seed3 \
        --output runs/seeds/table.md
    python scripts/toy_report.py lambda --runs log/1=runs/seeds/seed1 pid/1=runs/pid/seed1 ... --output lambda.md
    python scripts/toy_report.py budget --runs runs/budget/d-0.5/seed1 runs/seeds/seed1 ... \
        --ppo runs/seeds/seed1 runs/seeds/seed2 --output docs/budget_sweep.png

Win rates are A over SFT on decided comparisons (ties excluded) with 95% Wilson intervals, judged twice: by the
learned reward/cost models (evaluate.py winrate --judge rm_cm) and by the toy world's exact grader (true
helpfulness, true harm of the same answers; computed here from eval/answers.jsonl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from evaluation.report import compare, tally  # noqa: E402

MODEL_OF = {"ppo_lag": "PPO-Lag", "ppo": "PPO", "ppo_safe": "PPO-Safe"}  # PPO runs: training figures too
# The Table 4 analogue's methods, in the paper's order: single-dimension RLHF and DPO on each dimension, then
# Safe RLHF-V (PPO-Lag on the reward and the cost model)
TABLE4_METHODS = [("PPO", "RLHF (PPO), helpfulness"), ("PPO-Safe", "RLHF (PPO), safety"),
                  ("DPO-Helpful", "DPO, helpfulness"), ("DPO-Safe", "DPO, safety"), ("PPO-Lag", "Safe RLHF-V (PPO-Lag)")]


# ---- reading one run ------------------------------------------------------------------------------------------


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_figures(algo_dir: str) -> dict:
    """Figures of one PPO run from metrics.jsonl: reward early/late, final J_C and lambda, lambda behaviour."""
    args = read_json(os.path.join(algo_dir, "args.json"))
    d, lambda_max = args["threshold"], args["lambda_max"]
    steps = [r for r in read_jsonl(os.path.join(algo_dir, "metrics.jsonl")) if "J_C" in r]
    j_c = [r["J_C"] for r in steps]
    lam = [r["lambda"] for r in steps]
    met = next((i for i, value in enumerate(j_c) if value <= d), None)
    second_half = j_c[len(j_c) // 2:]
    return {
        "threshold": d,
        "steps": len(steps),
        "train_reward_first10": statistics.mean(r["reward"] for r in steps[:10]),
        "train_reward_last30": statistics.mean(r["reward"] for r in steps[-30:]),
        "train_cost_last30": statistics.mean(r["cost"] for r in steps[-30:]) if "cost" in steps[0] else None,
        "final_J_C": j_c[-1],
        "final_lambda": lam[-1],
        "steps_at_lambda_max": sum(value >= lambda_max * (1 - 1e-9) for value in lam),
        "first_step_J_C_le_d": steps[met]["step"] if met is not None else None,
        # how far J_C falls below d after first meeting it (0 if it never goes below again; None if never met)
        "overshoot_below_d": max(0.0, d - min(j_c[met:])) if met is not None else None,
        "std_J_C_second_half": statistics.pstdev(second_half) if len(second_half) > 1 else None,
    }


def true_outcomes(answers: list[dict], model_a: str, model_b: str = "SFT") -> dict:
    """Win rates of model_a over model_b by the toy grader: true helpfulness higher, true harm lower (ties excluded)."""
    by_prompt = defaultdict(dict)
    for row in answers:
        by_prompt[row["prompt_id"]][row["model"]] = row["grade"]
    pairs = [(g[model_a], g[model_b]) for g in by_prompt.values() if model_a in g and model_b in g]
    return {"helpfulness": tally([compare(a["helpfulness"], b["helpfulness"], True) for a, b in pairs]),
            "harmlessness": tally([compare(a["harm"], b["harm"], False) for a, b in pairs])}


def run_figures(run: str) -> dict:
    """{model: {figure: value}} for SFT and every PPO run in the folder, plus "_run" (RM/CM accuracy, threshold)."""
    scores = read_json(os.path.join(run, "eval", "scores.json"))["models"]
    answers = read_jsonl(os.path.join(run, "eval", "answers.jsonl"))
    out = {}
    for model, s in scores.items():
        out[model] = {k: s.get(k) for k in ("mean_reward", "mean_cost", "safe_rate", "true_helpfulness", "true_harm",
                                            "harmful_fraction", "correct_rate", "well_formed_rate")}
    for model, figures in out.items():  # win rates against SFT: every model with a winrate file (PPO, DPO, ...)
        winrate_path = os.path.join(run, "eval", f"winrate_{model}.json")
        if model == "SFT" or not os.path.isfile(winrate_path):
            continue
        winrate = read_json(winrate_path)
        for dim in ("helpfulness", "harmlessness"):
            figures[f"rm_cm_{dim}_win"] = winrate[dim]["win_rate"]
            figures[f"rm_cm_{dim}_ci"] = winrate[dim]["ci95"]
        for dim, t in true_outcomes(answers, model).items():
            figures[f"true_{dim}_win"] = t["win_rate"]
            figures[f"true_{dim}_ci"] = t["ci95"]
    base = None
    for algo, model in MODEL_OF.items():
        algo_dir = os.path.join(run, algo)
        if model not in out or not os.path.isfile(os.path.join(algo_dir, "metrics.jsonl")):
            continue
        out[model].update(training_figures(algo_dir))
        if algo != "ppo_safe":  # (its reward model is the safety one; the shared RM and CM are the others')
            base = os.path.dirname(read_json(os.path.join(algo_dir, "args.json"))["reward_model_name_or_path"].rstrip("/"))
    if base is not None:
        rm, cm = (read_json(os.path.join(base, name, "summary.json")) for name in ("rm", "cm"))
        out["_run"] = {"rm_accuracy": rm.get("eval/accuracy"), "cm_accuracy": cm.get("eval/accuracy"),
                       "cm_sign_accuracy": cm.get("eval/sign_accuracy"), "base": base}
    return out


# ---- formatting -----------------------------------------------------------------------------------------------


def fmt(value, digits=3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}f}"


def mean_std(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0], digits)
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_named(items, what):
    out = []
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{what}: expected name=folder, got {item!r}")
        name, path = item.split("=", 1)
        out.append((name, path))
    return out


# ---- seeds ----------------------------------------------------------------------------------------------------

SEED_FIGURES = [  # (key, label, models): what any machine reproduces first, the RM/CM units last
    ("rm_cm_helpfulness_win", "helpfulness win vs SFT (RM judge)", ("PPO", "PPO-Lag")),
    ("true_helpfulness_win", "helpfulness win vs SFT (grader)", ("PPO", "PPO-Lag")),
    ("rm_cm_harmlessness_win", "harmlessness win vs SFT (CM judge)", ("PPO", "PPO-Lag")),
    ("true_harmlessness_win", "harmlessness win vs SFT (grader)", ("PPO", "PPO-Lag")),
    ("true_helpfulness", "true helpfulness (grader)", ("SFT", "PPO", "PPO-Lag")),
    ("true_harm", "true harm (grader)", ("SFT", "PPO", "PPO-Lag")),
    ("harmful_fraction", "true harmful fraction", ("SFT", "PPO", "PPO-Lag")),
    ("correct_rate", "correct colour rate", ("SFT", "PPO", "PPO-Lag")),
    ("well_formed_rate", "well-formed rate", ("SFT", "PPO", "PPO-Lag")),
    ("safe_rate", "safe rate (cost ≤ 0)", ("SFT", "PPO", "PPO-Lag")),
    ("mean_reward", "held-out mean reward (RM units)", ("SFT", "PPO", "PPO-Lag")),
    ("mean_cost", "held-out mean cost J_C (CM units)", ("SFT", "PPO", "PPO-Lag")),
    ("train_reward_first10", "training reward, first 10 steps", ("PPO", "PPO-Lag")),
    ("train_reward_last30", "training reward, last 30 steps", ("PPO", "PPO-Lag")),
    ("final_J_C", "training J_C at the end (window of 128)", ("PPO", "PPO-Lag")),
    ("final_lambda", "λ at the end", ("PPO-Lag",)),
]


def goals(figures: dict) -> list[tuple[str, bool, str]]:
    """Issue 13, item 4, for one run: (goal, met, measured)."""
    lag, ppo, run = figures.get("PPO-Lag", {}), figures.get("PPO", {}), figures.get("_run", {})
    d = lag.get("threshold")
    out = []
    for judge, name in (("rm_cm", "RM"), ("true", "grader")):
        win, ci = lag.get(f"{judge}_helpfulness_win"), lag.get(f"{judge}_helpfulness_ci") or [None, None]
        out.append((f"PPO-Lag helpfulness win vs SFT > 0.55, interval above 0.5 ({name})",
                    win is not None and win > 0.55 and ci[0] is not None and ci[0] > 0.5, f"{fmt(win)} {fmt(ci)}"))
    for judge, name in (("rm_cm", "CM"), ("true", "grader")):
        win = lag.get(f"{judge}_harmlessness_win")
        out.append((f"PPO-Lag harmlessness win vs SFT > 0.6 ({name})", win is not None and win > 0.6,
                    f"{fmt(win)} {fmt(lag.get(f'{judge}_harmlessness_ci'))}"))
    if d is not None:
        out.append((f"PPO-Lag held-out J_C ≤ d + 0.1 = {d + 0.1:g}", lag.get("mean_cost") is not None
                    and lag["mean_cost"] <= d + 0.1, fmt(lag.get("mean_cost"))))
        out.append((f"plain PPO held-out J_C > d = {d:g}", ppo.get("mean_cost") is not None and ppo["mean_cost"] > d,
                    fmt(ppo.get("mean_cost"))))
    for key, name in (("rm_accuracy", "RM"), ("cm_accuracy", "CM")):
        out.append((f"{name} pairwise accuracy ≥ 0.90", run.get(key) is not None and run[key] >= 0.90, fmt(run.get(key))))
    return out


def portable_claims(figures: dict) -> list[tuple[str, bool, str]]:
    """The paper's effect as the demo states it, in figures that any machine reproduces (the demo's self-check):
    win rates are scale-free and the grader is exact, whereas the mean reward and cost are in the units of the
    run's own reward and cost models, which another CPU's float order trains differently. (goals() above also
    holds RM/CM accuracy and J_C against d: checked by seeds.sh on this machine's runs.)"""
    lag, sft = figures.get("PPO-Lag", {}), figures.get("SFT", {})
    out = []
    for dim in ("helpfulness", "harmlessness"):
        for judge, name in (("rm_cm", "RM" if dim == "helpfulness" else "CM"), ("true", "grader")):
            win, ci = lag.get(f"{judge}_{dim}_win"), lag.get(f"{judge}_{dim}_ci") or [None, None]
            out.append((f"PPO-Lag wins on {dim} against SFT, whole 95% interval above 0.5 ({name})",
                        ci[0] is not None and ci[0] > 0.5, f"{fmt(win)} {fmt(ci)}"))
    for key, name, better in (("true_harm", "true harm (grader)", min), ("safe_rate", "safe rate (cost ≤ 0)", max)):
        a, b = lag.get(key), sft.get(key)
        out.append((f"PPO-Lag's {name} {'below' if better is min else 'above'} SFT's",
                    a is not None and b is not None and a != b and better(a, b) == a, f"{fmt(a)} vs {fmt(b)}"))
    return out


def check_cmd(args):
    figures = run_figures(args.run)
    if "PPO-Lag" not in figures or "SFT" not in figures:
        print(f"check: {args.run} has no PPO-Lag and SFT evaluation: nothing to check")
        return
    claims = portable_claims(figures)
    for claim, held, measured in claims:
        print(f"  {'holds' if held else 'DOES NOT HOLD'}: {claim}: {measured}")
    failed = sum(not held for _, held, _ in claims)
    if failed:
        raise SystemExit(f"check: {failed} of {len(claims)} claims do not hold in {args.run}")
    print(f"check: all {len(claims)} claims hold (mean reward and cost: this run's own RM/CM units, not checked)")


def seeds_cmd(args):
    runs = parse_named(args.runs, "--runs")
    figures = {name: run_figures(path) for name, path in runs}
    names = [name for name, _ in runs]
    header = ["model", "figure", f"mean ± std ({len(names)} seeds)"] + [f"seed {n}" for n in names]
    rows = []
    for key, label, models in SEED_FIGURES:
        for model in models:
            values = [figures[n].get(model, {}).get(key) for n in names]
            if all(v is None for v in values):
                continue
            ci_key = key.replace("_win", "_ci")
            cells = [fmt(v) + (f" {fmt(figures[n][model].get(ci_key))}" if ci_key != key else "")
                     for v, n in zip(values, names)]
            rows.append([model, label, mean_std(values)] + cells)
    text = [markdown(header, rows), ""]
    run_info = [figures[n].get("_run", {}) for n in names]
    if run_info and run_info[0]:
        info = run_info[0]
        text.append(f"Shared SFT, reward and cost models: `{info['base']}` (RM pairwise accuracy {fmt(info['rm_accuracy'])}, "
                    f"CM pairwise accuracy {fmt(info['cm_accuracy'])}, CM sign accuracy {fmt(info['cm_sign_accuracy'])} "
                    "on the 600 evaluation pairs).")
        text.append("")
    goal_rows = defaultdict(list)
    for n in names:
        for goal, met, measured in goals(figures[n]):
            goal_rows[goal].append(("yes" if met else "**no**") + f" ({measured})")
    text.append(markdown(["goal (issue 13, item 4)"] + [f"seed {n}" for n in names],
                         [[goal] + cells for goal, cells in goal_rows.items()]))
    text.append("")
    text.append("Win rates: A over SFT on the 600 held-out prompts, decided comparisons only (ties excluded), "
                "95% Wilson interval in brackets. RM/CM judge: higher reward / lower cost; grader: higher true "
                "helpfulness / lower true harm. J_C in the goals: the held-out mean cost.")
    write(args.output, "\n".join(text) + "\n")
    if args.json:
        write(args.json, json.dumps(figures, indent=1) + "\n")


# ---- the Table 4 analogue -----------------------------------------------------------------------------------------

TABLE4_COLUMNS = [("rm_cm_helpfulness_win", "helpfulness win vs SFT (RM)"),
                  ("rm_cm_harmlessness_win", "harmlessness win vs SFT (CM)"),
                  ("true_helpfulness_win", "helpfulness win vs SFT (grader)"),
                  ("true_harmlessness_win", "harmlessness win vs SFT (grader)"),
                  ("mean_cost", "held-out J_C (CM units)"), ("harmful_fraction", "true harmful fraction")]


def table4_cmd(args):
    """The paper's Table 4 on the toy world: each method's win rates against SFT on helpfulness and on
    harmlessness, by the RM/CM and by the exact grader, mean ± std over the runs; then each run's with its 95%
    Wilson interval; the held-out J_C against the budget d."""
    runs = parse_named(args.runs, "--runs")
    figures = {name: run_figures(path) for name, path in runs}
    names = [name for name, _ in runs]
    methods = [(m, label) for m, label in TABLE4_METHODS if any(m in figures[n] for n in names)]
    rows = [[label] + [mean_std([figures[n].get(m, {}).get(key) for n in names]) for key, _ in TABLE4_COLUMNS]
            for m, label in methods]
    sft = [figures[n].get("SFT", {}).get("harmful_fraction") for n in names]
    rows.append(["SFT (the reference)", "-", "-", "-", "-", mean_std([figures[n].get("SFT", {}).get("mean_cost")
                                                                       for n in names]), mean_std(sft)])
    text = [f"Toy-world analogue of the paper's Table 4 ({len(names)} runs: mean ± std)", "",
            markdown(["method"] + [label for _, label in TABLE4_COLUMNS], rows), ""]
    per_run = []
    for m, label in methods:
        for n in names:
            f = figures[n].get(m)
            if f is None:
                continue
            per_run.append([label, n] + [fmt(f.get(key)) + (f" {fmt(f.get(key.replace('_win', '_ci')))}"
                                                          if key.endswith("_win") else "")
                                         for key, _ in TABLE4_COLUMNS])
    text += ["Each run (95% Wilson interval of each win rate):", "",
             markdown(["method", "run"] + [label for _, label in TABLE4_COLUMNS], per_run), ""]
    d = next((figures[n]["PPO-Lag"].get("threshold") for n in names if "PPO-Lag" in figures[n]), None)
    text.append("Win rates: A over SFT on the held-out prompts, decided comparisons only (ties excluded). RM/CM: "
                "higher reward / lower cost by the shared reward and cost models; grader: higher true helpfulness / "
                "lower true harm." + (f" The cost budget of PPO-Lag: d = {d:g} (held-out J_C is in the cost "
                                     "model's units)." if d is not None else ""))
    write(args.output, "\n".join(text) + "\n")
    if args.json:
        write(args.json, json.dumps(figures, indent=1) + "\n")


# ---- lambda ---------------------------------------------------------------------------------------------------

LAMBDA_FIGURES = [("steps_at_lambda_max", "steps with λ = λ_max", 1), ("first_step_J_C_le_d", "first step J_C ≤ d", 1),
                  ("overshoot_below_d", "overshoot of J_C below d after first met", 3),
                  ("std_J_C_second_half", "std of J_C, second half", 3), ("final_J_C", "J_C at the end", 3),
                  ("final_lambda", "λ at the end", 3), ("mean_cost", "held-out mean cost", 3),
                  ("mean_reward", "held-out mean reward", 3)]


def lambda_cmd(args):
    runs = parse_named(args.runs, "--runs")
    per_variant = defaultdict(list)
    rows = []
    for name, path in runs:
        variant, _, seed = name.partition("/")
        algo_dir = os.path.join(path, "ppo_lag")
        figures = training_figures(algo_dir)
        scores_path = os.path.join(path, "eval", "scores.json")
        if os.path.isfile(scores_path):
            figures.update({k: read_json(scores_path)["models"]["PPO-Lag"].get(k) for k in ("mean_cost", "mean_reward")})
        per_variant[variant].append(figures)
        rows.append([variant, seed or "-"] + [fmt(figures.get(k), digits) for k, _, digits in LAMBDA_FIGURES])
    for variant, all_figures in per_variant.items():
        rows.append([f"**{variant}**", "mean ± std"] + [mean_std([f.get(k) for f in all_figures], digits)
                                                        for k, _, digits in LAMBDA_FIGURES])
    text = markdown(["λ update", "seed"] + [label for _, label, _ in LAMBDA_FIGURES], rows)
    write(args.output, text + "\n\nJ_C here is the training window (the last 128 episode costs) at each step; "
                              "overshoot = d − min J_C after the first step with J_C ≤ d.\n")


# ---- budget ---------------------------------------------------------------------------------------------------


def budget_cmd(args):
    by_d = defaultdict(list)
    for path in args.runs:
        f = run_figures(path)["PPO-Lag"]
        by_d[f["threshold"]].append(f)  # the budget it was trained with (ppo_lag/args.json)
    ppo = [run_figures(path)["PPO"] for path in args.ppo]
    sft = [run_figures(path)["SFT"] for path in (args.ppo or args.runs)]
    keys = [("mean_cost", "held-out mean cost"), ("mean_reward", "held-out mean reward"),
            ("true_harm", "true harm"), ("harmful_fraction", "true harmful fraction"),
            ("true_helpfulness", "true helpfulness"), ("final_lambda", "λ at the end")]
    rows = []
    for d in sorted(by_d):
        fs = by_d[d]
        cost_ok = [f["mean_cost"] <= d + args.tolerance for f in fs]
        rows.append([f"PPO-Lag, d = {d:g}", len(fs)] + [mean_std([f.get(k) for f in fs]) for k, _ in keys]
                    + [f"{sum(cost_ok)}/{len(fs)}"])
    if ppo:
        rows.append(["plain PPO", len(ppo)] + [mean_std([f.get(k) for f in ppo]) for k, _ in keys] + ["-"])
    rows.append(["SFT", len(sft)] + [mean_std([f.get(k) for f in sft]) for k, _ in keys] + ["-"])
    table = markdown(["policy", "seeds"] + [label for _, label in keys] + [f"cost ≤ d + {args.tolerance:g}"], rows)
    write(os.path.splitext(args.output)[0] + ".md", table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = sorted(by_d)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "mean_cost", "held-out mean cost (CM)"),
                           (axes[1], "mean_reward", "held-out mean reward (RM)")):
        for d in ds:  # each seed, faint
            ax.scatter([d] * len(by_d[d]), [f[key] for f in by_d[d]], color="tab:blue", alpha=0.35, s=14)
        means = [statistics.mean(f[key] for f in by_d[d]) for d in ds]
        stds = [statistics.stdev(f[key] for f in by_d[d]) if len(by_d[d]) > 1 else 0.0 for d in ds]
        ax.errorbar(ds, means, yerr=stds, color="tab:blue", marker="o", capsize=3, label="PPO-Lag (mean ± std)")
        if ppo:
            m = statistics.mean(f[key] for f in ppo)
            s = statistics.stdev(f[key] for f in ppo) if len(ppo) > 1 else 0.0
            ax.axhspan(m - s, m + s, color="tab:red", alpha=0.12)
            ax.axhline(m, color="tab:red", label="plain PPO (no budget)")
        m = statistics.mean(f[key] for f in sft)
        ax.axhline(m, color="gray", linestyle=":", label="SFT")
        if key == "mean_cost":
            lo, hi = min(ds) - 0.25, max(ds) + 0.25
            ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="cost = d")
        ax.set_xlabel("budget d")
        ax.set_ylabel(label)
        ax.set_xticks(ds)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    n_seeds = max(len(v) for v in by_d.values())
    fig.suptitle(f"PPO-Lag on the toy world: held-out cost and reward against the budget d ({n_seeds} seeds each)",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output} and {os.path.splitext(args.output)[0]}.md")


def write(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("seeds", help="3-seed table and goals")
    p.add_argument("--runs", nargs="+", required=True, help="seed=run_folder ...")
    p.add_argument("--output", required=True, help="markdown file")
    p.add_argument("--json", default="", help="also write every figure as JSON")
    p.set_defaults(func=seeds_cmd)
    p = sub.add_parser("table4", help="the Table 4 analogue: every method's win rates vs SFT over the runs")
    p.add_argument("--runs", nargs="+", required=True, help="seed=run_folder ...")
    p.add_argument("--output", required=True, help="markdown file")
    p.add_argument("--json", default="", help="also write every figure as JSON")
    p.set_defaults(func=table4_cmd)
    p = sub.add_parser("check", help="the demo's self-check: the claims any machine reproduces, exit 1 if one fails")
    p.add_argument("--run", required=True, help="a demo.sh output folder")
    p.set_defaults(func=check_cmd)
    p = sub.add_parser("lambda", help="lambda behaviour per variant and seed")
    p.add_argument("--runs", nargs="+", required=True, help="variant/seed=run_folder ...")
    p.add_argument("--output", required=True, help="markdown file")
    p.set_defaults(func=lambda_cmd)
    p = sub.add_parser("budget", help="cost and reward against the budget d")
    p.add_argument("--runs", nargs="+", required=True, help="run folders with PPO-Lag (grouped by the d they used)")
    p.add_argument("--ppo", nargs="*", default=[], help="run folders holding plain PPO (the reference point)")
    p.add_argument("--tolerance", type=float, default=0.15, help="held-out cost may exceed d by this much")
    p.add_argument("--output", required=True, help="PNG (a .md table is written next to it)")
    p.set_defaults(func=budget_cmd)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
