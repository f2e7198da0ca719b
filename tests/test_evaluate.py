"""evaluate.py and its evaluation/ layers: win-rate judges (RM/CM and an LLM behind a local stub server), the Wilson
interval, plots, and generate -> score -> winrate -> table end to end on a tiny LLaVA, plus preference accuracy
against a direct computation; and that the evaluation/ layers load without torch. Offline; the only network traffic
goes to 127.0.0.1."""

import base64
import dataclasses
import io
import json
import math
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import evaluate
from data import open_image
from evaluation.judge import JudgeError, JudgeRejected, combine_orders, parse_verdict, post_chat
from evaluation.records import EvalError, parse_named
from evaluation.report import plot_data_size, plot_training_curves, rm_cm_outcomes, tally, wilson_interval

ROOT = Path(__file__).resolve().parents[1]

SECRET = "sk-test-SECRET-4f1c9a"


# ---- command line -------------------------------------------------------------------------------------------


def test_help_lists_subcommands_and_every_option(capsys):
    evaluate.main(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in evaluate.SUBCOMMANDS)
    for name, (cls, _) in evaluate.SUBCOMMANDS.items():
        with pytest.raises(SystemExit) as e:
            evaluate.main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert f"evaluate.py {name}" in text
        for field in dataclasses.fields(cls):
            assert f"--{field.name}" in text
        assert "(default:" in text
    with pytest.raises(SystemExit):
        evaluate.main(["nonsense"])


def test_evaluation_layers_do_not_import_torch():
    """The judge, report and records layers load without torch (a fresh interpreter, so nothing is preloaded)."""
    code = "import sys, evaluation.judge, evaluation.report, evaluation.records; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- RM/CM judge and the Wilson interval --------------------------------------------------------------------


def test_wilson_interval_by_hand():
    z = 1.959963984540054
    for wins, n in ((7, 10), (3, 4), (0, 5), (5, 5)):
        p = wins / n
        center = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        low, high = wilson_interval(wins, n)
        assert low == pytest.approx(max(0.0, center - half), abs=1e-12)
        assert high == pytest.approx(min(1.0, center + half), abs=1e-12)
    low, high = wilson_interval(7, 10)
    assert (round(low, 4), round(high, 4)) == (0.3968, 0.8922)  # the textbook values for 7/10
    assert wilson_interval(0, 0) == (None, None)


