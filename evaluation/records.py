"""Files and names shared by the evaluation layers and evaluate.py: the EvalError they raise, `name=path` options,
JSON / JSONL reading and (resumable, atomic) writing, and output paths. Standard library only."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class EvalError(ValueError):
    """A bad input (file, option, mismatch between files); the message says what to change."""


# ---- names: `name=path` options ------------------------------------------------------------------------------


def parse_named(specs: list[str], what: str) -> dict[str, str]:
    """`name=path` or `path` (name = the folder name) -> {name: path}, in the given order; duplicate names fail."""
    named = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise EvalError(f"{what}: cannot read {spec!r}; expected name=path or path")
        if name in named:
            raise EvalError(f"{what}: the name {name!r} is given twice; name them explicitly with name=path")
        named[name] = path
    return named


# ---- JSONL and JSON files ------------------------------------------------------------------------------------


def _write_rows(f, rows: list[dict]) -> None:
    """One JSON object per line (UTF-8 kept as is)."""
    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_jsonl(path, repair: bool = False) -> list[dict]:
    """Rows of a JSONL file. A broken last line (an interrupted write) is dropped with a warning, and with
    repair=True the file is rewritten without it so that appending can go on; a broken line elsewhere fails."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number != len(lines):
                raise EvalError(f"{path}, line {number}: not valid JSON ({e})")
            print(f"warning: {path}, line {number}: dropping a truncated last line (interrupted write)", file=sys.stderr)
            text = None  # rewrite below
    if repair and (text is None or (text and not text.endswith("\n"))):
        with open(path, "w", encoding="utf-8") as f:
            _write_rows(f, rows)
    return rows


def append_jsonl(path, rows: list[dict]) -> None:
    """Append rows and flush, so an interrupted run keeps every finished row."""
    with open(path, "a", encoding="utf-8") as f:
        _write_rows(f, rows)
        f.flush()


def write_jsonl(path, rows: list[dict]) -> None:
    """Write rows atomically (temporary file, then rename), creating the folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        _write_rows(f, rows)
    os.replace(tmp, path)


def read_json(path) -> dict:
    """A JSON file's content; a missing or broken file is an EvalError."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e})")


# ---- output paths --------------------------------------------------------------------------------------------


def output_path(path: str) -> Path:
    """`path` as a Path, with its folder created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
