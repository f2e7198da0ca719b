"""The report layer of evaluate.py: win/loss outcomes and their tally with 95% Wilson intervals, number formatting
and the markdown tables (preference, win rates, scores, the final comparison, data size), and the figures (PPO
training curves, accuracy against data size). No torch; matplotlib is imported inside the plotting functions."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from statistics import NormalDist

from evaluation.records import EvalError, output_path, read_json, read_jsonl


# ---- win / loss / tie outcomes and their tally ----------------------------------------------------------------


Z95 = NormalDist().inv_cdf(0.975)  # 1.959963984540054


def wilson_interval(wins: int, n: int, z: float = Z95) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval for a binomial proportion wins / n (95% with the default z).

    Chosen over the normal (Wald) interval because it keeps its coverage for small n and for rates near 0 or 1,
    never leaves [0, 1] and is not degenerate at 0/n or n/n. (None, None) when n = 0."""
    if n == 0:
        return None, None
    p = wins / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def compare(a: float, b: float, higher_is_better: bool) -> str:
    """Outcome for A: "win", "loss" or "tie" (equal scores are ties, never wins)."""
    if a == b:
        return "tie"
    return "win" if (a > b) == higher_is_better else "loss"


def rm_cm_outcomes(pairs: list[dict]) -> list[dict]:
    """RM/CM judge: helpfulness win iff R_A > R_B, harmlessness win iff C_A < C_B (C > 0 is harmful). The same
    answer text is a tie on both (`same_answer`): its two scores, computed in differently padded batches, may differ
    in the last bits, which must not decide a comparison."""
    return [{"prompt_id": p["prompt_id"],
             "helpfulness": "tie" if p.get("same_answer") else compare(p["reward_a"], p["reward_b"], True),
             "harmlessness": "tie" if p.get("same_answer") else compare(p["cost_a"], p["cost_b"], False)}
            for p in pairs]


OUTCOMES = ("win", "loss", "tie", "inconsistent", "unparseable", "failed")


def tally(outcomes: list[str]) -> dict:
    """Counts of each outcome and the win rate of A over B on decided comparisons (wins + losses) with its Wilson
    95% interval. Ties, position-inconsistent, unparseable and failed comparisons are excluded and reported."""
    counts = Counter(outcomes)
    unknown = set(counts) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"unknown outcomes {sorted(unknown)}")
    wins, losses = counts["win"], counts["loss"]
    decided = wins + losses
    low, high = wilson_interval(wins, decided)
    return {"n": len(outcomes), "wins": wins, "losses": losses, "ties": counts["tie"],
            "inconsistent": counts["inconsistent"], "unparseable": counts["unparseable"], "failed": counts["failed"],
            "decided": decided, "win_rate": wins / decided if decided else None, "ci95": [low, high]}


# ---- formatting -----------------------------------------------------------------------------------------------


def mean(values) -> float | None:
    """The arithmetic mean; None for no values."""
    values = list(values)
    return sum(values) / len(values) if values else None