def test_rm_cm_judge_hand_made_scores(tmp_path):
    rewards_a, rewards_b = [1.0, 2.0, 3.0, 0.5, 1.0], [0.0, 2.0, 4.0, 0.1, 0.0]   # win tie loss win win
    costs_a, costs_b = [-1.0, 0.0, 1.0, -2.0, 0.5], [0.0, 0.0, 0.5, -1.0, -3.0]  # win tie loss win loss
    pairs = [{"prompt_id": i, "reward_a": rewards_a[i], "reward_b": rewards_b[i], "cost_a": costs_a[i],
              "cost_b": costs_b[i]} for i in range(5)]
    outcomes = rm_cm_outcomes(pairs)
    assert [o["helpfulness"] for o in outcomes] == ["win", "tie", "loss", "win", "win"]
    assert [o["harmlessness"] for o in outcomes] == ["win", "tie", "loss", "win", "loss"]
    help_, harm = tally([o["helpfulness"] for o in outcomes]), tally([o["harmlessness"] for o in outcomes])
    assert (help_["wins"], help_["losses"], help_["ties"], help_["decided"]) == (3, 1, 1, 4)
    assert help_["win_rate"] == 3 / 4 and help_["ci95"] == list(wilson_interval(3, 4))
    assert (harm["wins"], harm["losses"], harm["ties"], harm["decided"]) == (2, 2, 1, 4)
    assert harm["win_rate"] == 0.5
    # the same answer text is a tie, whatever the last bits of its two scores (batches padded differently)
    same = rm_cm_outcomes([{**pairs[0], "reward_b": 1.0 - 1e-7, "cost_b": -1.0 + 1e-7, "same_answer": True}])
    assert (same[0]["helpfulness"], same[0]["harmlessness"]) == ("tie", "tie")

    # the same through the command line, from a per-answer scores file as `score` writes it
    rows = []
    for i in range(5):
        rows.append({"model": "a", "prompt_id": i, "prompt_hash": f"h{i}", "reward": rewards_a[i], "cost": costs_a[i]})
        rows.append({"model": "b", "prompt_id": i, "prompt_hash": f"h{i}", "reward": rewards_b[i], "cost": costs_b[i]})
    rows.append({"model": "a", "prompt_id": 9, "prompt_hash": "h9", "reward": 0.0, "cost": 0.0})  # B never answered
    scores = tmp_path / "answers.jsonl"
    scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate.main(["winrate", "--scores", str(scores), "--model_a", "a", "--model_b", "b",
                            "--output", str(tmp_path / "wr.json")])
    assert result["pairs"] == 5 and result["unpaired"] == {"a": 1, "b": 0}
    assert result["helpfulness"] == help_ and result["harmlessness"] == harm
    assert json.loads((tmp_path / "wr.json").read_text())["helpfulness"]["wins"] == 3
    # through the command line too: the same response on a prompt is a tie, another response is judged
    for row in rows:
        row["response"] = "It is red." if row["prompt_id"] == 0 else f"{row['model']} {row['prompt_id']}"
    scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    same = evaluate.main(["winrate", "--scores", str(scores), "--model_a", "a", "--model_b", "b",
                          "--output", str(tmp_path / "wr2.json")])
    assert (same["helpfulness"]["wins"], same["helpfulness"]["ties"]) == (2, 2)  # prompt 0's win is now a tie
    with pytest.raises(EvalError, match="no answers"):
        evaluate.main(["winrate", "--scores", str(scores), "--model_a", "a", "--model_b", "c",
                       "--output", str(tmp_path / "x.json")])


# ---- LLM judge against a local stub server -------------------------------------------------------------------


def verdict_text(h1, h2, s1, s2, more_helpful, safer):
    return (f"Response 1 is shorter. <helpful_1>{h1}</helpful_1><helpful_2>{h2}</helpful_2>"
            f"<harmless_1>{s1}</harmless_1><harmless_2>{s2}</harmless_2>"
            f"<more_helpful>{more_helpful}</more_helpful><safer>{safer}</safer>")


def test_parse_verdict():
    assert parse_verdict(verdict_text(2, 1, -1, 3, 1, 2)) == {
        "helpful": [2, 1], "harmless": [-1, 3], "more_helpful": 1, "safer": 2}
    # the rubric echoed first, then the real tags: the last occurrence counts; "Response 2" is read as 2
    echoed = "<more_helpful>1 or 2</more_helpful>" + verdict_text(0, 3, 0, 2, "Response 2", 2)
    assert parse_verdict(echoed)["more_helpful"] == 2
    assert parse_verdict(verdict_text(4, 1, 0, 0, 1, 1)) is None  # helpfulness out of 0..3
    assert parse_verdict(verdict_text(1, 1, 0, -4, 1, 1)) is None  # harmlessness out of -3..3
    assert parse_verdict(verdict_text(1, 1, 0, 0, "tie", 1)) is None  # no ties
    assert parse_verdict("A is better.") is None and parse_verdict(None) is None
    assert combine_orders({"more_helpful": 1}, {"more_helpful": 2}, "more_helpful") == "win"
    assert combine_orders({"more_helpful": 2}, {"more_helpful": 1}, "more_helpful") == "loss"
    assert combine_orders({"more_helpful": 1}, {"more_helpful": 1}, "more_helpful") == "inconsistent"
    assert combine_orders(None, {"more_helpful": 1}, "more_helpful") == "unparseable"


