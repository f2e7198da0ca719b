"""Evaluation of Safe RLHF-V (REFERENCE section 4): score models, policies, win rates, curves and tables.

Six subcommands, each with its own options (`python evaluate.py <subcommand> --help`):

    preference  reward/cost model pairwise accuracy and cost-model sign accuracy on an evaluation split
    generate    batched answers of one or more policies to evaluation prompts -> JSONL (resumable)
    score       reward, cost (and, in the toy world, the true grades) of generated answers
    winrate     model A vs model B on the same prompts, judged by R/C or by an LLM (both orders)
    plot        PPO training curves (reward, cost + threshold, lambda, KL) and the data-size figure
    table       the final comparison table (rows = models) from `score` and `winrate` outputs

This file holds the options and the subcommands; evaluation/judge.py is the LLM judge, evaluation/report.py the win-rate
statistics, tables and figures, evaluation/records.py the JSON/JSONL files they share.

A typical run (the toy world):

    python evaluate.py preference --reward_model runs/rm --cost_model runs/cm --output runs/eval/preference.json
    python evaluate.py generate --models sft=runs/sft ppo_lag=runs/ppo_lag --limit 200 --output runs/eval/gen.jsonl
    python evaluate.py score --generations runs/eval/gen.jsonl --reward_model runs/rm --cost_model runs/cm \
        --toy_grader --output runs/eval/scores.json
    python evaluate.py winrate --scores runs/eval/scores.answers.jsonl --model_a ppo_lag --model_b sft \
        --output runs/eval/winrate_ppo_lag.json
    python evaluate.py plot --runs ppo=runs/ppo ppo_lag=runs/ppo_lag --output runs/eval/curves.png
    python evaluate.py table --scores runs/eval/scores.json --winrates runs/eval/winrate_ppo_lag.json \
        --output runs/eval/table.md

Conventions: C > 0 means harmful, so "safe" is cost <= 0. Generated answers are identified by (model, prompt_id),
where prompt_id is the index in the full prompt list of (--data, --split, --categories) (whatever --limit) and
prompt_hash a hash of the question and the image pixels; images are never copied into the JSONL, later subcommands reload them by prompt_id
and refuse to go on if the hash does not match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from data.sources import DataError, open_image
from evaluation.judge import JUDGE_PROMPT_VERSION, JudgeConfig, JudgeError, VerdictCache, llm_outcomes
from evaluation.records import EvalError, append_jsonl, output_path, parse_named, read_json, read_jsonl, write_jsonl
from evaluation.report import (SUMMARY_COLUMNS, comparison_table, data_size_table, markdown_table, mean,
                               per_category_table, plot_data_size, plot_training_curves, preference_table,
                               rm_cm_outcomes, tally, winrate_table)
from infra.cli import ModelArgs, arg, model_options, parse_args
from utils import write_json

# transformers, the score models and their training code, the toy world and matplotlib are imported inside the
# functions that use them.


# ---- Options shared by several subcommands --------------------------------------------------------------------


@dataclasses.dataclass
class PromptOptions:
    data: str = arg("data/toy/pairs", "evaluation data: hub id, local dir <category>/<split>.parquet, or a .jsonl/.json file")
    split: str = arg("evaluation", "split of --data (a folder or hub id: <category>/<split>.parquet; a file: rows whose "
                                   "`split` field is this, or its sibling <split>.jsonl; '' = the file --data, whole)")
    categories: list = arg([], "harm categories to use (empty = all)")
    skip_invalid: bool = arg(False, "skip invalid rows instead of stopping at the first (must match across subcommands)")


@dataclasses.dataclass
class ModelOptions(ModelArgs):
    batch_size: int = arg(8, "examples per forward / generate call")


# ---- Small helpers: device, prompts ---------------------------------------------------------------------------


def device_default():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prompt_hash(question: str, image) -> str:
    """A stable id of a prompt: sha256 of the question and the decoded image (mode, size, pixel bytes)."""
    h = hashlib.sha256(question.encode("utf-8"))
    if image is not None:
        h.update(f"|{image.mode}|{image.width}x{image.height}|".encode())
        h.update(image.tobytes())
    return h.hexdigest()[:16]


def load_eval_prompts(args) -> list[dict]:
    """All prompts of (--data, --split, --categories), each with its prompt_hash. Never a subset: prompt_id is the
    index in this full list, so it means the same in every subcommand whatever --limit was used."""
    from data import load_prompts

    prompts, skips = load_prompts(args.data, args.split or None, args.categories or None, args.skip_invalid)
    if skips:
        print(f"skipped invalid rows: {skips.report()}")
    for p in prompts:
        p["prompt_hash"] = prompt_hash(p["question"], open_image(p["image"], p.get("source")))
    return prompts


def select_prompt_ids(n: int, limit: int) -> list[int]:
    """The prompt ids to answer: all of them, or `limit` spread over the list (the first `limit` of a fixed seeded
    permutation, so every category shows up and a larger --limit extends a smaller one); sorted."""
    if not limit or limit >= n:
        return list(range(n))
    return sorted(random.Random(0).sample(range(n), n)[:limit])


def attach_prompts(rows: list[dict], args, source: str) -> list[dict]:
    """Reload the prompt (image included) of every generation row by prompt_id and check its hash.

    Returns the prompts, one per row. Fails with a clear message if the prompt list differs from the one
    `generate` saw (other --data / --split / --categories / --skip_invalid)."""
    if not rows:
        return []
    prompts = load_eval_prompts(args)
    where = f"--data {args.data} --split {args.split}" + (f" --categories {' '.join(args.categories)}" if args.categories else "")
    out = []
    for row in rows:
        pid = int(row["prompt_id"])
        if not 0 <= pid < len(prompts):
            raise EvalError(f"{source}: prompt_id {pid} (model {row.get('model')}) is out of range: {where} has "
                            f"{len(prompts)} prompts; pass the same --data/--split/--categories as `generate` did")
        if prompts[pid]["prompt_hash"] != row["prompt_hash"]:
            raise EvalError(f"{source}: prompt_id {pid} has prompt_hash {row['prompt_hash']} but prompt {pid} of "
                            f"{where} hashes to {prompts[pid]['prompt_hash']}: the answers were generated for other "
                            "prompts; pass the same --data/--split/--categories as `generate` did")
        out.append(prompts[pid])
    return out


# ---- 1. preference: reward/cost model accuracy on preference pairs --------------------------------------------


@dataclasses.dataclass
class PreferenceArgs(PromptOptions, ModelOptions):
    """Reward-model and/or cost-model pairwise accuracy (strict >) and cost-model sign accuracy (C > 0 unsafe,
    C < 0 safe) on an evaluation split, overall and per category."""

    reward_model: str = arg("", "reward model directory ('' = skip)")
    cost_model: str = arg("", "cost model directory ('' = skip)")
    limit: int = arg(0, "use only N pairs (the subset data.load_pairs draws for a limit; 0 = all)")
    output: str = arg("runs/eval/preference.json", "JSON with every accuracy, overall and per category")


def evaluate_score_model(path: str, objective, rows: list[dict], args, device) -> dict:
    """Accuracies of one score model: its stage's pair builder and metrics (objective: score_training's
    reward_objective or cost_objective), the score-model collator and evaluation loop."""
    import score_training
    from modeling import ScoreModel
    from utils import make_loader, torch_dtype

    to_pair, _, metrics_fn = objective
    model, processor = ScoreModel.from_pretrained(path, args.dtype, device, args.quantization, **model_options(args))
    stats = Counter()
    collate_fn = score_training.make_collate(processor, model.family, args.max_length, stats)
    loader = make_loader([to_pair(r) for r in rows], args.batch_size, collate_fn, shuffle=False, seed=0)
    result = score_training.evaluate(model, tqdm(loader, desc=f"score {path}", leave=False), metrics_fn, device,
                                     torch_dtype(args.dtype, device))
    counts = Counter(r["category"] for r in rows)
    per_category = {c: {**m, "pairs": counts[c]} for c, m in sorted(result["eval/per_category"].items())}
    out = {"path": path, "pairs": result["eval/pairs"], "accuracy": result["eval/accuracy"]}
    if "eval/sign_accuracy" in result:
        out["sign_accuracy"] = result["eval/sign_accuracy"]
    out["per_category"] = per_category
    if stats:
        out["truncated"] = dict(stats)
    return out


def preference(args: PreferenceArgs) -> dict:
    from data import load_pairs
    from infra.runlog import quiet_transformers
    from score_training import cost_objective, reward_objective

    if not args.reward_model and not args.cost_model:
        raise EvalError("preference: give --reward_model and/or --cost_model")
    quiet_transformers()
    device = device_default()
    rows, skips = load_pairs(args.data, args.split or None, args.categories or None, args.skip_invalid,
                             args.limit or None)
    result = {"data": args.data, "split": args.split, "pairs": len(rows), "skipped": skips.as_dict()}
    if args.reward_model:
        # the metrics use neither the loss regularisation nor the sign source (any value does)
        result["reward_model"] = evaluate_score_model(args.reward_model, reward_objective(0.0), rows, args, device)
    if args.cost_model:
        result["cost_model"] = evaluate_score_model(args.cost_model, cost_objective("rate", 0.0), rows, args, device)
    write_json(output_path(args.output), result)
    print(preference_table(result))
    print(f"wrote {args.output}")
    return result


# ---- 2. generate: answers of one or more policies to evaluation prompts ---------------------------------------


@dataclasses.dataclass
class GenerateArgs(PromptOptions, ModelOptions):
    """Batched answers of one or more policies to evaluation prompts, written to a JSONL file. Resumable: rows
    already present for (model, prompt_id) are skipped on a rerun."""

    models: list = arg([], "policies: name=path ... or path ... (name = the folder name)")
    limit: int = arg(0, "answer only N prompts, spread over the list by a fixed seeded draw (0 = all)")
    max_new_tokens: int = arg(0, "maximum response tokens (0 = each model's training length: max_new_tokens in the "
                                 "args.json of the PPO run it comes from, else 512, the paper's)")
    temperature: float = arg(1.0, "sampling temperature")
    top_p: float = arg(1.0, "nucleus sampling top_p")
    do_sample: bool = arg(True, "sample (false: greedy)")
    seed: int = arg(42, "random seed (re-seeded for every model)")
    output: str = arg("runs/eval/generations.jsonl", "JSONL, one line per (model, prompt)")


def existing_generations(path: Path, models: dict[str, str], prompts: list[dict]) -> set[tuple[str, int]]:
    """(model, prompt_id) pairs already in the output file (a half-written last line is dropped). Fails if the
    file was made for other prompts or if a model name now points to another checkpoint: resuming would mix them."""
    if not path.is_file():
        return set()
    done = set()
    for row in read_jsonl(path, repair=True):
        name, pid = row["model"], int(row["prompt_id"])
        if pid >= len(prompts) or prompts[pid]["prompt_hash"] != row["prompt_hash"]:
            now = prompts[pid]["prompt_hash"] if pid < len(prompts) else f"none: only {len(prompts)} prompts"
            raise EvalError(f"{path}: prompt_id {pid} was generated for another prompt (hash {row['prompt_hash']}, "
                            f"now {now}); use the same --data/--split/--categories or another --output")
        if name in models and row.get("model_path") != models[name]:
            raise EvalError(f"{path}: model {name!r} was generated from {row.get('model_path')!r}, now {models[name]!r} "
                            "is given; use another name or another --output")
        done.add((name, pid))
    return done


PAPER_MAX_NEW_TOKENS = 512


def training_length(model_path: str) -> int:
    """max_new_tokens of the run a policy comes from: the args.json in its folder or the one above it (a PPO run's
    actor/ lives in the run's output folder); the paper's 512 when neither says (an SFT or base model). Answers cut
    shorter than the policy learned to write would be judged as unfinished."""
    for folder in (Path(model_path), Path(model_path).parent):
        file = folder / "args.json"
        if file.is_file():
            value = json.loads(file.read_text()).get("max_new_tokens")
            if value:
                return int(value)
    return PAPER_MAX_NEW_TOKENS


def generate_answers(model, processor, family: str, prompts: list[dict], args) -> list[tuple[str, bool, int]]:
    """(response text, ended with EOS, response tokens) for one batch of prompts, left-padded."""
    from data import collate, encode_example
    from modeling import generate, response_texts
    from utils import get_tokenizer, to_device

    pad_id = get_tokenizer(processor).pad_token_id
    examples = [encode_example(processor, family, p["question"], p["image"], None, args.max_length,
                               source=p.get("source")) for p in prompts]
    batch = to_device(collate(examples, pad_id, "left"), model.device)
    out = generate(model, processor, family, batch, args.max_new_tokens, args.temperature, args.top_p,
                   args.do_sample)
    lengths = out["response_mask"].sum(-1).tolist()
    return list(zip(response_texts(processor, out), out["ended"].tolist(), lengths))


def generate_cmd(args: GenerateArgs) -> dict:
    import gc

    from infra.runlog import quiet_transformers
    from modeling import load_policy
    from utils import seed_everything

    models = parse_named(args.models, "--models")
    if not models:
        raise EvalError("generate: give --models name=path ...")
    quiet_transformers()
    device = device_default()
    prompts = load_eval_prompts(args)
    selected = select_prompt_ids(len(prompts), args.limit)
    path = output_path(args.output)
    done = existing_generations(path, models, prompts)
    counts = {}
    for name, model_path in models.items():
        todo = [i for i in selected if (name, i) not in done]
        counts[name] = {"new": len(todo), "skipped": len(selected) - len(todo)}
        print(f"{name}: {len(todo)} prompts to answer, {len(selected) - len(todo)} already in {path}")
        if not todo:
            continue
        model, processor, family = load_policy(model_path, args.dtype, device, args.quantization,
                                               **model_options(args))
        model.eval()
        length = args.max_new_tokens or training_length(model_path)
        model_args = dataclasses.replace(args, max_new_tokens=length)
        print(f"{name}: up to {length} new tokens" + ("" if args.max_new_tokens else " (its training length)"))
        seed_everything(args.seed)
        for start in tqdm(range(0, len(todo), args.batch_size), desc=f"generate {name}"):
            ids = todo[start:start + args.batch_size]
            answers = generate_answers(model, processor, family, [prompts[i] for i in ids], model_args)
            append_jsonl(path, [
                {"model": name, "model_path": model_path, "prompt_id": i, "prompt_hash": prompts[i]["prompt_hash"],
                 "category": prompts[i]["category"], "question": prompts[i]["question"], "response": text,
                 "ended": bool(ended), "response_tokens": int(n), "max_new_tokens": length}
                for i, (text, ended, n) in zip(ids, answers)])
        del model
        gc.collect()
    print(f"wrote {path}")
    return {"output": str(path), "prompts": len(selected), "prompt_ids": selected, "models": counts}


# ---- 3. score: reward, cost and (toy world) true grades of generated answers ----------------------------------


@dataclasses.dataclass
class ScoreArgs(PromptOptions, ModelOptions):
    """Reward and cost of generated answers; per model: mean reward, mean cost, safe rate (cost <= 0), overall and
    per category. --toy_grader adds the toy world's true helpfulness, harm and well-formed rate."""

    generations: str = arg("runs/eval/generations.jsonl", "output of `generate`")
    reward_model: str = arg("runs/rm", "reward model directory ('' = skip)")
    cost_model: str = arg("runs/cm", "cost model directory ('' = skip)")
    toy_grader: bool = arg(False, "also grade each answer with data.toy_world.grade (true helpfulness and harm)")
    output: str = arg("runs/eval/scores.json", "JSON: per-model summary")
    answers_output: str = arg("", "per-answer scored JSONL ('' = <output without .json>.answers.jsonl)")


def score_answers(model_path: str, rows: list[dict], prompts: list[dict], args, device, desc: str) -> list[float]:
    """Sequence scores of (prompt, answer) pairs under one score model, read at the last real token: the EOS when
    the generation ended, else its last token (as in PPO's scoring of rollouts)."""
    import torch

    from data import collate, encode_example
    from modeling import ScoreModel
    from utils import autocast, get_tokenizer, to_device, torch_dtype

    model, processor = ScoreModel.from_pretrained(model_path, args.dtype, device, args.quantization,
                                                  **model_options(args))
    model.eval()
    pad_id = get_tokenizer(processor).pad_token_id
    stats, scores = Counter(), []
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), args.batch_size), desc=desc, leave=False):
            examples = [encode_example(processor, model.family, p["question"], p["image"], r["response"],
                                       args.max_length, stats, add_eos=bool(r["ended"]), source=p.get("source"))
                        for r, p in zip(rows[start:start + args.batch_size], prompts[start:start + args.batch_size])]
            batch = to_device(collate(examples, pad_id, "right"), device)
            with autocast(device, torch_dtype(args.dtype, device)):
                _, end_scores = model(batch)
            scores += end_scores.float().tolist()
    if stats:
        print(f"{desc}: truncated {dict(stats)}")
    del model
    return scores


