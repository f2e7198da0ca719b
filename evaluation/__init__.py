"""The torch-free layers of evaluate.py.

    records  EvalError, `name=path` options, JSON / JSONL reading and writing, output paths
    judge    the LLM judge: rubric, chat-completions requests with retries, verdicts, cache, both-order combination
    report   win/loss tallies with Wilson intervals, markdown tables, training-curve and data-size figures

Nothing is imported here, so `import evaluation.records` loads only what it needs.
"""