class StubServer:
    """An OpenAI-compatible chat-completions stub on 127.0.0.1 (port 0) that records every request."""

    def __init__(self, respond):
        self.respond, self.requests, self.lock = respond, [], threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    n = len(stub.requests)
                status, payload = stub.respond(n, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def user_parts(body):
    content = body["messages"][-1]["content"]
    text = next(p["text"] for p in content if p["type"] == "text")
    images = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
    return text, images


def chat(content):
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                         "content": content}}]}


def judge_stub(n, body):
    """Request 1 fails with a 500. Prompt 0: A more helpful, B safer (consistent); prompt 1: always Response 1
    (position bias); prompt 2: no tags; prompt 3: A better on both."""
    if n == 1:
        return 500, {"error": {"message": "overloaded"}}
    text, _ = user_parts(body)
    i = int(re.search(r"ANSWER_A_(\d)", text).group(1))
    a_pos = 1 if text.index("ANSWER_A") < text.index("ANSWER_B") else 2
    b_pos = 3 - a_pos
    if i == 0:
        return 200, chat(verdict_text(3, 1, -1, 2, a_pos, b_pos))
    if i == 1:
        return 200, chat(verdict_text(2, 2, 1, 1, 1, 1))
    if i == 2:
        return 200, chat("Both answers are fine, I cannot decide.")
    return 200, chat(verdict_text(3, 1, 2, -2, a_pos, a_pos))


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def prompt_args(toy_world_dir):
    return SimpleNamespace(data=str(toy_world_dir / "pairs"), split="evaluation", categories=[], skip_invalid=False)


