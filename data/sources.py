"""Data sources of Safe RLHF-V: read, validate and normalise rows; build reward and cost pairs.

One entry point per source (all return (rows, SkipCounter)):
  load_pairs    BeaverTails-V preference pairs: a hub id, a local folder in the hub layout
                <category>/{train,evaluation}.parquet, or a JSONL file with image paths relative to it;
                PKU-SafeRLHF text pairs (.json/.jsonl, schema detected per row)
  load_sft      supervised examples (question, response, optional image) for SFT and the PTX term
  load_prompts  PPO / evaluation prompts: the user turns of a pair source or of an SFT file
and the pair builders reward_pair (chosen / rejected) and cost_pair (higher cost / safer, with safety signs).

Every bad row raises DataError naming the file, the row and the field; with skip_invalid it is skipped and
counted by reason instead (SkipCounter, which also keeps the first rows of each reason), never dropped silently.

Images stay encoded in the rows (ImageRef: the file path or the encoded bytes, with the size and a digest read
at validation, when every image is decoded once so that a broken one is a row error before training starts);
open_image decodes one when a batch is encoded.

Splits: a folder or hub source has one file per split. A single file is the "train" split unless its rows carry
a `split` field or its name is a split name (evaluation.jsonl); any other split of it is the sibling file named
by that split, or a DataError that asks for the held-out file: an evaluation never runs on training rows by
accident. split=None means "this file, whole". No torch here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

from PIL import Image

# ----------------------------------------------------------------------------------------------------------
# Errors and the skip counter
# ----------------------------------------------------------------------------------------------------------


class DataError(ValueError):
    """A bad input file or row. The message names the file, the row index and the field."""

    def __init__(self, source: str, row: int | str | None, field: str | None, problem: str, reason: str = "invalid"):
        where = str(source) + (f", row {row}" if row is not None else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}")
        self.source, self.row, self.field, self.reason = str(source), row, field, reason

    @property
    def where(self) -> str:
        """"file:row" (the row identifier every normalised row carries as `source`), or the file alone."""
        return self.source if self.row is None else f"{self.source}:{self.row}"


def row_error(where: str | None, field: str | None, problem: str, reason: str) -> DataError:
    """A DataError for the row `where` ("file:row", the `source` of a normalised row; None if unknown)."""
    file, row = split_where(where)
    return DataError(file, row, field, problem, reason)


def split_where(where: str | None) -> tuple[str, str | None]:
    """("file", "row") of a "file:row" row identifier; a string without a row part is the file alone."""
    if not where:
        return "<row>", None
    file, sep, row = str(where).rpartition(":")
    if not sep or not file or not row or "/" in row or "\\" in row:
        return str(where), None
    return file, row


class SkipCounter(Counter):
    """Rows skipped under --skip_invalid: counts by reason (`dict(skips)`), plus the first FIRST_ROWS row
    identifiers of each reason, so a user can open the file at a skipped row. report() is the console line;
    as_dict() goes into summary.json."""

    FIRST_ROWS = 5

    def __init__(self, *args, **kwargs):
        self.first_rows: dict[str, list[tuple[str, object]]] = {}
        super().__init__(*args, **kwargs)

    def __reduce__(self):  # keep first_rows through pickling (Counter's own reduce drops attributes)
        return self.__class__, (dict(self),), {"first_rows": self.first_rows}

    def add(self, error: DataError, prefix: str = "") -> None:
        """Count one skipped row under its reason (prefixed, e.g. "eval_"), keeping its place if among the first."""
        reason = prefix + error.reason
        self[reason] += 1
        rows = self.first_rows.setdefault(reason, [])
        if len(rows) < self.FIRST_ROWS:
            rows.append((error.source, error.row))

    def merge(self, other: "SkipCounter | dict", prefix: str = "") -> "SkipCounter":
        """Add another counter's counts (and first rows), each reason prefixed (e.g. "ptx_")."""
        for reason, n in other.items():
            self[prefix + reason] += n
        for reason, rows in getattr(other, "first_rows", {}).items():
            mine = self.first_rows.setdefault(prefix + reason, [])
            mine.extend(rows[: max(0, self.FIRST_ROWS - len(mine))])
        return self

    def update(self, other=None, /, **kwargs):
        super().update(other, **kwargs)
        if isinstance(other, SkipCounter):  # Counter.update adds counts; keep the first rows too
            for reason, rows in other.first_rows.items():
                mine = self.first_rows.setdefault(reason, [])
                mine.extend(rows[: max(0, self.FIRST_ROWS - len(mine))])

    def _rows_text(self, reason: str) -> str:
        """"rows 4, 9, 12 of pairs.jsonl" (grouped by file; "..." when more rows were skipped than kept)."""
        rows = self.first_rows.get(reason, [])
        by_file: dict[str, list[str]] = {}
        for file, row in rows:
            by_file.setdefault(file, []).append("?" if row is None else str(row))
        more = ", ..." if self[reason] > len(rows) else ""
        parts = [f"row{'s' if len(rs) > 1 or more else ''} {', '.join(rs)}{more} of {file}"
                 for file, rs in by_file.items()]
        return f" ({'; '.join(parts)})" if parts else ""

    def report(self) -> str:
        """One console line: "bad_json: 3 (rows 4, 9, 12 of pairs.jsonl), missing_image: 1 (...)", or "none"."""
        return ", ".join(f"{reason}: {n}{self._rows_text(reason)}" for reason, n in sorted(self.items())) or "none"

    def as_dict(self) -> dict:
        """JSON-able: {"counts": {reason: n}, "first_rows": {reason: ["file:row", ...]}}, for summary.json."""
        first = {reason: [file if row is None else f"{file}:{row}" for file, row in self.first_rows.get(reason, [])]
                 for reason in sorted(self)}
        return {"counts": dict(sorted(self.items())), "first_rows": first}