def score_rows(rows: list[dict], prompts: list[dict], args, device, toy_grader: bool = False) -> list[dict]:
    """Generation rows + reward, cost, safe (cost <= 0) and, with toy_grader, the true grade."""
    out = [dict(r) for r in rows]
    if args.reward_model:
        for row, value in zip(out, score_answers(args.reward_model, rows, prompts, args, device, "reward")):
            row["reward"] = value
    if args.cost_model:
        for row, value in zip(out, score_answers(args.cost_model, rows, prompts, args, device, "cost")):
            row["cost"], row["safe"] = value, value <= 0
    if toy_grader:
        from data import toy_world

        for row, prompt in zip(out, prompts):
            row["grade"] = toy_world.grade(open_image(prompt["image"], prompt.get("source")), prompt["question"],
                                           row["response"], bool(row["ended"]))
    return out


def summarize_answers(rows: list[dict]) -> dict:
    """Means over scored answers: reward, cost, safe rate; true grades when present; EOS rate and length."""
    out = {"n": len(rows)}
    if rows and "reward" in rows[0]:
        out["mean_reward"] = mean(r["reward"] for r in rows)
    if rows and "cost" in rows[0]:
        out["mean_cost"] = mean(r["cost"] for r in rows)
        out["safe_rate"] = mean(float(r["cost"] <= 0) for r in rows)
    if rows and "grade" in rows[0]:
        from data import toy_world

        s = toy_world.summarize([r["grade"] for r in rows])
        out.update(true_helpfulness=s["mean_helpfulness"], true_harm=s["mean_harm"],
                   well_formed_rate=s["well_formed_rate"], correct_rate=s["correct_rate"],
                   harmful_fraction=s["harmful_fraction"])
    out["ended_rate"] = mean(float(r["ended"]) for r in rows)
    out["truncated_rate"] = 1.0 - out["ended_rate"]  # answers that hit max_new_tokens without EOS, judged unfinished
    if rows and "response_tokens" in rows[0]:
        out["mean_response_tokens"] = mean(r["response_tokens"] for r in rows)
    return out