def test_llm_judge_against_stub_server(tmp_path, toy_world_dir, monkeypatch, capsys, no_proxy):
    monkeypatch.setenv("TEST_JUDGE_KEY", SECRET)
    prompts = evaluate.load_eval_prompts(prompt_args(toy_world_dir))
    rows = []
    for i, p in enumerate(prompts[:5]):
        common = {"prompt_id": i, "prompt_hash": p["prompt_hash"], "category": p["category"],
                  "question": p["question"], "ended": True}
        answer_b = f"ANSWER_B_{i} It is red." if i != 4 else f"ANSWER_A_{i} same."
        rows += [{"model": "a", "response": f"ANSWER_A_{i} It is blue.", **common},
                 {"model": "b", "response": answer_b, **common}]
    rows[-1]["response"] = rows[-2]["response"]  # prompt 4: identical answers -> a tie, no request
    generations = tmp_path / "gen.jsonl"
    generations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stub = StubServer(judge_stub)
    argv = ["winrate", "--judge", "llm", "--generations", str(generations), "--model_a", "a", "--model_b", "b",
            "--data", str(toy_world_dir / "pairs"), "--judge_base_url", stub.url, "--judge_model", "stub-judge",
            "--judge_api_key_env", "TEST_JUDGE_KEY", "--retry_backoff", "0.001", "--judge_workers", "2",
            "--judge_cache", str(tmp_path / "cache.jsonl"), "--output", str(tmp_path / "wr.json")]
    try:
        result = evaluate.main(argv)
        assert len(stub.requests) == 9  # 4 pairs x 2 orders + the retried 500
        first = list(stub.requests)
        rerun = evaluate.main(argv)
        assert len(stub.requests) == 9  # everything came from the cache
    finally:
        stub.close()

    # both orders of every pair, answers swapped, the image as a PNG data URL, the key only in the header
    seen = {}
    for request in first:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
        assert SECRET not in json.dumps(request["body"])
        assert request["body"]["model"] == "stub-judge"
        text, images = user_parts(request["body"])
        i = int(re.search(r"ANSWER_A_(\d)", text).group(1))
        seen.setdefault(i, set()).add("AB" if text.index("ANSWER_A") < text.index("ANSWER_B") else "BA")
        assert len(images) == 1 and images[0].startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(images[0].split(",", 1)[1]))).convert("RGB")
        assert decoded.tobytes() == open_image(prompts[i]["image"]).tobytes()
        assert prompts[i]["question"] in text
    assert seen == {i: {"AB", "BA"} for i in range(4)}

    help_, harm = result["helpfulness"], result["harmlessness"]
    assert (help_["wins"], help_["losses"], help_["ties"], help_["inconsistent"], help_["unparseable"]) == (2, 0, 1, 1, 1)
    assert (harm["wins"], harm["losses"], harm["ties"], harm["inconsistent"], harm["unparseable"]) == (1, 1, 1, 1, 1)
    assert help_["win_rate"] == 1.0 and harm["win_rate"] == 0.5
    assert harm["ci95"] == list(wilson_interval(1, 2))
    assert result["unparseable_verdicts"] == 2 and result["requests_sent"] == 8
    assert [o["helpfulness"] for o in result["per_pair"]] == ["win", "inconsistent", "unparseable", "win", "tie"]
    assert rerun["helpfulness"] == help_ and rerun["harmlessness"] == harm and rerun["requests_sent"] == 0
    cache = [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert len(cache) == 8 and sum(c["verdict"] is None for c in cache) == 2

    # the key is in no file written and in nothing printed
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 3
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in "".join(capsys.readouterr())
    assert json.loads((tmp_path / "wr.json").read_text())["args"]["judge_api_key_env"] == "TEST_JUDGE_KEY"


@pytest.mark.parametrize("status, attempts, error", [(429, 3, JudgeError), (503, 3, JudgeError),
                                                    (401, 1, JudgeError), (400, 1, JudgeRejected)])
def test_post_chat_retries_and_errors(status, attempts, error, no_proxy):
    stub = StubServer(lambda n, body: (status, {"error": {"message": "no"}}))
    try:
        with pytest.raises(error) as e:
            post_chat(stub.url + "/chat/completions", {"model": "m"}, SECRET, timeout=5, max_retries=2,
                      backoff=0.001)
        assert len(stub.requests) == attempts
        assert SECRET not in str(e.value)
    finally:
        stub.close()


# ---- plots --------------------------------------------------------------------------------------------------


def write_run(run_dir: Path, records: list[dict], args: dict) -> str:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "args.json").write_text(json.dumps(args))
    return str(run_dir)


def test_plot_training_curves(tmp_path):
    lag = [{"step": s, "reward": 0.1 * s, "cost": 1 - 0.2 * s, "lambda": 1 + 0.5 * s, "kl": 0.01 * s} for s in range(1, 11)]
    plain = [{"step": s, "reward": 0.2 * s, "cost": 1 + 0.1 * s, "kl": 0.02 * s} for s in range(1, 8)]
    plain.insert(3, {"step": 4, "eval/accuracy": 0.5})  # a record without the panel keys
    plain.append({"step": 8, "reward": "nan", "cost": 2.0, "kl": 0.1})  # a non-finite value is skipped
    runs = {"ppo_lag": write_run(tmp_path / "lag", lag, {"threshold": -0.5, "algo": "ppo_lag"}),
            "ppo": write_run(tmp_path / "ppo", plain, {"threshold": 0.0, "algo": "ppo"})}  # no budget: no line
    out = tmp_path / "figs" / "curves.png"
    fig = plot_training_curves(runs, str(out))
    axes = fig.get_axes()
    assert [ax.get_ylabel() for ax in axes] == ["reward", "cost", "λ", "KL"]
    assert [len(ax.get_lines()) for ax in axes] == [2, 3, 1, 2]  # cost: 2 runs + the threshold; λ: only PPO-Lag
    reward_x = [list(line.get_xdata()) for line in axes[0].get_lines()]
    assert reward_x == [list(map(float, range(1, 11))), list(map(float, range(1, 8)))]
    threshold = [line for line in axes[1].get_lines() if line.get_linestyle() == "--"]
    assert len(threshold) == 1 and list(threshold[0].get_ydata()) == [-0.5, -0.5]
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["ppo_lag", "ppo"]
    assert [t.get_text() for t in axes[1].get_legend().get_texts()] == ["ppo_lag", "ppo", "threshold d = -0.5"]
    assert [t.get_text() for t in axes[2].get_legend().get_texts()] == ["ppo_lag"]
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000

    # two different thresholds: one dashed line each
    runs["other"] = write_run(tmp_path / "other", lag, {"threshold": 0.0})  # no "algo": constrained
    fig = plot_training_curves(runs)
    dashed = sorted(line.get_ydata()[0] for line in fig.get_axes()[1].get_lines() if line.get_linestyle() == "--")
    assert dashed == [-0.5, 0.0]


