"""Compare two golden-run folders (scripts/golden_runs.sh) file by file: byte-identical, except wall time.

    python scripts/compare_runs.py /tmp/golden/before /tmp/golden/after [--exclude resumed/ ...]

Every file under either folder is compared. JSON and JSONL files are compared as parsed values with the keys that
hold wall-clock time dropped ("seconds", "time", "timestamp", "wall_s"), model cards without their "seconds" row;
TensorBoard event files and logs (which
hold timestamps and tqdm speeds) are skipped and listed; everything else (safetensors checkpoints, tokenizers,
tables, samples, --help and --dry_run outputs, images) must be byte-identical. Prints one line per difference and
a summary; exit status 1 if anything differs or is missing on one side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WALL_TIME_KEYS = {"seconds", "time", "timestamp", "wall_s"}
SKIPPED_SUFFIXES = (".log",)
SKIPPED_PARTS = ("events.out.tfevents",)


def without_wall_time(value):
    if isinstance(value, dict):
        return {k: without_wall_time(v) for k, v in value.items() if k not in WALL_TIME_KEYS}
    if isinstance(value, list):
        return [without_wall_time(v) for v in value]
    return value


def parsed(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [without_wall_time(json.loads(line)) for line in text.splitlines() if line.strip()]
    return without_wall_time(json.loads(text))


def card_without_wall_time(path: Path) -> list[str]:
    """A model card (README.md of a saved model) without its "| seconds | ... |" row."""
    return [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("| seconds |")]


def same(a: Path, b: Path) -> bool:
    if a.name == "README.md":
        return card_without_wall_time(a) == card_without_wall_time(b)
    if a.suffix in (".json", ".jsonl"):
        try:
            return parsed(a) == parsed(b)
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return a.read_bytes() == b.read_bytes()


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Compare two golden-run folders (wall time aside).")
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--exclude", nargs="*", default=[], help="relative paths starting with these are left out")
    args = parser.parse_args(argv)
    before, after = Path(args.before), Path(args.after)
    names_before, names_after = files(before), files(after)
    problems, compared, skipped = [], 0, []
    for name in sorted(names_before | names_after):
        if any(name.startswith(prefix) for prefix in args.exclude):
            continue
        if name.endswith(SKIPPED_SUFFIXES) or any(part in name for part in SKIPPED_PARTS):
            skipped.append(name)
            continue
        if name not in names_after:
            problems.append(f"only before: {name}")
        elif name not in names_before:
            problems.append(f"only after:  {name}")
        elif not same(before / name, after / name):
            problems.append(f"differs:     {name}")
        else:
            compared += 1
    for line in problems:
        print(line)
    print(f"{compared} files identical (wall time aside), {len(problems)} different or missing, "
          f"{len(skipped)} skipped (logs, TensorBoard events)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