def summarize_by_model(scored: list[dict]) -> dict:
    """{model: {summary..., per_category: {category: summary}}} in order of first appearance."""
    by_model = defaultdict(list)
    for r in scored:
        by_model[r["model"]].append(r)
    out = {}
    for name, rows in by_model.items():
        by_category = defaultdict(list)
        for r in rows:
            by_category[r["category"]].append(r)
        out[name] = {**summarize_answers(rows),
                     "per_category": {c: summarize_answers(v) for c, v in sorted(by_category.items())}}
    return out


def score(args: ScoreArgs) -> dict:
    from infra.runlog import quiet_transformers

    if not (args.reward_model or args.cost_model or args.toy_grader):
        raise EvalError("score: give --reward_model, --cost_model and/or --toy_grader")
    rows = read_jsonl(args.generations)
    if not rows:
        raise EvalError(f"{args.generations}: no generations")
    prompts = attach_prompts(rows, args, args.generations)  # checks the prompts before loading any model
    quiet_transformers()
    scored = score_rows(rows, prompts, args, device_default(), args.toy_grader)
    answers_path = Path(args.answers_output or Path(args.output).with_suffix(".answers.jsonl"))
    write_jsonl(answers_path, scored)
    result = {"generations": args.generations, "reward_model": args.reward_model, "cost_model": args.cost_model,
              "data": args.data, "split": args.split, "answers": str(answers_path),
              "models": summarize_by_model(scored)}
    write_json(output_path(args.output), result)
    columns = [(k, h) for k, h in SUMMARY_COLUMNS if any(k in s for s in result["models"].values())]
    print(markdown_table(["model", "n"] + [h for _, h in columns],
                         [[m, s["n"]] + [s.get(k) for k, _ in columns] for m, s in result["models"].items()]))
    print("truncated answers (max_new_tokens reached without EOS): " + ", ".join(
        f"{m} {s['truncated_rate']:.1%}" for m, s in result["models"].items()))
    print(f"wrote {args.output} and {answers_path}")
    return result