def test_plot_data_size(tmp_path):
    def run(name, stage, pairs, acc, sign=None):
        d = tmp_path / name
        d.mkdir()
        summary = {"stage": stage, "train_pairs": pairs, "eval/accuracy": acc}
        if sign is not None:
            summary["eval/sign_accuracy"] = sign
        (d / "summary.json").write_text(json.dumps(summary))
        return f"{name}={d}"

    specs = [run("rm15k", "reward_model", 15000, 0.845), run("rm5k", "reward_model", 5000, 0.822),
             run("cm5k", "cost_model", 5000, 0.545, 0.661), run("cm15k", "cost_model", 15000, 0.793, 0.878)]
    out = tmp_path / "size.png"
    result = evaluate.main(["plot", "--score_runs", *specs, "--score_output", str(out)])
    assert out.is_file() and out.stat().st_size > 1000
    assert [(r["run"], r["train_pairs"]) for r in result["data_size_rows"]] == [
        ("cm5k", 5000), ("rm5k", 5000), ("cm15k", 15000), ("rm15k", 15000)]
    fig, _ = plot_data_size(parse_named(specs, "--score_runs"))
    ax = fig.get_axes()[0]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"RM accuracy": ([5000, 15000], [0.822, 0.845]), "CM accuracy": ([5000, 15000], [0.545, 0.793]),
                     "CM sign accuracy": ([5000, 15000], [0.661, 0.878])}
    table = (tmp_path / "size.md").read_text()
    assert "| rm5k" in table and "0.661" in table


# ---- generate -> score -> winrate -> table, and preference, on a tiny LLaVA -----------------------------------


@pytest.fixture(scope="module")
def score_model_dir(tiny_models, tmp_path_factory):
    from modeling import ScoreModel

    torch.manual_seed(0)
    model, processor = ScoreModel.from_pretrained(tiny_models["llava"])
    path = tmp_path_factory.mktemp("score_model")
    model.save_pretrained(str(path), processor)
    return str(path)


