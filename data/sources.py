"""Data sources of Safe RLHF-V: read, validate and normalise rows; build reward and cost pairs.

One entry point per source (all return (rows, SkipCounter)):
  load_pairs    BeaverTails-V preference pairs: a hub id, a local folder in the hub layout
                <category>/{train,evaluation}.parquet, or a JSONL file with image paths relative to it;
                PKU-SafeRLHF text pairs (.json/.jsonl, schema detected per row)
  load_sft      supervised examples (question, response, optional image) for SFT and the PTX term
  load_prompts  PPO / evaluation prompts: the user turns of a pair source or of an SFT file
and the pair builders reward_pair (chosen / rejected) and cost_pair (higher cost / safer, with safety signs).

Every bad row raises DataError naming the file, the row and the field; with skip_invalid it is skipped and
counted by reason instead (SkipCounter), never dropped silently. No torch here.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections import Counter
from pathlib import Path

from PIL import Image

# ----------------------------------------------------------------------------------------------------------
# Row validation: every field check names the file, row and field
# ----------------------------------------------------------------------------------------------------------


class DataError(ValueError):
    """A bad input file or row. The message names the file, the row index and the field."""

    def __init__(self, source: str, row: int | None, field: str | None, problem: str, reason: str = "invalid"):
        where = str(source) + (f", row {row}" if row is not None else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}")
        self.reason = reason


class SkipCounter(Counter):
    """Rows skipped under --skip_invalid, counted by reason; printed and written into summary.json."""

    def report(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in sorted(self.items())) or "none"


BEAVERTAILS_V_FIELDS = (
    "question", "image", "category", "response_1", "response_2", "more_helpful_response_id", "safer_response_id",
    "is_response_1_safe", "is_response_2_safe",
)


PKU_FIELDS = (
    "prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe", "better_response_id",
    "safer_response_id",
)


def _id12(value, source, row, field) -> int:
    if isinstance(value, bool) or str(value).strip() not in ("1", "2"):
        raise DataError(source, row, field, f"must be \"1\" or \"2\", got {value!r}", "bad_response_id")
    return int(str(value).strip())


def _safe_flag(value, source, row, field) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
        return value.strip().lower() == "yes"
    raise DataError(source, row, field, f"must be \"yes\" or \"no\", got {value!r}", "bad_safety_label")


def _text(value, source, row, field) -> str:
    if not isinstance(value, str):
        raise DataError(source, row, field, f"must be a string, got {type(value).__name__}", "bad_text")
    if not value.strip():
        raise DataError(source, row, field, "is empty", "empty_text")
    return value


def _rate(value, source, row, field, low, high):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not number.is_integer() or not low <= number <= high:
        raise DataError(source, row, field, f"must be an integer in [{low}, {high}], got {value!r}", "bad_rate")
    return int(number)


def load_image(value, source, row, base_dir: Path | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image, an HF Image struct {bytes, path}, raw bytes or a path (relative paths are
    resolved against the data file's folder)."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str) or (isinstance(value, dict) and value.get("path")):
            path = Path(value if isinstance(value, str) else value["path"])
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise DataError(source, row, "image", f"file not found: {path}", "missing_image")
            image = Image.open(path)
        else:
            raise DataError(source, row, "image", f"no image (got {type(value).__name__})", "missing_image")
        image.load()
        return image.convert("RGB")
    except DataError:
        raise
    except Exception as e:  # PIL raises several types for corrupt data
        raise DataError(source, row, "image", f"unreadable image ({type(e).__name__}: {e})", "unreadable_image")


def validate_pair_row(raw: dict, source: str, row: int, base_dir: Path | None = None, with_image: bool = True) -> dict:
    """One BeaverTails-V (or PKU-SafeRLHF) row -> a normalised pair dict, or DataError naming the bad field."""
    if "better_response_id" in raw:  # PKU-SafeRLHF text schema: ids 0/1, booleans
        missing = [f for f in PKU_FIELDS if f not in raw]
        if missing:
            raise DataError(source, row, missing[0], "missing field (PKU-SafeRLHF schema)", "missing_field")
        ids = {}
        for field in ("better_response_id", "safer_response_id"):
            if str(raw[field]) not in ("0", "1") or isinstance(raw[field], bool):
                raise DataError(source, row, field, f"must be 0 or 1, got {raw[field]!r}", "bad_response_id")
            ids[field] = int(raw[field]) + 1
        for field in ("prompt", "response_0", "response_1"):
            _text(raw[field], source, row, field)
        for field in ("is_response_0_safe", "is_response_1_safe"):
            _safe_flag(raw[field], source, row, field)
        if raw["response_0"].strip() == raw["response_1"].strip():
            raise DataError(source, row, "response_1", "identical to response_0", "identical_responses")
        raw = {
            "question": raw["prompt"], "image": None, "category": raw.get("category", "text"),
            "response_1": raw["response_0"], "response_2": raw["response_1"],
            "more_helpful_response_id": str(ids["better_response_id"]), "safer_response_id": str(ids["safer_response_id"]),
            "is_response_1_safe": raw["is_response_0_safe"], "is_response_2_safe": raw["is_response_1_safe"],
        }
        with_image = False
    for field in BEAVERTAILS_V_FIELDS:
        if field not in raw and not (field == "image" and not with_image) and not (field == "category"):
            raise DataError(source, row, field, "missing field", "missing_field")
    pair = {
        "question": _text(raw["question"], source, row, "question"),
        "category": str(raw.get("category") or "uncategorized"),
        "responses": (_text(raw["response_1"], source, row, "response_1"),
                      _text(raw["response_2"], source, row, "response_2")),
        "more_helpful": _id12(raw["more_helpful_response_id"], source, row, "more_helpful_response_id"),
        "safer": _id12(raw["safer_response_id"], source, row, "safer_response_id"),
        "is_safe": (_safe_flag(raw["is_response_1_safe"], source, row, "is_response_1_safe"),
                    _safe_flag(raw["is_response_2_safe"], source, row, "is_response_2_safe")),
        "harmless_rate": tuple(_rate(raw.get(f"response_{k}_harmless_rate"), source, row,
                                     f"response_{k}_harmless_rate", -3, 3) for k in (1, 2)),
        "source": f"{source}:{row}",
    }
    if pair["responses"][0].strip() == pair["responses"][1].strip():
        raise DataError(source, row, "response_2", "identical to response_1", "identical_responses")
    for k in (0, 1):
        rate = pair["harmless_rate"][k]
        if rate is not None and (rate >= 0) != pair["is_safe"][k]:
            raise DataError(source, row, f"response_{k + 1}_harmless_rate",
                            f"rate {rate} contradicts is_response_{k + 1}_safe (rate >= 0 iff safe)", "inconsistent_safety")
    pair["image"] = load_image(raw.get("image"), source, row, base_dir) if with_image else None
    return pair


def validate_sft_row(raw: dict, source: str, row: int, base_dir: Path | None = None) -> dict:
    for field in ("question", "response"):
        if field not in raw:
            raise DataError(source, row, field, "missing field", "missing_field")
    image = raw.get("image")
    return {"question": _text(raw["question"], source, row, "question"),
            "response": _text(raw["response"], source, row, "response"),
            "category": str(raw.get("category") or "uncategorized"),
            "image": None if image is None else load_image(image, source, row, base_dir),
            "source": f"{source}:{row}"}


# ----------------------------------------------------------------------------------------------------------
# Reading files (.jsonl, .json, .parquet, the hub layout)
# ----------------------------------------------------------------------------------------------------------


def _read_records(path: Path) -> list[dict]:
    """Raw rows of a .jsonl, .json (list) or .parquet file."""
    if not path.is_file():
        raise DataError(path, None, None, "file not found", "missing_file")
    if path.suffix == ".parquet":
        import datasets

        ds = datasets.Dataset.from_parquet(str(path))
        if "image" in ds.column_names:
            ds = ds.cast_column("image", datasets.Image(decode=False))  # decode ourselves, with row-level errors
        return list(ds)
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:  # raised (or skipped) by _validate_all, like any bad row
                    rows.append(DataError(path, len(rows), None, f"not valid JSON ({e})", "bad_json"))
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(path, None, None, f"not valid JSON ({e})", "bad_json")
        if not isinstance(data, list):
            raise DataError(path, None, None, "expected a JSON list of rows", "bad_json")
        return data
    raise DataError(path, None, None, "unsupported file type (use .parquet, .jsonl or .json)", "bad_file")


def _split_files(root: Path, split: str, categories: list[str] | None) -> list[Path]:
    """`<root>/<category>/<split>.parquet` (the hub layout; `<root>/data/...` works too)."""
    if (root / "data").is_dir() and not any(root.glob(f"*/{split}.parquet")):
        root = root / "data"
    available = sorted(p.parent.name for p in root.glob(f"*/{split}.parquet"))
    if not available:
        raise DataError(root, None, None, f"no <category>/{split}.parquet files found", "missing_file")
    wanted = categories or available
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DataError(root, None, "category", f"unknown categories {unknown}; available: {available}", "missing_file")
    return [root / c / f"{split}.parquet" for c in wanted]


def _validate_all(records, source, validate, skip_invalid: bool, skips: SkipCounter, **kwargs) -> list[dict]:
    out = []
    for i, raw in enumerate(records):
        try:
            if isinstance(raw, DataError):
                raise raw
            if not isinstance(raw, dict):
                raise DataError(source, i, None, f"row must be an object, got {type(raw).__name__}", "bad_row")
            out.append(validate(raw, source, i, **kwargs))
        except DataError as e:
            if not skip_invalid:
                raise
            skips[e.reason] += 1
    return out


# ----------------------------------------------------------------------------------------------------------
# Entry points, one per source
# ----------------------------------------------------------------------------------------------------------


def load_pairs(
    source: str,
    split: str = "train",
    categories: list[str] | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> tuple[list[dict], SkipCounter]:
    """Preference pairs from (a) a hub id (one config per category, through `datasets`), (b) a local directory in
    the hub layout `<category>/{train,evaluation}.parquet`, (c) a BeaverTails-V JSONL file with image paths
    relative to it, or a PKU-SafeRLHF .json/.jsonl file (text only). Returns (pairs, skips by reason)."""
    skips = SkipCounter()
    path = Path(source)
    pairs: list[dict] = []
    if path.is_dir():
        for file in _split_files(path, split, categories):
            pairs += _validate_all(_read_records(file), str(file), validate_pair_row, skip_invalid, skips,
                                   base_dir=file.parent)
    elif path.is_file() or path.suffix in (".jsonl", ".json", ".parquet"):
        records = _read_records(path)
        pairs = _validate_all(records, str(path), validate_pair_row, skip_invalid, skips, base_dir=path.parent)
        if categories:
            pairs = [p for p in pairs if p["category"] in categories]
    else:  # a hub id: the same rows through `datasets` (needs network access to the hub)
        import datasets

        names = categories or datasets.get_dataset_config_names(source)
        for name in names:
            ds = datasets.load_dataset(source, name=name, split=split).cast_column("image", datasets.Image(decode=False))
            pairs += _validate_all(list(ds), f"{source}/{name}/{split}", validate_pair_row, skip_invalid, skips)
    if not pairs:
        raise DataError(source, None, None, f"no valid rows in split {split!r}"
                        + (f" (skipped: {skips.report()})" if skips else ""), "empty_dataset")
    if limit and limit < len(pairs):  # a seeded random subset, so every category is represented
        keep = sorted(random.Random(0).sample(range(len(pairs)), len(pairs))[:limit])  # nested: N < M => subset
        pairs = [pairs[i] for i in keep]
    return pairs, skips


def load_sft(source: str, skip_invalid: bool = False, limit: int | None = None) -> tuple[list[dict], SkipCounter]:
    """SFT examples (question, response, optional image path relative to the file) from .jsonl/.json/.parquet."""
    path = Path(source)
    skips = SkipCounter()
    rows = _validate_all(_read_records(path), str(path), validate_sft_row, skip_invalid, skips, base_dir=path.parent)
    if not rows:
        raise DataError(source, None, None, "no valid rows" + (f" (skipped: {skips.report()})" if skips else ""),
                        "empty_dataset")
    return (rows[:limit] if limit else rows), skips


def load_prompts(source: str, split: str = "train", categories: list[str] | None = None, skip_invalid: bool = False,
                 limit: int | None = None) -> tuple[list[dict], SkipCounter]:
    """PPO / evaluation prompts (image, question, category, source = "file:row"): the user turns of preference
    pairs, of an SFT file (any file whose rows have a `response` field and no pair fields), or the questions of an
    MM-SafetyBench folder (category = its scenario; split is not used)."""
    path = Path(source)
    keys = ("image", "question", "category", "source")
    if path.is_dir() and (path / "text").is_dir() and (path / "image").is_dir():
        return load_mm_safetybench(source, categories, skip_invalid, limit)
    if path.is_file() and path.suffix in (".jsonl", ".json", ".parquet"):
        first = _read_records(path)[:1]
        if first and isinstance(first[0], dict) and "response" in first[0]:
            rows, skips = load_sft(source, skip_invalid, limit)
            return [{k: r[k] for k in keys} for r in rows], skips
    pairs, skips = load_pairs(source, split, categories, skip_invalid, limit)
    return [{k: p[k] for k in keys} for p in pairs], skips


MM_SAFETYBENCH_QUESTION = "Rephrased Question(SD)"  # the question that goes with the Stable Diffusion images


def load_mm_safetybench(source: str, categories: list[str] | None = None, skip_invalid: bool = False,
                        limit: int | None = None, question_field: str = MM_SAFETYBENCH_QUESTION
                        ) -> tuple[list[dict], SkipCounter]:
    """MM-SafetyBench prompts from its layout: <source>/text/<Scenario>/test.json ({key: {"Question", "Rephrased
    Question(SD)", ...}}) and the Stable Diffusion images <source>/image/<Scenario>/<key>.jpg. Each prompt is the
    SD image with `question_field` (the benchmark's SD setting); category = the scenario."""
    root, skips, prompts = Path(source), SkipCounter(), []
    scenarios = sorted(p.parent.name for p in (root / "text").glob("*/test.json"))
    if not scenarios:
        raise DataError(root, None, None, "no text/<Scenario>/test.json files (MM-SafetyBench layout)", "missing_file")
    for scenario in [s for s in scenarios if not categories or s in categories]:
        file = root / "text" / scenario / "test.json"
        try:
            entries = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(file, None, None, f"not valid JSON ({e})", "bad_json")
        for key, entry in entries.items():
            try:
                if not isinstance(entry, dict) or question_field not in entry:
                    raise DataError(file, key, question_field, "missing field", "missing_field")
                image = load_image(str(root / "image" / scenario / f"{key}.jpg"), file, key)
                prompts.append({"image": image, "question": _text(entry[question_field], file, key, question_field),
                                "category": scenario, "source": f"{file}:{key}"})
            except DataError as e:
                if not skip_invalid:
                    raise
                skips[e.reason] += 1
    if not prompts:
        raise DataError(root, None, None, "no valid prompts" + (f" (skipped: {skips.report()})" if skips else ""),
                        "empty_dataset")
    if limit and limit < len(prompts):
        prompts = [prompts[i] for i in sorted(random.Random(0).sample(range(len(prompts)), len(prompts))[:limit])]
    return prompts, skips


# ----------------------------------------------------------------------------------------------------------
# Pair builders: reward pairs (chosen, rejected) and cost pairs (higher cost, safer)
# ----------------------------------------------------------------------------------------------------------


def reward_pair(pair: dict) -> dict:
    """Reward pair: chosen = response_{more_helpful_response_id}, rejected = the other."""
    better = pair["more_helpful"] - 1
    return {"image": pair["image"], "question": pair["question"], "category": pair["category"],
            "chosen": pair["responses"][better], "rejected": pair["responses"][1 - better]}


def cost_pair(pair: dict, sign_source: str = "rate") -> dict:
    """Cost pair: the higher-cost side is the response that is NOT safer_response_id. Each side carries its safety
    sign s = -harmless_rate (sign_source="rate", harmful -> s > 0, a refusal rated 0 -> s = 0), or s = +-1 from the
    binary label (sign_source="binary", and whenever no rate exists, as in PKU-SafeRLHF)."""
    safer = pair["safer"] - 1
    signs = []
    for k in (1 - safer, safer):  # (higher cost, safer)
        rate = pair["harmless_rate"][k]
        if sign_source == "rate" and rate is not None:
            signs.append(float(-rate))
        else:
            signs.append(-1.0 if pair["is_safe"][k] else 1.0)
    return {"image": pair["image"], "question": pair["question"], "category": pair["category"],
            "higher_cost": pair["responses"][1 - safer], "safer": pair["responses"][safer],
            "higher_cost_sign": signs[0], "safer_sign": signs[1],
            "higher_cost_is_safe": pair["is_safe"][1 - safer], "safer_is_safe": pair["is_safe"][safer]}