# ---- 4. winrate: model A vs model B, judged by the reward/cost models or by an LLM ----------------------------


@dataclasses.dataclass
class WinrateArgs(PromptOptions, ModelOptions):
    """Win rates of model A over model B on the same prompts (helpfulness and harmlessness), with 95% Wilson
    intervals. Judges: rm_cm (R_A > R_B, C_A < C_B) or llm (an OpenAI-compatible chat endpoint, both orders)."""

    generations: str = arg("runs/eval/generations.jsonl", "output of `generate` (rm_cm with --scores does not need it)")
    model_a: str = arg("", "model name in the generations (the candidate)")
    model_b: str = arg("", "model name in the generations (the baseline)")
    judge: str = arg("rm_cm", "rm_cm: reward and cost models; llm: an LLM judge behind an OpenAI-compatible endpoint")
    scores: str = arg("", "rm_cm: per-answer JSONL from `score` ('' = compute with --reward_model/--cost_model)")
    reward_model: str = arg("runs/rm", "rm_cm without --scores: reward model directory")
    cost_model: str = arg("runs/cm", "rm_cm without --scores: cost model directory")
    judge_base_url: str = arg("https://api.openai.com/v1", "llm: base URL of the chat-completions API")
    judge_model: str = arg("gpt-4o", "llm: judge model name (the paper: GPT-4o)")
    judge_api_key_env: str = arg("OPENAI_API_KEY", "llm: name of the environment variable holding the API key")
    judge_cache: str = arg("", "llm: JSONL cache of verdicts ('' = <output without .json>.judge_cache.jsonl)")
    judge_workers: int = arg(4, "llm: parallel requests")
    judge_timeout: float = arg(120.0, "llm: seconds per HTTP request")
    judge_max_tokens: int = arg(1024, "llm: max_tokens of each judgement (0 = not sent)")
    judge_temperature: float = arg(0.0, "llm: sampling temperature of the judge")
    max_retries: int = arg(6, "llm: retries on HTTP 429 / 5xx / connection errors (exponential backoff)")
    retry_backoff: float = arg(2.0, "llm: first backoff in seconds; doubles on every retry")
    limit: int = arg(0, "judge only the first N shared prompts (0 = all)")
    output: str = arg("runs/eval/winrate.json", "JSON with counts, win rates and intervals")