def test_generate_score_winrate_table(tiny_models, toy_world_dir, score_model_dir, tmp_path):
    from data import toy_world

    policy, data = tiny_models["llava"], str(toy_world_dir / "pairs")
    gen = tmp_path / "gen.jsonl"
    generate = ["generate", "--models", f"sft={policy}", f"ppo={policy}", "--data", data, "--limit", "8",
                "--max_new_tokens", "8", "--batch_size", "4", "--output", str(gen)]
    result = evaluate.main(generate)
    assert result["models"] == {"sft": {"new": 8, "skipped": 0}, "ppo": {"new": 8, "skipped": 0}}
    prompts = evaluate.load_eval_prompts(prompt_args(toy_world_dir))  # prompt_id indexes the full list (60 here)
    ids = result["prompt_ids"]
    assert ids == evaluate.select_prompt_ids(60, 8) and len(set(ids)) == 8 and max(ids) < 60
    assert set(evaluate.select_prompt_ids(60, 4)) < set(ids)  # a larger --limit extends a smaller one
    assert len({prompts[i]["category"] for i in ids}) > 1  # spread over the list, not just its first category
    rows = [json.loads(line) for line in gen.read_text().splitlines()]
    assert len(rows) == 16 and {(r["model"], r["prompt_id"]) for r in rows} == {(m, i) for m in ("sft", "ppo") for i in ids}
    for r in rows:
        assert set(r) >= {"model", "prompt_id", "prompt_hash", "question", "category", "response", "ended"}
        assert r["prompt_hash"] == prompts[r["prompt_id"]]["prompt_hash"]
        assert r["question"] == prompts[r["prompt_id"]]["question"] and isinstance(r["ended"], bool)
        assert 1 <= r["response_tokens"] <= 8

    # a rerun skips everything; an interrupted file (5 lines + a half-written one) is completed without duplicates
    before = gen.read_text()
    assert evaluate.main(generate)["models"]["sft"] == {"new": 0, "skipped": 8} and gen.read_text() == before
    kept = before.splitlines(keepends=True)[:5]
    gen.write_text("".join(kept) + '{"model": "pp')
    evaluate.main(generate)
    lines = gen.read_text().splitlines(keepends=True)
    assert lines[:5] == kept and len(lines) == 16
    assert len({(json.loads(x)["model"], json.loads(x)["prompt_id"]) for x in lines}) == 16

    # score with the toy grader
    out = tmp_path / "scores.json"
    scores = evaluate.main(["score", "--generations", str(gen), "--reward_model", score_model_dir, "--cost_model",
                            score_model_dir, "--data", data, "--toy_grader", "--output", str(out)])
    assert json.loads(out.read_text())["models"].keys() == {"sft", "ppo"}
    answers = [json.loads(x) for x in (tmp_path / "scores.answers.jsonl").read_text().splitlines()]
    assert len(answers) == 16
    for name, s in scores["models"].items():
        assert s["n"] == 8
        mine = [a for a in answers if a["model"] == name]
        assert s["mean_reward"] == pytest.approx(sum(a["reward"] for a in mine) / 8)
        assert s["mean_cost"] == pytest.approx(sum(a["cost"] for a in mine) / 8)
        assert s["safe_rate"] == pytest.approx(sum(a["cost"] <= 0 for a in mine) / 8)
        for key in ("safe_rate", "well_formed_rate", "correct_rate", "harmful_fraction", "ended_rate"):
            assert 0 <= s[key] <= 1
        assert -1 <= s["true_helpfulness"] <= 4 and -3 <= s["true_harm"] <= 3
        assert set(s["per_category"]) == {a["category"] for a in mine}
        expected = toy_world.summarize([toy_world.grade(prompts[a["prompt_id"]]["image"], a["question"],
                                                        a["response"], a["ended"]) for a in mine])
        assert s["true_helpfulness"] == pytest.approx(expected["mean_helpfulness"])
        assert s["true_harm"] == pytest.approx(expected["mean_harm"])

    # answers generated for other prompts are refused
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "prompt_hash": "0123456789abcdef"}) + "\n")
    with pytest.raises(EvalError, match="prompt_hash"):
        evaluate.main(["score", "--generations", str(bad), "--reward_model", score_model_dir, "--data", data,
                       "--output", str(tmp_path / "bad.json")])

    # RM/CM win rate from the scores file, and computed from scratch: the same counts
    by_key = {(a["model"], a["prompt_id"]): a for a in answers}
    wins = sum(by_key["ppo", i]["reward"] > by_key["sft", i]["reward"] for i in ids)
    ties = sum(by_key["ppo", i]["reward"] == by_key["sft", i]["reward"] for i in ids)
    from_file = evaluate.main(["winrate", "--scores", str(tmp_path / "scores.answers.jsonl"), "--model_a", "ppo",
                               "--model_b", "sft", "--output", str(tmp_path / "wr.json")])
    assert from_file["helpfulness"]["wins"] == wins and from_file["helpfulness"]["ties"] == ties
    assert from_file["helpfulness"]["decided"] + ties == 8
    computed = evaluate.main(["winrate", "--generations", str(gen), "--model_a", "ppo", "--model_b", "sft",
                              "--reward_model", score_model_dir, "--cost_model", score_model_dir, "--data", data,
                              "--output", str(tmp_path / "wr2.json")])
    for dim in ("helpfulness", "harmlessness"):
        assert {k: computed[dim][k] for k in ("wins", "losses", "ties")} == \
               {k: from_file[dim][k] for k in ("wins", "losses", "ties")}

    text = evaluate.main(["table", "--scores", str(out), "--winrates", str(tmp_path / "wr.json"),
                          "--models", "sft", "ppo", "--output", str(tmp_path / "table.md")])
    lines = text.splitlines()
    assert lines[0].startswith("| model") and "safe rate" in lines[0] and "true harm" in lines[0]
    assert "helpfulness win vs sft (rm_cm)" in lines[0]
    # scale-free figures first; reward and cost (each run's own RM/CM units) last
    headers = [h.strip() for h in lines[0].strip("|").split("|")]
    assert headers.index("helpfulness win vs sft (rm_cm)") < headers.index("safe rate") < headers.index(
        "mean reward (RM units)") < headers.index("mean cost (CM units)") == len(headers) - 1
    assert lines[2].startswith("| sft ") and "(baseline)" in lines[2] and lines[3].startswith("| ppo ")
    assert (tmp_path / "table.md").read_text().strip() == text.strip()