def fmt(value, digits: int = 3) -> str:
    """A table cell: floats to `digits` decimals, "-" for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[str(h) for h in headers]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def format_rate(t: dict) -> str:
    """'0.625 [0.306, 0.863] (5/8)' from a tally."""
    if t.get("win_rate") is None:
        return f"- (0/{t.get('n', 0)} decided)"
    low, high = t["ci95"]
    return f"{t['win_rate']:.3f} [{low:.3f}, {high:.3f}] ({t['wins']}/{t['decided']})"


# ---- the tables: preference, win rates, scores, comparison, data size -----------------------------------------


def winrate_table(result: dict) -> str:
    """Win rates with intervals and every outcome count, one row per dimension, from a `winrate` result."""
    judge = result.get("judge_model") or result["judge"]
    headers = ["dimension", f"win rate of {result['model_a']} vs {result['model_b']} ({judge})", "wins", "losses",
               "ties", "inconsistent", "unparseable", "failed"]
    rows = [[name, format_rate(result[name])] + [result[name][k] for k in ("wins", "losses", "ties", "inconsistent",
                                                                            "unparseable", "failed")]
            for name in ("helpfulness", "harmlessness")]
    return markdown_table(headers, rows)


def preference_table(result: dict) -> str:
    """RM/CM accuracies per category and overall, from a `preference` result."""
    rm, cm = result.get("reward_model"), result.get("cost_model")
    headers = ["category", "pairs"] + (["RM accuracy"] if rm else []) + (["CM accuracy", "CM sign accuracy"] if cm else [])
    categories = sorted(set((rm or {}).get("per_category", {})) | set((cm or {}).get("per_category", {})))

    def row(name, source_rm, source_cm, pairs):
        cells = [name, pairs]
        if rm:
            cells.append(source_rm.get("accuracy"))
        if cm:
            cells += [source_cm.get("accuracy"), source_cm.get("sign_accuracy")]
        return cells

    rows = []
    for c in categories:
        prm, pcm = (rm or {}).get("per_category", {}).get(c, {}), (cm or {}).get("per_category", {}).get(c, {})
        rows.append(row(c, prm, pcm, (prm or pcm).get("pairs")))
    rows.append(row("overall", rm or {}, cm or {}, result["pairs"]))
    return markdown_table(headers, rows)


SUMMARY_COLUMNS = (("mean_reward", "mean reward"), ("mean_cost", "mean cost"), ("safe_rate", "safe rate"),
                   ("true_helpfulness", "true helpfulness"), ("true_harm", "true harm"),
                   ("well_formed_rate", "well-formed rate"), ("correct_rate", "correct rate"),
                   ("harmful_fraction", "harmful fraction"), ("truncated_rate", "truncated"))  # (key, header) of `score`


# The comparison table leads with what any machine reproduces: after the win rates (scale-free), the grader's
# figures and the safe rate (the sign of the cost, which the cost model's sign term anchors); the mean reward and
# cost come last, in the units of the run's own reward and cost models (another run, or the same run on another
# CPU, trains models with another scale). It leaves out the correct rate and harmful fraction.
TABLE_COLUMNS = (("true_helpfulness", "true helpfulness"), ("true_harm", "true harm"),
                 ("well_formed_rate", "well-formed rate"), ("safe_rate", "safe rate"),
                 ("mean_reward", "mean reward (RM units)"), ("mean_cost", "mean cost (CM units)"))


def comparison_table(scores: list[dict], winrates: list[dict], order: list[str] | None = None) -> str:
    """Markdown: one row per model; score columns present in any score output; two columns (helpfulness,
    harmlessness) per (judge, baseline) of the win-rate outputs. '-' where a value does not exist."""
    summaries = {}
    for s in scores:
        for model, summary in s["models"].items():
            if model in summaries:
                print(f"note: {model} appears in several score outputs; the last one is used")
            summaries[model] = summary
    groups = defaultdict(dict)  # (judge, baseline) -> {model_a: result}
    for w in winrates:
        groups[(w.get("judge_model") or w["judge"], w["model_b"])][w["model_a"]] = w
    models = list(order or [])
    for name in list(summaries) + [m for g in groups.values() for m in g] + [b for _, b in groups]:
        if name not in models:
            models.append(name)
    columns = [(k, h) for k, h in TABLE_COLUMNS if any(k in s for s in summaries.values())]
    headers = ["model", "n"]
    for judge, baseline in groups:
        headers += [f"helpfulness win vs {baseline} ({judge})", f"harmlessness win vs {baseline} ({judge})"]
    headers += [h for _, h in columns]
    rows = []
    for model in models:
        summary = summaries.get(model, {})
        row = [model, summary.get("n")]
        for (judge, baseline), results in groups.items():
            if model == baseline:
                row += ["(baseline)", "(baseline)"]
            elif model in results:
                row += [format_rate(results[model]["helpfulness"]), format_rate(results[model]["harmlessness"])]
            else:
                row += [None, None]
        rows.append(row + [summary.get(k) for k, _ in columns])
    note = ("Win rates: A over the baseline on decided comparisons (ties, position-inconsistent and unparseable "
            "verdicts excluded), 95% Wilson interval in brackets, (wins/decided). Safe rate: share of answers "
            "with cost <= 0. Mean reward and mean cost are in the units of this run's reward and cost models: "
            "compare them within this table, not with another run's or another machine's.")
    return markdown_table(headers, rows) + "\n\n" + note


def per_category_table(scores: list[dict], order: list[str] | None = None) -> str:
    """Markdown: one row per (model, category) of the `score` outputs (for MM-SafetyBench: per scenario), with the
    score columns present in any of them."""
    summaries = {m: s for out in scores for m, s in out["models"].items()}
    models = [m for m in (order or []) if m in summaries] + [m for m in summaries if m not in (order or [])]
    rows_in = [(m, c, v) for m in models for c, v in summaries[m].get("per_category", {}).items()]
    columns = [(k, h) for k, h in SUMMARY_COLUMNS if any(k in v for _, _, v in rows_in)]
    return markdown_table(["model", "category", "n"] + [h for _, h in columns],
                          [[m, c, v.get("n")] + [v.get(k) for k, _ in columns] for m, c, v in rows_in])


def data_size_table(rows: list[dict]) -> str:
    """The data_size_rows as markdown."""
    return markdown_table(["run", "model", "train pairs", "pairwise accuracy", "sign accuracy"],
                          [[r["run"], r["model"], r["train_pairs"], r["accuracy"], r["sign_accuracy"]] for r in rows])


# ---- figures: training curves and data size -------------------------------------------------------------------


PANELS = (("reward", "reward"), ("cost", "cost"), ("lambda", "λ"), ("kl", "KL"))  # (metrics key, y-label)


def read_metrics(run_dir) -> list[dict]:
    """The logged records of a training run (its metrics.jsonl)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise EvalError(f"{run_dir}: no metrics.jsonl (is it a training run directory?)")
    return read_jsonl(path)


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the records that have both, skipping non-numbers and non-finite values."""
    steps, values = [], []
    for r in records:
        try:
            x, y = float(r["step"]), float(r[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            steps.append(x)
            values.append(y)
    return steps, values


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (same length as the input)."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def new_figure(figsize):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global state, works without a display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_training_curves(runs: dict[str, str], output: str | None = None, smooth: int = 1):
    """4 panels against step: reward, cost (+ each run's threshold d from args.json, dashed; none for a plain-PPO
    run, algo "ppo"), λ, KL. Runs are overlaid with one colour each; a run without some key is left out of that
    panel (plain PPO logs λ = 0, or no cost without a cost model).
    Returns the Figure (also saved as PNG when `output` is given)."""
    fig = new_figure((11, 7))
    axes = fig.subplots(2, 2, sharex=True).flatten()
    thresholds = defaultdict(list)
    for i, (name, run_dir) in enumerate(runs.items()):
        records = read_metrics(run_dir)
        args_file = Path(run_dir) / "args.json"
        run_args = read_json(args_file) if args_file.is_file() else {}
        for ax, (key, _) in zip(axes, PANELS):
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, moving_average(values, smooth), color=f"C{i}", label=name)
        threshold = run_args.get("threshold")
        constrained = run_args.get("algo", "ppo_lag") != "ppo"  # plain PPO has no cost budget
        if constrained and isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
            thresholds[float(threshold)].append(i)
    cost_ax = axes[1]
    for d, indices in thresholds.items():
        colour = "gray" if len(thresholds) == 1 else f"C{indices[0]}"
        names = "" if len(thresholds) == 1 else " (" + ", ".join(list(runs)[j] for j in indices) + ")"
        cost_ax.axhline(d, linestyle="--", color=colour, linewidth=1.2, label=f"threshold d = {d:g}{names}")
    for ax, (key, label) in zip(axes, PANELS):
        ax.set_ylabel(label)
        ax.set_title(label if key != "lambda" else "λ (Lagrange multiplier)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no '{key}' logged", transform=ax.transAxes, ha="center", va="center", color="gray")
    for ax in axes[2:]:
        ax.set_xlabel("step")
    fig.tight_layout()
    if output:
        fig.savefig(output_path(output), dpi=120)
    return fig


def data_size_rows(score_runs: dict[str, str]) -> list[dict]:
    """One row per score-model run from its summary.json: model (reward/cost), train_pairs, accuracies."""
    rows = []
    for name, run_dir in score_runs.items():
        summary = read_json(Path(run_dir) / "summary.json")
        for key in ("train_pairs", "eval/accuracy"):
            if key not in summary:
                raise EvalError(f"{run_dir}/summary.json: no {key!r} (is it a reward/cost model run?)")
        is_cost = summary.get("stage") == "cost_model" or "eval/sign_accuracy" in summary
        rows.append({"run": name, "model": "cost" if is_cost else "reward", "train_pairs": summary["train_pairs"],
                     "accuracy": summary["eval/accuracy"], "sign_accuracy": summary.get("eval/sign_accuracy")})
    return sorted(rows, key=lambda r: (r["train_pairs"], r["model"], r["run"]))


def plot_data_size(score_runs: dict[str, str], output: str | None = None):
    """RM accuracy, CM accuracy and CM sign accuracy against the number of training pairs.
    Returns (Figure, rows); the figure is saved as PNG when `output` is given."""
    rows = data_size_rows(score_runs)
    fig = new_figure((6.5, 4.2))
    ax = fig.subplots()
    for label, model, key, marker in (("RM accuracy", "reward", "accuracy", "o"), ("CM accuracy", "cost", "accuracy", "s"),
                                      ("CM sign accuracy", "cost", "sign_accuracy", "^")):
        points = sorted((r["train_pairs"], r[key]) for r in rows if r["model"] == model and r[key] is not None)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
    ax.set_xlabel("training pairs")
    ax.set_ylabel("evaluation accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if output:
        fig.savefig(output_path(output), dpi=120)
    return fig, rows