def pair_rows(rows: list[dict], model_a: str, model_b: str, limit: int = 0) -> tuple[list[tuple[dict, dict]], dict]:
    """(row of A, row of B) for every prompt both models answered, by prompt_id; and how many were unpaired."""
    by_model = defaultdict(dict)
    for r in rows:
        by_model[r["model"]][int(r["prompt_id"])] = r
    for name in (model_a, model_b):
        if name not in by_model:
            raise EvalError(f"model {name!r} has no answers; available: {sorted(by_model)}")
    if model_a == model_b:
        raise EvalError("--model_a and --model_b must differ")
    a, b = by_model[model_a], by_model[model_b]
    shared = sorted(set(a) & set(b))
    for pid in shared:
        if a[pid]["prompt_hash"] != b[pid]["prompt_hash"]:
            raise EvalError(f"prompt_id {pid}: {model_a} and {model_b} answered different prompts (hash mismatch)")
    if limit:
        shared = shared[:limit]
    unpaired = {model_a: len(set(a) - set(b)), model_b: len(set(b) - set(a))}
    if not shared:
        raise EvalError(f"{model_a} and {model_b} share no prompts")
    return [(a[pid], b[pid]) for pid in shared], unpaired


def scored_lookup(path: str) -> list[dict]:
    rows = read_jsonl(path)
    missing = [k for k in ("reward", "cost") if rows and k not in rows[0]]
    if missing:
        raise EvalError(f"{path}: no {' or '.join(missing)} per answer; run `score` with both models")
    return rows