def test_preference_matches_direct_computation(toy_world_dir, score_model_dir, tmp_path):
    from score_training import sign_correct
    from data import collate, cost_pair, encode_example, load_pairs, reward_pair
    from modeling import ScoreModel
    from utils import get_tokenizer

    data = str(toy_world_dir / "pairs")
    out = tmp_path / "pref.json"
    result = evaluate.main(["preference", "--data", data, "--reward_model", score_model_dir, "--cost_model",
                            score_model_dir, "--categories", "fire_risk", "sharp_objects", "--limit", "24",
                            "--batch_size", "5", "--output", str(out)])
    assert json.loads(out.read_text())["pairs"] == 24

    model, processor = ScoreModel.from_pretrained(score_model_dir)
    model.eval()
    pad = get_tokenizer(processor).pad_token_id

    @torch.no_grad()
    def score(pair, response):
        example = encode_example(processor, model.family, pair["question"], pair["image"], response, 4096)
        return model(collate([example], pad))[1].item()

    rows, _ = load_pairs(data, "evaluation", ["fire_risk", "sharp_objects"], limit=24)
    rm_hits, cm_hits, sign_hits = [], [], []
    for row in rows:
        r = reward_pair(row)
        rm_hits.append(score(r, r["chosen"]) > score(r, r["rejected"]))
        c = cost_pair(row)
        higher, safer = score(c, c["higher_cost"]), score(c, c["safer"])
        cm_hits.append(higher > safer)
        sign_hits += [sign_correct(torch.tensor([higher]), torch.tensor([c["higher_cost_is_safe"]])).item(),
                      sign_correct(torch.tensor([safer]), torch.tensor([c["safer_is_safe"]])).item()]
    rm, cm = result["reward_model"], result["cost_model"]
    assert rm["accuracy"] == pytest.approx(sum(rm_hits) / 24) and 0 <= rm["accuracy"] <= 1
    assert cm["accuracy"] == pytest.approx(sum(cm_hits) / 24) and 0 <= cm["accuracy"] <= 1
    assert cm["sign_accuracy"] == pytest.approx(sum(sign_hits) / 48) and 0 <= cm["sign_accuracy"] <= 1
    assert "sign_accuracy" not in rm
    assert sum(c["pairs"] for c in rm["per_category"].values()) == 24
    for category, m in cm["per_category"].items():
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["sign_accuracy"] <= 1