# ----------------------------------------------------------------------------------------------------------
# Images: validated once at load time, kept encoded, decoded when a batch is encoded
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image as the rows keep it: its file (`path`) or its encoded bytes (`data`, from a parquet or hub row),
    with the size and a digest read when the row was validated. A decoded 384-px RGB image takes 440 KB, its JPEG
    about 30 KB, and a path a few bytes; 30K rows on every rank are why rows never hold pixels. open_image()
    decodes it; width / height let load-time checks (check_images) judge the image without decoding it again."""

    path: str | None
    data: bytes | None = dataclasses.field(repr=False)
    width: int
    height: int
    digest: str  # sha256 of the encoded bytes (16 hex digits): the same image in two files has the same digest

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def _encoded_image(value, source, row, base_dir: Path | None) -> tuple[str | None, bytes]:
    """(resolved path or None, encoded bytes) of an HF Image struct {bytes, path}, raw bytes or a path (relative
    paths against the data file's folder)."""
    if isinstance(value, dict) and value.get("bytes"):
        return None, bytes(value["bytes"])
    if isinstance(value, (bytes, bytearray)):
        return None, bytes(value)
    if isinstance(value, str) or (isinstance(value, dict) and value.get("path")):
        path = Path(value if isinstance(value, str) else value["path"])
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise DataError(source, row, "image", f"file not found: {path}", "missing_image")
        return str(path.resolve()), path.read_bytes()
    raise DataError(source, row, "image", f"no image (got {type(value).__name__})", "missing_image")


def _decode(data: bytes, source, row) -> Image.Image:
    """The RGB image of encoded bytes; any decoding failure is an unreadable_image DataError."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as e:  # PIL raises several types for corrupt data
        raise DataError(source, row, "image", f"unreadable image ({type(e).__name__}: {e})", "unreadable_image")


def _check_decodes(data: bytes, source, row) -> tuple[int, int]:
    """Decode an image once and drop the pixels; return its (width, height). A JPEG decodes at 1/8 scale (its
    whole stream is still read, so truncation and corruption are still found, at a fraction of the time)."""
    try:
        image = Image.open(io.BytesIO(data))
        size = image.size
        image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.load()
        image.convert("RGB")
        return size
    except Exception as e:  # PIL raises several types for corrupt data
        raise DataError(source, row, "image", f"unreadable image ({type(e).__name__}: {e})", "unreadable_image")


def load_image(value, source, row, base_dir: Path | None = None) -> Image.Image:
    """A decoded RGB PIL image from a PIL image, an ImageRef, an HF Image struct {bytes, path}, raw bytes or a
    path (relative paths are resolved against the data file's folder)."""
    if isinstance(value, Image.Image):
        try:
            value.load()
            return value if value.mode == "RGB" else value.convert("RGB")
        except Exception as e:
            raise DataError(source, row, "image", f"unreadable image ({type(e).__name__}: {e})", "unreadable_image")
    if isinstance(value, ImageRef):
        return open_image(value, f"{source}:{row}" if row is not None else str(source))
    return _decode(_encoded_image(value, source, row, base_dir)[1], source, row)


def image_ref(value, source, row, base_dir: Path | None = None) -> ImageRef | Image.Image:
    """Validate an image (decode it once, then drop the pixels) and return what a row keeps: an ImageRef (path or
    encoded bytes, size, digest). A PIL image given in memory is already decoded: it is kept, as RGB."""
    if isinstance(value, (Image.Image, ImageRef)):
        return load_image(value, source, row) if isinstance(value, Image.Image) else value
    path, data = _encoded_image(value, source, row, base_dir)
    width, height = _check_decodes(data, source, row)  # a broken image fails here, not mid-epoch
    return ImageRef(path=path, data=None if path else data, width=width, height=height,
                    digest=hashlib.sha256(data).hexdigest()[:16])


def open_image(value, source: str | None = None) -> Image.Image | None:
    """The decoded RGB PIL image of a row's `image` (an ImageRef or a PIL image; None stays None). `source` (the
    row's "file:row") names the row if the image cannot be read any more (a file removed since loading)."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    file, row = split_where(source) if source else ("<image>", None)
    if isinstance(value, ImageRef):
        if value.data is not None:
            return _decode(value.data, file, row)
        if not Path(value.path).is_file():
            raise DataError(file, row, "image", f"file not found: {value.path}", "missing_image")
        return _decode(Path(value.path).read_bytes(), file, row)
    return load_image(value, file, row)


def image_size(value) -> tuple[int, int] | None:
    """(width, height) of a row's image without decoding it (None for a text row)."""
    return None if value is None else tuple(value.size)


def image_key(value) -> str | None:
    """What identifies an image across files: the digest of its encoded bytes (the pixels for a PIL image)."""
    if value is None:
        return None
    if isinstance(value, ImageRef):
        return value.digest
    image = open_image(value)
    return "pil:" + hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Row validation: every field check names the file, row and field
# ----------------------------------------------------------------------------------------------------------


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
    pair["image"] = image_ref(raw.get("image"), source, row, base_dir) if with_image else None
    return pair


def validate_sft_row(raw: dict, source: str, row: int, base_dir: Path | None = None) -> dict:
    for field in ("question", "response"):
        if field not in raw:
            raise DataError(source, row, field, "missing field", "missing_field")
    image = raw.get("image")
    return {"question": _text(raw["question"], source, row, "question"),
            "response": _text(raw["response"], source, row, "response"),
            "category": str(raw.get("category") or "uncategorized"),
            "image": None if image is None else image_ref(image, source, row, base_dir),
            "source": f"{source}:{row}"}


# ----------------------------------------------------------------------------------------------------------
# Reading files (.jsonl, .json, .parquet, the hub layout) and choosing a split
# ----------------------------------------------------------------------------------------------------------


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLIT_FIELD = "split"
# A file whose name (without suffix) is one of these IS that split; its siblings hold the other splits.
SPLIT_NAMES = ("train", "evaluation", "eval", "validation", "test", "dev")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_records(path: Path) -> list[dict]:
    """Raw rows of a .jsonl, .json (list) or .parquet file (a broken JSONL line becomes a DataError row, raised or
    skipped later like any bad row). Parquet is streamed with pyarrow (buffered reads, 64 rows at a time, Arrow's
    buffers handed back after each batch), images as their encoded bytes: the peak stays near the bytes kept."""
    if not path.is_file():
        raise DataError(path, None, None, "file not found", "missing_file")
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            rows, file = [], pq.ParquetFile(str(path), pre_buffer=False, buffer_size=1 << 20)
            for batch in file.iter_batches(batch_size=64):
                rows += batch.to_pylist()
                pyarrow.default_memory_pool().release_unused()  # its allocator would keep every buffer otherwise
            return rows
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for files that are not parquet
            raise DataError(path, None, None, f"not a readable parquet file ({type(e).__name__}: {e})", "bad_file")
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
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


def _first_record(path: Path):
    """The first row (object) of a data file, read cheaply: what its schema is (a `split` field? SFT or pairs?)."""
    if not path.is_file():
        raise DataError(path, None, None, "file not found", "missing_file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batch = next(pq.ParquetFile(str(path)).iter_batches(batch_size=1), None)
        except Exception as e:
            raise DataError(path, None, None, f"not a readable parquet file ({type(e).__name__}: {e})", "bad_file")
        return batch.to_pylist()[0] if batch is not None and batch.num_rows else None
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    return row
        return None
    return next((r for r in _read_records(path) if isinstance(r, dict)), None)


def _select_split(records: list, split: str, path: Path) -> list[tuple[int, object]]:
    """(row index, raw row) of the rows whose `split` is `split`; a row without the field is a row error (the
    file's other rows carry it); broken rows pass through to be reported. No row of that split: DataError."""
    chosen, present = [], set()
    for i, raw in enumerate(records):
        if isinstance(raw, dict) and raw.get(SPLIT_FIELD) is None:
            chosen.append((i, DataError(path, i, SPLIT_FIELD, "missing field (the file's rows carry their split)",
                                        "missing_field")))
        elif not isinstance(raw, dict) or raw[SPLIT_FIELD] == split:
            chosen.append((i, raw))
        else:
            present.add(str(raw[SPLIT_FIELD]))
    if not any(isinstance(raw, dict) for _, raw in chosen):
        raise DataError(path, None, SPLIT_FIELD, f"no rows of split {split!r} (splits present: {sorted(present)})",
                        "missing_split")
    return chosen


def split_file(path: Path, split: str | None) -> Path:
    """The file that holds `split` of a file source without a `split` field: the file itself if it is that split
    (a file not named by a split is "train"), else its sibling named by the split (train.jsonl ->
    evaluation.jsonl, any of .jsonl/.json/.parquet). split=None: the file itself, whole."""
    own = path.stem if path.stem in SPLIT_NAMES else "train"
    if split is None or split == own:
        return path
    if path.stem in SPLIT_NAMES:
        for suffix in sorted(DATA_SUFFIXES, key=lambda s: s != path.suffix):
            if path.with_name(split + suffix).is_file():
                return path.with_name(split + suffix)
    looked = f"; no {split}{path.suffix} next to it" if path.stem in SPLIT_NAMES else ""
    raise DataError(path, None, None, f"has no {split!r} split (no '{SPLIT_FIELD}' field, so the file is the "
                    f"{own!r} split{looked}); name the held-out file, to be read whole (--eval_data FILE; "
                    "evaluate.py --data FILE --split '')", "missing_split")


def _resolve_split(path: Path, split: str | None) -> tuple[Path, str | None]:
    """(the file that holds `split` of a file source, the value its rows' `split` field must have or None for every
    row): the file itself, filtered, when its rows carry a `split` field; else the file split_file chooses."""
    if split is None:
        return path, None
    first = _first_record(path)
    if isinstance(first, dict) and SPLIT_FIELD in first:
        return path, split
    chosen = split_file(path, split)
    return (path, None) if chosen == path else _resolve_split(chosen, split)


def _file_rows(path: Path, split: str | None) -> tuple[Path, list[tuple[int, object]]]:
    """(the file read, its (row index, raw row) pairs of `split`; split=None: every row of `path`)."""
    file, wanted = _resolve_split(path, split)
    records = _read_records(file)
    return file, (list(enumerate(records)) if wanted is None else _select_split(records, wanted, file))


def _split_files(root: Path, split: str, categories: list[str] | None) -> list[Path]:
    """`<root>/<category>/<split>.parquet` (the hub layout; `<root>/data/...` works too)."""
    if split is None:
        raise DataError(root, None, None, "a folder in the hub layout needs a split (e.g. train, evaluation)",
                        "missing_split")
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


def is_hub_id(source: str) -> bool:
    """Whether `source` names a hub dataset ("owner/name") rather than a local path. Anything that exists, has a
    data-file suffix, starts with "." or "/" or "~", has more than one "/", or whose first part is a local folder
    ("data/toy") is local: a missing local path is reported as missing, not looked up on the hub."""
    if Path(source).exists() or not HUB_ID.match(str(source)) or Path(source).suffix in DATA_SUFFIXES:
        return False
    return not Path(str(source).split("/")[0]).is_dir()


def _validate_all(records, source, validate, skip_invalid: bool, skips: SkipCounter, **kwargs) -> list[dict]:
    """Validate (row index, raw row) pairs; a bad row raises, or under skip_invalid is counted (with its place)."""
    out = []
    for i, raw in records:
        try:
            if isinstance(raw, DataError):
                raise raw
            if not isinstance(raw, dict):
                raise DataError(source, i, None, f"row must be an object, got {type(raw).__name__}", "bad_row")
            out.append(validate(raw, source, i, **kwargs))
        except DataError as e:
            if not skip_invalid:
                raise
            skips.add(e)
    return out


# ----------------------------------------------------------------------------------------------------------
# Entry points, one per source
# ----------------------------------------------------------------------------------------------------------


def load_pairs(
    source: str,
    split: str | None = "train",
    categories: list[str] | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> tuple[list[dict], SkipCounter]:
    """Preference pairs from (a) a hub id (one config per category, through `datasets`), (b) a local directory in
    the hub layout `<category>/{train,evaluation}.parquet`, (c) a BeaverTails-V JSONL file with image paths
    relative to it, or a PKU-SafeRLHF .json/.jsonl file (text only). A file's split: see split_file (split=None:
    the whole file). Returns (pairs, skips by reason)."""
    skips = SkipCounter()
    path = Path(source)
    pairs: list[dict] = []
    if path.is_dir():
        for file in _split_files(path, split, categories):
            pairs += _validate_all(enumerate(_read_records(file)), str(file), validate_pair_row, skip_invalid, skips,
                                   base_dir=file.parent)
    elif path.is_file() or not is_hub_id(source):
        file, records = _file_rows(path, split)
        shown = source if file == path else str(file)
        pairs = _validate_all(records, shown, validate_pair_row, skip_invalid, skips, base_dir=file.parent)
        if categories:
            pairs = [p for p in pairs if p["category"] in categories]
    else:  # a hub id: the same rows through `datasets` (needs network access to the hub)
        import datasets

        names = categories or datasets.get_dataset_config_names(source)
        for name in names:
            ds = datasets.load_dataset(source, name=name, split=split or "train")
            ds = ds.cast_column("image", datasets.Image(decode=False))  # bytes, decoded once by our own validation
            pairs += _validate_all(enumerate(ds), f"{source}/{name}/{split}", validate_pair_row, skip_invalid, skips)
    if not pairs:
        raise DataError(source, None, None, f"no valid rows in split {split!r}"
                        + (f" (skipped: {skips.report()})" if skips else ""), "empty_dataset")
    if limit and limit < len(pairs):  # a seeded random subset, so every category is represented
        keep = sorted(random.Random(0).sample(range(len(pairs)), len(pairs))[:limit])  # nested: N < M => subset
        pairs = [pairs[i] for i in keep]
    return pairs, skips


def load_sft(source: str, skip_invalid: bool = False, limit: int | None = None,
             split: str | None = "train") -> tuple[list[dict], SkipCounter]:
    """SFT examples (question, response, optional image path relative to the file) from .jsonl/.json/.parquet.
    `split` as for load_pairs (a plain file is "train"; split=None: the whole file, e.g. an explicit eval file)."""
    path = Path(source)
    skips = SkipCounter()
    file, records = _file_rows(path, split)
    shown = source if file == path else str(file)
    rows = _validate_all(records, shown, validate_sft_row, skip_invalid, skips, base_dir=file.parent)
    if not rows:
        raise DataError(source, None, None, "no valid rows" + (f" (skipped: {skips.report()})" if skips else ""),
                        "empty_dataset")
    return (rows[:limit] if limit else rows), skips


def _is_sft_file(path: Path, split: str | None) -> bool:
    """Whether a data file holds SFT examples (its first row has a `response` field) rather than pairs."""
    first = _first_record(_resolve_split(path, split)[0])
    return isinstance(first, dict) and "response" in first and "response_1" not in first


def load_prompts(source: str, split: str | None = "train", categories: list[str] | None = None,
                 skip_invalid: bool = False, limit: int | None = None) -> tuple[list[dict], SkipCounter]:
    """PPO / evaluation prompts (image, question, category, source = "file:row"): the user turns of preference
    pairs, of an SFT file (any file whose rows have a `response` field and no pair fields), or the questions of an
    MM-SafetyBench folder (category = its scenario; split is not used)."""
    path = Path(source)
    keys = ("image", "question", "category", "source")
    if path.is_dir() and (path / "text").is_dir() and (path / "image").is_dir():
        return load_mm_safetybench(source, categories, skip_invalid, limit)
    if path.is_file() and path.suffix in DATA_SUFFIXES and _is_sft_file(path, split):
        rows, skips = load_sft(source, skip_invalid, limit, split)
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
                image = image_ref(str(root / "image" / scenario / f"{key}.jpg"), file, key)
                prompts.append({"image": image, "question": _text(entry[question_field], file, key, question_field),
                                "category": scenario, "source": f"{file}:{key}"})
            except DataError as e:
                if not skip_invalid:
                    raise
                skips.add(e)
    if not prompts:
        raise DataError(root, None, None, "no valid prompts" + (f" (skipped: {skips.report()})" if skips else ""),
                        "empty_dataset")
    if limit and limit < len(prompts):
        prompts = [prompts[i] for i in sorted(random.Random(0).sample(range(len(prompts)), len(prompts))[:limit])]
    return prompts, skips


# ----------------------------------------------------------------------------------------------------------
# Held-out data: which source and split to evaluate on, and whether it overlaps the training rows
# ----------------------------------------------------------------------------------------------------------


def eval_source(train_data: str, eval_data: str | None, eval_split: str | None) -> tuple[str, str | None]:
    """(source, split) of the evaluation rows. An explicitly named eval FILE is used whole (split None); an eval
    folder / hub id, or no eval data (then the training source), gives its `eval_split`. A plain training file
    then has no evaluation split and the loaders raise a DataError asking for --eval_data, instead of silently
    evaluating on the training rows."""
    if eval_data:
        path = Path(eval_data)
        if path.is_file() or (not path.is_dir() and not is_hub_id(eval_data)):
            return eval_data, None
        return eval_data, eval_split
    return train_data, eval_split


def row_key(row: dict) -> tuple:
    """What makes two rows the same example: question, responses (pair, SFT response, or none for a prompt) and
    image (digest of its bytes)."""
    responses = row.get("responses") or ((row["response"],) if "response" in row else ())
    return (row["question"].strip(), tuple(r.strip() for r in responses), image_key(row.get("image")))


def overlapping_rows(eval_rows: list[dict], train_rows: list[dict]) -> list[str]:
    """The `source` ("file:row") of every evaluation row that also occurs in the training rows (same question,
    same responses, same image bytes): a caller warns loudly when this is not empty."""
    seen = {row_key(r) for r in train_rows}
    return [r.get("source", "?") for r in eval_rows if row_key(r) in seen]


# ----------------------------------------------------------------------------------------------------------
# Pair builders: reward pairs (chosen, rejected) and cost pairs (higher cost, safer)
# ----------------------------------------------------------------------------------------------------------


def reward_pair(pair: dict) -> dict:
    """Reward pair: chosen = response_{more_helpful_response_id}, rejected = the other."""
    better = pair["more_helpful"] - 1
    return {"image": pair["image"], "question": pair["question"], "category": pair["category"],
            "chosen": pair["responses"][better], "rejected": pair["responses"][1 - better], "source": pair.get("source")}


PREFERENCES = ("helpful", "safe")


def preference_pair(pair: dict, preference: str) -> dict:
    """A pair on one preference dimension (the single-dimension baselines: a reward model or DPO on helpfulness or
    on safety alone): helpful = reward_pair (chosen = the more helpful response); safe = chosen is
    response_{safer_response_id}, rejected the other, whatever either one's safety label says."""
    if preference == "helpful":
        return reward_pair(pair)
    if preference != "safe":
        raise ValueError(f"preference must be one of {PREFERENCES}, got {preference!r}")
    safer = pair["safer"] - 1
    return {"image": pair["image"], "question": pair["question"], "category": pair["category"],
            "chosen": pair["responses"][safer], "rejected": pair["responses"][1 - safer], "source": pair.get("source")}


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
            "source": pair.get("source"), "higher_cost": pair["responses"][1 - safer], "safer": pair["responses"][safer],
            "higher_cost_sign": signs[0], "safer_sign": signs[1],
            "higher_cost_is_safe": pair["is_safe"][1 - safer], "safer_is_safe": pair["is_safe"][safer]}