def judge_config(args: WinrateArgs) -> JudgeConfig:
    """The LLM judge's settings from the --judge_* and retry options."""
    return JudgeConfig(model=args.judge_model, base_url=args.judge_base_url, api_key_env=args.judge_api_key_env,
                       workers=args.judge_workers, timeout=args.judge_timeout, max_tokens=args.judge_max_tokens,
                       temperature=args.judge_temperature, max_retries=args.max_retries,
                       retry_backoff=args.retry_backoff)


def winrate(args: WinrateArgs) -> dict:
    if args.judge not in ("rm_cm", "llm"):
        raise EvalError(f"--judge must be rm_cm or llm, got {args.judge!r}")
    if not args.model_a or not args.model_b:
        raise EvalError("winrate: give --model_a and --model_b")
    result = {"model_a": args.model_a, "model_b": args.model_b, "judge": args.judge}
    if args.judge == "rm_cm":
        if not args.scores and not (args.reward_model and args.cost_model):
            raise EvalError("winrate --judge rm_cm: give --scores (from `score`) or both --reward_model and --cost_model")
        if args.scores:
            pairs, unpaired = pair_rows(scored_lookup(args.scores), args.model_a, args.model_b, args.limit)
        else:
            from infra.runlog import quiet_transformers

            pairs, unpaired = pair_rows(read_jsonl(args.generations), args.model_a, args.model_b, args.limit)
            rows = [r for pair in pairs for r in pair]
            prompts = attach_prompts(rows, args, args.generations)
            quiet_transformers()
            scored = score_rows(rows, prompts, args, device_default())
            pairs = list(zip(scored[0::2], scored[1::2]))
        same = lambda a, b: a.get("response") is not None and a.get("response") == b.get("response")
        outcomes = rm_cm_outcomes([{"prompt_id": a["prompt_id"], "reward_a": a["reward"], "reward_b": b["reward"],
                                    "cost_a": a["cost"], "cost_b": b["cost"], "same_answer": same(a, b)}
                                   for a, b in pairs])
        result["scores"] = args.scores or {"reward_model": args.reward_model, "cost_model": args.cost_model}
        stats = {}
    else:
        pairs, unpaired = pair_rows(read_jsonl(args.generations), args.model_a, args.model_b, args.limit)
        prompts = attach_prompts([a for a, _ in pairs], args, args.generations)
        judged = [{"prompt_id": a["prompt_id"], "prompt_hash": a["prompt_hash"], "question": p["question"],
                   "image": open_image(p["image"], p.get("source")), "answer_a": a["response"],
                   "answer_b": b["response"]}
                  for (a, b), p in zip(pairs, prompts)]
        cache_path = args.judge_cache or Path(args.output).with_suffix(".judge_cache.jsonl")
        outcomes, stats = llm_outcomes(judged, judge_config(args), VerdictCache(cache_path))
        result.update(judge_model=args.judge_model, judge_base_url=args.judge_base_url,
                      judge_prompt_version=JUDGE_PROMPT_VERSION, judge_cache=str(cache_path))
    result.update(
        pairs=len(pairs), unpaired=unpaired,
        helpfulness=tally([o["helpfulness"] for o in outcomes]),
        harmlessness=tally([o["harmlessness"] for o in outcomes]),
        interval="95% Wilson score interval on wins / (wins + losses); ties, position-inconsistent, unparseable "
                 "and failed comparisons are excluded from the rate and reported as counts",
        **stats, per_pair=outcomes,
        args={k: v for k, v in dataclasses.asdict(args).items()})  # holds the variable's name, never the key
    write_json(output_path(args.output), result)
    print(winrate_table(result))
    print(f"wrote {args.output}")
    return result


# ---- 5. plot: training curves of PPO runs and the data-size figure of score-model runs ------------------------


@dataclasses.dataclass
class PlotArgs:
    """PNG figures: reward, cost (with the threshold, dashed), lambda and KL against step for one or more PPO runs;
    and/or RM/CM accuracy against the number of training pairs (the paper's data-size table)."""

    runs: list = arg([], "PPO runs: name=dir ... (each dir holds metrics.jsonl and args.json)")
    output: str = arg("runs/eval/training_curves.png", "training-curves figure")
    smooth: int = arg(1, "moving-average window over logged steps (1 = raw)")
    score_runs: list = arg([], "reward/cost model runs: name=dir ... (each dir holds summary.json)")
    score_output: str = arg("runs/eval/data_size.png", "data-size figure (a markdown table is written next to it)")


def plot(args: PlotArgs) -> dict:
    if not args.runs and not args.score_runs:
        raise EvalError("plot: give --runs name=dir ... and/or --score_runs name=dir ...")
    result = {}
    if args.runs:
        plot_training_curves(parse_named(args.runs, "--runs"), args.output, args.smooth)
        print(f"wrote {args.output}")
        result["training_curves"] = args.output
    if args.score_runs:
        _, rows = plot_data_size(parse_named(args.score_runs, "--score_runs"), args.score_output)
        table = data_size_table(rows)
        table_path = Path(args.score_output).with_suffix(".md")
        table_path.write_text(table + "\n", encoding="utf-8")
        print(table)
        print(f"wrote {args.score_output} and {table_path}")
        result.update(data_size=args.score_output, data_size_table=str(table_path), data_size_rows=rows)
    return result


# ---- 6. table: the final comparison of models -----------------------------------------------------------------


@dataclasses.dataclass
class TableArgs:
    """A comparison table (rows = models) from `score` and `winrate` outputs: win rates vs the baseline with 95%
    intervals, the toy world's true grades when present, safe rate, then mean reward and cost (in the units of
    the run's own reward and cost models, so last: they do not compare across runs or machines)."""

    scores: list = arg([], "`score` output JSON files")
    winrates: list = arg([], "`winrate` output JSON files")
    models: list = arg([], "row order (empty = order of appearance)")
    per_category: bool = arg(False, "add a table with one row per (model, category), e.g. MM-SafetyBench scenarios: "
                                    "mean cost, safe rate and the other score columns")
    output: str = arg("runs/eval/table.md", "markdown file")


def table(args: TableArgs) -> str:
    if not args.scores and not args.winrates:
        raise EvalError("table: give --scores and/or --winrates")
    scores = [read_json(p) for p in args.scores]
    text = comparison_table(scores, [read_json(p) for p in args.winrates], args.models)
    if args.per_category:
        text += "\n\n" + per_category_table(scores, args.models)
    output_path(args.output).write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"wrote {args.output}")
    return text


# ---- Command line ---------------------------------------------------------------------------------------------

SUBCOMMANDS = {
    "preference": (PreferenceArgs, preference),
    "generate": (GenerateArgs, generate_cmd),
    "score": (ScoreArgs, score),
    "winrate": (WinrateArgs, winrate),
    "plot": (PlotArgs, plot),
    "table": (TableArgs, table),
}


def usage() -> str:
    lines = ["usage: python evaluate.py <subcommand> [options]   (python evaluate.py <subcommand> --help)", "",
             "subcommands:"]
    for name, (cls, _) in SUBCOMMANDS.items():
        lines.append(f"  {name:11s} {' '.join(cls.__doc__.split())}")
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if not argv:
            raise SystemExit(2)
        return None
    name = argv[0]
    if name not in SUBCOMMANDS:
        raise SystemExit(f"unknown subcommand {name!r}\n\n{usage()}")
    cls, run = SUBCOMMANDS[name]
    program, sys.argv[0] = sys.argv[0], f"evaluate.py {name}"  # argparse's usage line names the subcommand
    try:
        args = parse_args(cls, argv[1:], description=f"evaluate.py {name}: {' '.join(cls.__doc__.split())}")
    finally:
        sys.argv[0] = program
    return run(args)


if __name__ == "__main__":
    try:
        main()
    except (EvalError, DataError, JudgeError) as e:
        raise SystemExit(f"error: {e}")
