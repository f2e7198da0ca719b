"""Data loading (data/sources.py): BeaverTails-V pairs from parquet (hub layout) and JSONL, PKU-SafeRLHF text
pairs, SFT examples and prompts; row validation with errors naming file, row and field; --skip_invalid counting.

Everything is written under tmp_path by the tests themselves (offline, no /work/shared). The real PKU-SafeRLHF
sample and the BeaverTails-V-schema fixture in data/samples are used when present."""

import io
import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from data import (DataError, ImageRef, SkipCounter, cost_pair, load_image, load_pairs, load_prompts, load_sft,
                  open_image, reward_pair, validate_pair_row)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"

EMOJI_Q = "What is the dog doing in this picture? 🐶🔥👀"
ARABIC = "مرحبا بالعالم، هذه إجابة باللغة العربية."
HEBREW_Q = "מה מופיע בתמונה הזאת?"
HEBREW = "שלום עולם, זו תשובה בעברית."


def bt_row(**overrides) -> dict:
    """A valid BeaverTails-V row (image left to the caller unless overridden)."""
    row = {
        "question": "What is shown here?", "image": None, "category": "animal_abuse", "image_severity": 1,
        "response_1": "A cat on a sofa.", "response_2": "I cannot help with that.",
        "response_1_from": "model-a", "response_2_from": "model-b",
        "more_helpful_response_id": "1", "safer_response_id": "2",
        "is_response_1_safe": "no", "is_response_2_safe": "yes",
        "response_1_harmless_rate": -1, "response_2_harmless_rate": 2,
        "response_1_helpful_rate": 3, "response_2_helpful_rate": 0,
    }
    row.update(overrides)
    return row


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, rows: list[dict]) -> None:
    """`datasets` parquet with an Image column (PIL images, paths, or {bytes, path} structs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    if any(isinstance(v, dict) for v in columns["image"]):  # mixed column: make every entry a struct
        columns["image"] = [{"bytes": png_bytes(v), "path": None} if isinstance(v, Image.Image) else v
                            for v in columns["image"]]
    datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image()).to_parquet(str(path))


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")


def save_image(path: Path, size, colour, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------
# 1. Parquet, hub layout
# ----------------------------------------------------------------------------------------------------------

# (category, split) -> rows; images are PIL images, sizes and colours checked after the round trip.
def hub_rows() -> dict:
    tiny = Image.new("RGB", (1, 1), (255, 0, 0))
    wide = Image.new("RGB", (6000, 40), (0, 0, 255))
    grey = Image.new("L", (7, 5), 128)  # decoded to RGB (128, 128, 128)
    rgba = Image.new("RGBA", (4, 9), (10, 200, 30, 255))
    return {
        ("animal_abuse", "train"): [
            bt_row(question=EMOJI_Q, image=tiny, response_1="The dog 🐕 is playing fetch 🎾.", response_2=ARABIC,
                   more_helpful_response_id="2", safer_response_id="1", is_response_1_safe="yes",
                   is_response_2_safe="no", response_1_harmless_rate=2, response_2_harmless_rate=-3),
            bt_row(question=HEBREW_Q, image=wide, response_1=HEBREW, response_2="A very wide blue banner.",
                   more_helpful_response_id="1", safer_response_id="2", is_response_1_safe="no",
                   is_response_2_safe="yes", response_1_harmless_rate=-1, response_2_harmless_rate=0),
        ],
        ("animal_abuse", "evaluation"): [
            bt_row(question="Evaluation question?", image=rgba, response_1="eval one", response_2="eval two"),
        ],
        ("violence_and_physical_harm", "train"): [
            bt_row(question="Is this dangerous?", image=grey, category="violence_and_physical_harm",
                   response_1="Yes, very.", response_2="No.", more_helpful_response_id="2", safer_response_id="2",
                   is_response_1_safe="yes", is_response_2_safe="yes", response_1_harmless_rate=3,
                   response_2_harmless_rate=1),
        ],
        ("violence_and_physical_harm", "evaluation"): [
            bt_row(question="Another evaluation question?", image=tiny.copy(), category="violence_and_physical_harm",
                   response_1="first", response_2="second"),
        ],
    }


EXPECTED_IMAGES = {  # question -> (size, colour at (0, 0), colour at the far corner)
    EMOJI_Q: ((1, 1), (255, 0, 0), (255, 0, 0)),
    HEBREW_Q: ((6000, 40), (0, 0, 255), (0, 0, 255)),
    "Evaluation question?": ((4, 9), (10, 200, 30), (10, 200, 30)),
    "Is this dangerous?": ((7, 5), (128, 128, 128), (128, 128, 128)),
    "Another evaluation question?": ((1, 1), (255, 0, 0), (255, 0, 0)),
}


def write_hub(root: Path) -> dict:
    rows = hub_rows()
    for (category, split), rs in rows.items():
        write_parquet(root / category / f"{split}.parquet", rs)
    return rows


def check_pairs(pairs: list[dict], expected_rows: list[dict]) -> None:
    assert [p["question"] for p in pairs] == [r["question"] for r in expected_rows]
    for p, r in zip(pairs, expected_rows):
        assert p["responses"] == (r["response_1"], r["response_2"])
        assert p["category"] == r["category"]
        assert p["more_helpful"] == int(r["more_helpful_response_id"])
        assert p["safer"] == int(r["safer_response_id"])
        assert p["is_safe"] == (r["is_response_1_safe"] == "yes", r["is_response_2_safe"] == "yes")
        assert p["harmless_rate"] == (r["response_1_harmless_rate"], r["response_2_harmless_rate"])
        size, first, last = EXPECTED_IMAGES[r["question"]]
        assert isinstance(p["image"], ImageRef) and p["image"].size == size  # kept encoded, size read once
        image = open_image(p["image"])
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert image.size == size
        assert image.getpixel((0, 0)) == first
        assert image.getpixel((size[0] - 1, size[1] - 1)) == last


@pytest.mark.parametrize("nested", [False, True], ids=["root", "root_data"])
def test_parquet_hub_layout_round_trip(tmp_path, nested):
    root = tmp_path / "hub"
    rows = write_hub(root / "data" if nested else root)

    train, skips = load_pairs(str(root), split="train")
    assert not skips and skips.report() == "none"
    check_pairs(train, rows[("animal_abuse", "train")] + rows[("violence_and_physical_harm", "train")])
    base = root / "data" if nested else root
    assert train[0]["source"] == f"{base / 'animal_abuse' / 'train.parquet'}:0"
    assert train[2]["source"] == f"{base / 'violence_and_physical_harm' / 'train.parquet'}:0"

    evaluation, _ = load_pairs(str(root), split="evaluation")
    check_pairs(evaluation, rows[("animal_abuse", "evaluation")] + rows[("violence_and_physical_harm", "evaluation")])

    only, _ = load_pairs(str(root), split="train", categories=["violence_and_physical_harm"])
    check_pairs(only, rows[("violence_and_physical_harm", "train")])
    ordered, _ = load_pairs(str(root), split="train", categories=["violence_and_physical_harm", "animal_abuse"])
    assert [p["category"] for p in ordered] == ["violence_and_physical_harm", "animal_abuse", "animal_abuse"]
    everything, _ = load_pairs(str(root), split="train")
    limited, _ = load_pairs(str(root), split="train", limit=2)  # a seeded random subset, in file order
    assert len(limited) == 2 and limited == load_pairs(str(root), split="train", limit=2)[0]
    positions = [[p["question"] for p in everything].index(q["question"]) for q in limited]
    assert positions == sorted(positions)

    # The same rows, one parquet file loaded directly.
    single, _ = load_pairs(str(base / "animal_abuse" / "train.parquet"))
    check_pairs(single, rows[("animal_abuse", "train")])

    # Reward and cost pairs of the emoji row: more helpful "2", safer "1", rates (2, -3).
    r = reward_pair(train[0])
    assert (r["chosen"], r["rejected"]) == (ARABIC, "The dog 🐕 is playing fetch 🎾.")
    c = cost_pair(train[0])
    assert (c["higher_cost"], c["safer"]) == (ARABIC, "The dog 🐕 is playing fetch 🎾.")
    assert (c["higher_cost_sign"], c["safer_sign"]) == (3.0, -2.0)
    assert c["image"].size == (1, 1)


def test_parquet_null_rates_and_path_images(tmp_path, monkeypatch):
    """Null rates in a parquet int column load as None (signs fall back to is_safe); an image stored as a path
    (no bytes) is resolved against the parquet file's folder, not the working directory."""
    root = tmp_path / "hub"
    save_image(root / "cat" / "images" / "a.png", (3, 2), (0, 255, 0))
    rows = [
        bt_row(image="images/a.png", category="cat", response_1_harmless_rate=None, response_2_harmless_rate=None),
        bt_row(image="images/a.png", category="cat", question="second?", response_1_harmless_rate=-2,
               response_2_harmless_rate=None),
    ]
    monkeypatch.chdir(root / "cat")  # `datasets` looks at the path while writing
    write_parquet(root / "cat" / "train.parquet", rows)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for source in (root, root / "cat" / "train.parquet"):
        pairs, _ = load_pairs(str(source))
        assert [p["harmless_rate"] for p in pairs] == [(None, None), (-2, None)]
        assert all(p["image"].size == (3, 2) and open_image(p["image"]).getpixel((2, 1)) == (0, 255, 0) for p in pairs)
        # safer = "2": higher cost = response_1 (not safe), safer = response_2 (safe)
        assert [(cost_pair(p)["higher_cost_sign"], cost_pair(p)["safer_sign"]) for p in pairs] == [(1.0, -1.0),
                                                                                                   (2.0, -1.0)]


# ----------------------------------------------------------------------------------------------------------
# 2. JSONL with relative image paths; reward and cost pairs against hand-worked values
# ----------------------------------------------------------------------------------------------------------

def jsonl_rows(tmp_path: Path) -> list[dict]:
    sub = tmp_path / "sets" / "bt"
    save_image(sub / "imgs" / "red.png", (5, 3), (255, 0, 0))
    save_image(sub / "imgs" / "nested" / "blue.jpg", (8, 8), (0, 0, 255))
    absolute = save_image(tmp_path / "abs" / "green.png", (2, 2), (0, 255, 0))
    no_rates = {"response_1_harmless_rate", "response_2_harmless_rate", "response_1_helpful_rate",
                "response_2_helpful_rate"}
    return [
        # A: helpful "2", safer "1", rates (1, -2)
        bt_row(question="A?", image="imgs/red.png", response_1="A1", response_2="A2", more_helpful_response_id="2",
               safer_response_id="1", is_response_1_safe="yes", is_response_2_safe="no",
               response_1_harmless_rate=1, response_2_harmless_rate=-2),
        # B: helpful "1", safer "2", both safe, rates (3, 0): the safer side is a refusal rated 0 -> sign 0.0
        bt_row(question="B?", image="imgs/nested/blue.jpg", category="privacy_invasion_and_surveillance",
               response_1="B1", response_2="B2", more_helpful_response_id="1", safer_response_id="2",
               is_response_1_safe="yes", is_response_2_safe="yes", response_1_harmless_rate=3,
               response_2_harmless_rate=0),
        # C: no rates at all, both unsafe
        {k: v for k, v in bt_row(question="C?", image=str(absolute), response_1="C1", response_2="C2",
                                 more_helpful_response_id="1", safer_response_id="2", is_response_1_safe="no",
                                 is_response_2_safe="no").items() if k not in no_rates},
        # D: no rates, helpful "2", safer "2", (unsafe, safe)
        {k: v for k, v in bt_row(question="D?", image="imgs/red.png", response_1="D1", response_2="D2",
                                 more_helpful_response_id="2", safer_response_id="2", is_response_1_safe="no",
                                 is_response_2_safe="yes").items() if k not in no_rates},
        # E: rate for response_1 only (-3), response_2 rate null; safer "2"
        bt_row(question="E?", image="imgs/red.png", response_1="E1", response_2="E2", more_helpful_response_id="1",
               safer_response_id="2", is_response_1_safe="no", is_response_2_safe="yes",
               response_1_harmless_rate=-3, response_2_harmless_rate=None),
    ]


# question -> (chosen, rejected, higher_cost, safer, rate signs (higher, safer), binary signs, is_safe (higher, safer))
HAND_WORKED = {
    "A?": ("A2", "A1", "A2", "A1", (2.0, -1.0), (1.0, -1.0), (False, True)),
    "B?": ("B1", "B2", "B1", "B2", (-3.0, 0.0), (-1.0, -1.0), (True, True)),
    "C?": ("C1", "C2", "C1", "C2", (1.0, 1.0), (1.0, 1.0), (False, False)),
    "D?": ("D2", "D1", "D1", "D2", (1.0, -1.0), (1.0, -1.0), (False, True)),
    "E?": ("E1", "E2", "E1", "E2", (3.0, -1.0), (1.0, -1.0), (False, True)),
}


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_jsonl_round_trip_relative_images_and_pairs(tmp_path, monkeypatch, how):
    rows = jsonl_rows(tmp_path)
    path = tmp_path / "sets" / "bt" / "pairs.jsonl"
    write_jsonl(path, rows)
    cwd = tmp_path / "somewhere" / "else"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    source = "../../sets/bt/pairs.jsonl" if how == "relative" else str(path)

    pairs, skips = load_pairs(source)
    assert not skips
    assert [p["question"] for p in pairs] == ["A?", "B?", "C?", "D?", "E?"]
    assert [p["image"].size for p in pairs] == [(5, 3), (8, 8), (2, 2), (5, 3), (5, 3)]
    assert open_image(pairs[0]["image"]).getpixel((4, 2)) == (255, 0, 0)
    assert open_image(pairs[2]["image"]).getpixel((1, 1)) == (0, 255, 0)
    blue = open_image(pairs[1]["image"]).getpixel((4, 4))  # JPEG: close to pure blue
    assert blue[2] > 240 and blue[0] < 15 and blue[1] < 15
    assert [p["harmless_rate"] for p in pairs] == [(1, -2), (3, 0), (None, None), (None, None), (-3, None)]
    assert pairs[1]["category"] == "privacy_invasion_and_surveillance"
    assert pairs[3]["source"] == f"{source}:3"

    for p in pairs:
        chosen, rejected, higher, safer, rate_signs, binary_signs, safe = HAND_WORKED[p["question"]]
        r = reward_pair(p)
        assert (r["chosen"], r["rejected"], r["question"], r["image"]) == (chosen, rejected, p["question"], p["image"])
        for sign_source, signs in (("rate", rate_signs), ("binary", binary_signs)):
            c = cost_pair(p, sign_source=sign_source)
            assert (c["higher_cost"], c["safer"]) == (higher, safer)
            assert (c["higher_cost_sign"], c["safer_sign"]) == signs, (p["question"], sign_source)
            assert all(isinstance(s, float) for s in signs)
            assert (c["higher_cost_is_safe"], c["safer_is_safe"]) == safe
    assert cost_pair(pairs[1])["safer_sign"] == 0.0  # default sign_source is "rate"

    privacy, _ = load_pairs(source, categories=["privacy_invasion_and_surveillance"])
    assert [p["question"] for p in privacy] == ["B?"]
    assert len(load_pairs(source, limit=2)[0]) == 2


# ----------------------------------------------------------------------------------------------------------
# 3. PKU-SafeRLHF (text only, ids 0/1, booleans)
# ----------------------------------------------------------------------------------------------------------

PKU_HAND = [
    {"prompt": "How do I pick a lock?", "response_0": "Use a tension wrench and a pick.", "response_1": "I won't help.",
     "is_response_0_safe": False, "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 1},
    {"prompt": "Tell me a joke.", "response_0": "No.", "response_1": "Why did the chicken cross the road?",
     "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 1, "safer_response_id": 0},
    {"prompt": "How to make a weapon?", "response_0": "Here's how ...", "response_1": "Step one ...",
     "is_response_0_safe": False, "is_response_1_safe": False, "better_response_id": 1, "safer_response_id": 1},
]


def check_pku(pairs: list[dict], raw: list[dict]) -> None:
    assert len(pairs) == len(raw)
    for p, r in zip(pairs, raw):
        assert p["question"] == r["prompt"] and p["image"] is None
        assert p["responses"] == (r["response_0"], r["response_1"])
        assert p["more_helpful"] == r["better_response_id"] + 1 and p["safer"] == r["safer_response_id"] + 1
        assert p["is_safe"] == (r["is_response_0_safe"], r["is_response_1_safe"])
        assert p["harmless_rate"] == (None, None)
        rw = reward_pair(p)
        assert rw["chosen"] == r[f"response_{r['better_response_id']}"]
        assert rw["rejected"] == r[f"response_{1 - r['better_response_id']}"]
        assert rw["image"] is None
        safer, higher = r["safer_response_id"], 1 - r["safer_response_id"]
        for sign_source in ("rate", "binary"):
            c = cost_pair(p, sign_source)
            assert c["safer"] == r[f"response_{safer}"] and c["higher_cost"] == r[f"response_{higher}"]
            assert c["higher_cost_sign"] == (-1.0 if r[f"is_response_{higher}_safe"] else 1.0)
            assert c["safer_sign"] == (-1.0 if r[f"is_response_{safer}_safe"] else 1.0)


def test_pku_saferlhf_hand_written(tmp_path):
    json_path = tmp_path / "pku.json"
    json_path.write_text(json.dumps(PKU_HAND), encoding="utf-8")
    jsonl_path = tmp_path / "pku.jsonl"
    write_jsonl(jsonl_path, PKU_HAND)
    for path in (json_path, jsonl_path):
        pairs, skips = load_pairs(str(path))
        assert not skips
        check_pku(pairs, PKU_HAND)
    pairs, _ = load_pairs(str(json_path))
    assert [(reward_pair(p)["chosen"], cost_pair(p)["higher_cost"], cost_pair(p)["higher_cost_sign"],
             cost_pair(p)["safer_sign"]) for p in pairs] == [
        ("Use a tension wrench and a pick.", "Use a tension wrench and a pick.", 1.0, -1.0),
        ("Why did the chicken cross the road?", "Why did the chicken cross the road?", -1.0, -1.0),
        ("Step one ...", "Here's how ...", 1.0, 1.0),
    ]
    prompts, _ = load_prompts(str(json_path))
    assert prompts == [{"image": None, "question": r["prompt"], "category": "text", "source": f"{json_path}:{i}"}
                       for i, r in enumerate(PKU_HAND)]


@pytest.mark.skipif(not (SAMPLES / "pku_saferlhf_train.json").is_file(), reason="PKU-SafeRLHF sample not present")
def test_pku_saferlhf_real_sample():
    path = SAMPLES / "pku_saferlhf_train.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    pairs, skips = load_pairs(str(path))
    assert not skips
    check_pku(pairs, raw)
    assert {p["more_helpful"] for p in pairs} == {1, 2} and {p["safer"] for p in pairs} == {1, 2}


@pytest.mark.skipif(not (SAMPLES / "beavertails_v_fixture.jsonl").is_file()
                    or not (SAMPLES / "pku_saferlhf_train.json").is_file(), reason="fixture not present")
def test_beavertails_v_fixture_matches_pku_sample(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # image paths must resolve against the fixture's folder
    raw = json.loads((SAMPLES / "pku_saferlhf_train.json").read_text(encoding="utf-8"))
    pairs, skips = load_pairs(str(SAMPLES / "beavertails_v_fixture.jsonl"))
    assert not skips and len(pairs) == len(raw)
    pku = [validate_pair_row(r, "pku", i) for i, r in enumerate(raw)]
    for p, q in zip(pairs, pku):
        for key in ("question", "responses", "more_helpful", "safer", "is_safe", "harmless_rate"):
            assert p[key] == q[key]
        assert open_image(p["image"]).mode == "RGB" and p["image"].size == (1024, 1024)


# ----------------------------------------------------------------------------------------------------------
# 4. Invalid rows and files
# ----------------------------------------------------------------------------------------------------------

def drop(field):
    return lambda row: {k: v for k, v in row.items() if k != field}


def setv(**kw):
    return lambda row: {**row, **kw}


# name -> (mutation of a valid row, field named in the message, reason)
BAD_ROWS = {
    "missing_question": (drop("question"), "question", "missing_field"),
    "missing_safer_id": (drop("safer_response_id"), "safer_response_id", "missing_field"),
    "missing_is_safe": (drop("is_response_2_safe"), "is_response_2_safe", "missing_field"),
    "missing_image_field": (drop("image"), "image", "missing_field"),
    "id_3": (setv(more_helpful_response_id="3"), "more_helpful_response_id", "bad_response_id"),
    "id_0": (setv(safer_response_id="0"), "safer_response_id", "bad_response_id"),
    "id_float": (setv(more_helpful_response_id=1.5), "more_helpful_response_id", "bad_response_id"),
    "id_bool": (setv(safer_response_id=True), "safer_response_id", "bad_response_id"),
    "id_none": (setv(safer_response_id=None), "safer_response_id", "bad_response_id"),
    "identical": (setv(response_1="Same answer.", response_2="  Same answer.\n"), "response_2",
                  "identical_responses"),
    "empty_question": (setv(question="   "), "question", "empty_text"),
    "empty_response": (setv(response_2=""), "response_2", "empty_text"),
    "int_response": (setv(response_1=42), "response_1", "bad_text"),
    "null_response": (setv(response_2=None), "response_2", "bad_text"),
    "list_question": (setv(question=["what?"]), "question", "bad_text"),
    "is_safe_maybe": (setv(is_response_2_safe="maybe"), "is_response_2_safe", "bad_safety_label"),
    "is_safe_int": (setv(is_response_1_safe=1), "is_response_1_safe", "bad_safety_label"),
    "rate_4": (setv(response_2_harmless_rate=4), "response_2_harmless_rate", "bad_rate"),
    "rate_minus_4": (setv(response_1_harmless_rate=-4), "response_1_harmless_rate", "bad_rate"),
    "rate_float": (setv(response_1_harmless_rate=-1.5), "response_1_harmless_rate", "bad_rate"),
    "rate_bool": (setv(response_2_harmless_rate=True), "response_2_harmless_rate", "bad_rate"),
    "rate_text": (setv(response_2_harmless_rate="high"), "response_2_harmless_rate", "bad_rate"),
    "rate_list": (setv(response_1_harmless_rate=[1]), "response_1_harmless_rate", "bad_rate"),
    "rate_contradicts_yes": (setv(response_2_harmless_rate=-2), "response_2_harmless_rate", "inconsistent_safety"),
    "rate_0_with_no": (setv(response_1_harmless_rate=0), "response_1_harmless_rate", "inconsistent_safety"),
    "corrupt_image": (setv(image="imgs/corrupt.png"), "image", "unreadable_image"),
    "truncated_image": (setv(image="imgs/truncated.png"), "image", "unreadable_image"),
    "missing_image_file": (setv(image="imgs/nope.png"), "image", "missing_image"),
    "null_image": (setv(image=None), "image", "missing_image"),
}


def bad_row_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bad"
    save_image(d / "imgs" / "ok.png", (2, 3), (1, 2, 3))
    (d / "imgs" / "corrupt.png").write_bytes(b"this is not an image at all")
    good = (d / "imgs" / "ok.png").read_bytes()
    (d / "imgs" / "truncated.png").write_bytes(good[: len(good) // 2])
    return d


def good(i: int) -> dict:
    return bt_row(question=f"good {i}?", image="imgs/ok.png")


def assert_names(err: DataError, path, row, field) -> None:
    msg = str(err)
    assert str(path) in msg
    if row is not None:
        assert f"row {row}" in msg
    if field is not None:
        assert f"field '{field}'" in msg


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_invalid_row_names_file_row_field(tmp_path, name):
    mutate, field, reason = BAD_ROWS[name]
    d = bad_row_dir(tmp_path)
    path = d / "pairs.jsonl"
    write_jsonl(path, [good(0), mutate(good(1)), good(2)])
    with pytest.raises(DataError) as info:
        load_pairs(str(path))
    assert info.value.reason == reason
    assert_names(info.value, path, 1, field)

    pairs, skips = load_pairs(str(path), skip_invalid=True)
    assert [p["question"] for p in pairs] == ["good 0?", "good 2?"]
    assert dict(skips) == {reason: 1}
    assert skips.report() == f"{reason}: 1 (row 1 of {path})"


@pytest.mark.parametrize("line, reason", [
    ("[1, 2]", "bad_row"), ('"just a string"', "bad_row"), ("5", "bad_row"), ("null", "bad_row"),
    ('{"question": "cut off', "bad_json"), ("{'single': 'quotes'}", "bad_json"),
])
def test_jsonl_non_object_and_bad_json_lines(tmp_path, line, reason):
    d = bad_row_dir(tmp_path)
    path = d / "pairs.jsonl"
    write_jsonl(path, [good(0), good(1), line, good(3)])
    with pytest.raises(DataError) as info:
        load_pairs(str(path))
    assert info.value.reason == reason
    assert_names(info.value, path, 2, None)
    pairs, skips = load_pairs(str(path), skip_invalid=True)
    assert [p["question"] for p in pairs] == ["good 0?", "good 1?", "good 3?"]
    assert dict(skips) == {reason: 1}


def test_jsonl_row_numbers_ignore_blank_lines(tmp_path):
    """Blank lines are not rows: bad JSON and bad fields after a blank line get consistent row numbers."""
    d = bad_row_dir(tmp_path)
    path = d / "pairs.jsonl"
    write_jsonl(path, [good(0), "", "   ", "{broken", setv(safer_response_id="7")(good(2))])
    with pytest.raises(DataError) as info:
        load_pairs(str(path))
    assert info.value.reason == "bad_json" and "row 1" in str(info.value)
    pairs, skips = load_pairs(str(path), skip_invalid=True)
    assert [p["question"] for p in pairs] == ["good 0?"]
    assert dict(skips) == {"bad_json": 1, "bad_response_id": 1}
    write_jsonl(path, [good(0), "", setv(safer_response_id="7")(good(2))])
    with pytest.raises(DataError) as info:
        load_pairs(str(path))
    assert_names(info.value, path, 1, "safer_response_id")


def test_skip_invalid_counts_every_reason(tmp_path):
    d = bad_row_dir(tmp_path)
    path = d / "pairs.jsonl"
    bad = [mutate(good(100 + i)) for i, (mutate, _, _) in enumerate(BAD_ROWS.values())]
    lines = [good(0)] + bad[:10] + [good(1), "[]", "{nope"] + bad[10:] + [good(2), "7"]
    write_jsonl(path, lines)
    pairs, skips = load_pairs(str(path), skip_invalid=True)
    assert [p["question"] for p in pairs] == ["good 0?", "good 1?", "good 2?"]
    assert isinstance(skips, SkipCounter)
    assert dict(skips) == {
        "missing_field": 4, "bad_response_id": 5, "identical_responses": 1, "empty_text": 2, "bad_text": 3,
        "bad_safety_label": 2, "bad_rate": 6, "inconsistent_safety": 2, "unreadable_image": 2, "missing_image": 2,
        "bad_row": 2, "bad_json": 1,
    }
    assert sum(skips.values()) == len(BAD_ROWS) + 3
    # row numbers: good 0 is row 0, bad[:10] rows 1-10, good 1 row 11, "[]" row 12, "{nope" row 13, bad[10:] 14-32
    assert skips.report().startswith(f"bad_json: 1 (row 13 of {path}), bad_rate: 6 (rows 21, 22, 23, 24, 25, ... of "
                                     f"{path}), bad_response_id: 5 (rows 5, 6, 7, 8, 9 of {path}), bad_row: 2 (rows "
                                     f"12, 34 of {path})")
    # limit applies to the valid rows
    limited = [p["question"] for p in load_pairs(str(path), skip_invalid=True, limit=2)[0]]
    assert len(limited) == 2 and all(q.startswith("good") for q in limited)


def test_parquet_invalid_rows(tmp_path):
    """Row errors in the hub layout name the parquet file; corrupt image bytes are an unreadable image."""
    root = tmp_path / "hub"
    ok = Image.new("RGB", (2, 2), (9, 9, 9))
    rows = [
        bt_row(question="fine?", image=ok),
        bt_row(question="corrupt?", image={"bytes": b"\x89PNG garbage", "path": None}),
        bt_row(question="bad id?", image=ok, more_helpful_response_id="3"),
        bt_row(question="contradiction?", image=ok, is_response_2_safe="no"),  # rate 2 with "no"
        bt_row(question="identical?", image=ok, response_2="A cat on a sofa."),
        bt_row(question="extreme rates?", image=ok, response_1_harmless_rate=-3, response_2_harmless_rate=3),
        bt_row(question="rate 4?", image=ok, response_2_harmless_rate=4),
    ]
    write_parquet(root / "animal_abuse" / "train.parquet", rows)
    file = root / "animal_abuse" / "train.parquet"
    with pytest.raises(DataError) as info:
        load_pairs(str(root))
    assert info.value.reason == "unreadable_image"
    assert_names(info.value, file, 1, "image")
    pairs, skips = load_pairs(str(root), skip_invalid=True)
    assert [p["question"] for p in pairs] == ["fine?", "extreme rates?"]
    assert pairs[1]["harmless_rate"] == (-3, 3)
    assert dict(skips) == {"unreadable_image": 1, "bad_response_id": 1, "inconsistent_safety": 1,
                           "identical_responses": 1, "bad_rate": 1}


def test_load_image_forms(tmp_path):
    png = save_image(tmp_path / "x.png", (3, 4), (7, 8, 9))
    data = png.read_bytes()
    for value, base in ((Image.open(png), None), ({"bytes": data, "path": None}, None), (data, None),
                        (str(png), None), ("x.png", tmp_path), ({"bytes": None, "path": "x.png"}, tmp_path)):
        image = load_image(value, "src", 0, base)
        assert image.mode == "RGB" and image.size == (3, 4) and image.getpixel((2, 3)) == (7, 8, 9)
    for value, reason in ((b"junk", "unreadable_image"), ({"bytes": b"junk", "path": None}, "unreadable_image"),
                          ("nope.png", "missing_image"), (None, "missing_image"), (123, "missing_image")):
        with pytest.raises(DataError) as info:
            load_image(value, "src.jsonl", 4, tmp_path)
        assert info.value.reason == reason
        assert_names(info.value, "src.jsonl", 4, "image")


@pytest.mark.parametrize("name, mutate, field, reason", [
    ("better_2", setv(better_response_id=2), "better_response_id", "bad_response_id"),
    ("better_bool", setv(better_response_id=True), "better_response_id", "bad_response_id"),
    ("safer_str", setv(safer_response_id="x"), "safer_response_id", "bad_response_id"),
    ("missing_prompt", drop("prompt"), "prompt", "missing_field"),
    ("missing_safe", drop("is_response_1_safe"), "is_response_1_safe", "missing_field"),
    ("safe_maybe", setv(is_response_0_safe="maybe"), "is_response_0_safe", "bad_safety_label"),
    ("empty_response_0", setv(response_0=" "), "response_0", "empty_text"),
    ("int_response_1", setv(response_1=3), "response_1", "bad_text"),
    ("empty_prompt", setv(prompt=""), "prompt", "empty_text"),
    ("identical", setv(response_1="Use a tension wrench and a pick."), "response_1", "identical_responses"),
])
def test_pku_invalid_rows_name_pku_fields(tmp_path, name, mutate, field, reason):
    """PKU rows are validated under their own field names (response_0 / response_1, prompt)."""
    path = tmp_path / "pku.json"
    path.write_text(json.dumps([PKU_HAND[1], mutate(PKU_HAND[0])]), encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_pairs(str(path))
    assert info.value.reason == reason
    assert_names(info.value, path, 1, field)
    pairs, skips = load_pairs(str(path), skip_invalid=True)
    assert [p["question"] for p in pairs] == [PKU_HAND[1]["prompt"]] and dict(skips) == {reason: 1}


def test_file_level_errors(tmp_path):
    # missing file
    missing = tmp_path / "nope.jsonl"
    for loader in (load_pairs, load_sft, load_prompts):
        with pytest.raises(DataError) as info:
            loader(str(missing))
        assert info.value.reason == "missing_file" and str(missing) in str(info.value)

    # unsupported extension (an existing local file is never taken for a hub id)
    for name in ("pairs.csv", "pairs.txt", "pairs"):
        other = tmp_path / name
        other.write_text("question,response\n", encoding="utf-8")
        for loader in (load_pairs, load_sft, load_prompts):
            with pytest.raises(DataError) as info:
                loader(str(other))
            assert info.value.reason == "bad_file" and str(other) in str(info.value)

    # .json that is not a list / not JSON
    obj = tmp_path / "obj.json"
    obj.write_text('{"prompt": "x"}', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_pairs(str(obj))
    assert info.value.reason == "bad_json" and str(obj) in str(info.value)
    obj.write_text("[{", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_pairs(str(obj))
    assert info.value.reason == "bad_json"

    # every row invalid -> "no valid rows", with the skip report
    d = bad_row_dir(tmp_path)
    all_bad = d / "all_bad.jsonl"
    write_jsonl(all_bad, [setv(safer_response_id="9")(good(0)), setv(image="imgs/nope.png")(good(1))])
    with pytest.raises(DataError) as info:
        load_pairs(str(all_bad), skip_invalid=True)
    assert info.value.reason == "empty_dataset"
    assert "no valid rows" in str(info.value) and str(all_bad) in str(info.value)
    assert f"bad_response_id: 1 (row 0 of {all_bad}), missing_image: 1 (row 1 of {all_bad})" in str(info.value)
    with pytest.raises(DataError) as info:  # without skip_invalid the first bad row is reported
        load_pairs(str(all_bad))
    assert info.value.reason == "bad_response_id"

    # an empty file
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    for loader in (load_pairs, load_sft, load_prompts):
        with pytest.raises(DataError) as info:
            loader(str(empty))
        assert info.value.reason == "empty_dataset" and "no valid rows" in str(info.value)

    # hub layout: unknown category, missing split, directory without parquet files
    root = tmp_path / "hub"
    write_parquet(root / "animal_abuse" / "train.parquet", [bt_row(image=Image.new("RGB", (1, 1)))])
    with pytest.raises(DataError) as info:
        load_pairs(str(root), categories=["animal_abuse", "no_such_category"])
    assert info.value.reason == "missing_file"
    assert "no_such_category" in str(info.value) and "field 'category'" in str(info.value)
    assert "animal_abuse" in str(info.value)  # lists what is available
    with pytest.raises(DataError) as info:
        load_pairs(str(root), split="evaluation")
    assert "evaluation.parquet" in str(info.value) and str(root) in str(info.value)
    bare = tmp_path / "bare"
    (bare / "data" / "animal_abuse").mkdir(parents=True)
    (bare / "data" / "animal_abuse" / "train.jsonl").write_text("", encoding="utf-8")
    for loader in (load_pairs, load_prompts):
        with pytest.raises(DataError) as info:
            loader(str(bare))
        assert info.value.reason == "missing_file" and "train.parquet" in str(info.value)

    # an empty parquet category after skipping -> no valid rows
    bad_root = tmp_path / "bad_hub"
    write_parquet(bad_root / "animal_abuse" / "train.parquet",
                  [bt_row(image=Image.new("RGB", (1, 1)), safer_response_id="0")])
    with pytest.raises(DataError) as info:
        load_pairs(str(bad_root), skip_invalid=True)
    assert info.value.reason == "empty_dataset" and "bad_response_id: 1" in str(info.value)


def test_validate_pair_row_direct():
    pair = validate_pair_row(bt_row(image=Image.new("RGB", (2, 2), (4, 5, 6))), "mem", 0)
    assert pair["image"].getpixel((1, 1)) == (4, 5, 6) and pair["source"] == "mem:0"
    text = validate_pair_row(bt_row(), "mem", 3, with_image=False)
    assert text["image"] is None and text["is_safe"] == (False, True) and text["harmless_rate"] == (-1, 2)
    # booleans are accepted for is_safe, "Yes"/" no " too; a missing category becomes "uncategorized"
    row = {k: v for k, v in bt_row(is_response_1_safe=False, is_response_2_safe=" Yes ").items() if k != "category"}
    pair = validate_pair_row(row, "mem", 0, with_image=False)
    assert pair["is_safe"] == (False, True) and pair["category"] == "uncategorized"
    with pytest.raises(DataError) as info:
        validate_pair_row(bt_row(), "mem", 5)  # image None
    assert info.value.reason == "missing_image" and str(info.value).startswith("mem, row 5, field 'image'")


# ----------------------------------------------------------------------------------------------------------
# 5. SFT examples and prompts
# ----------------------------------------------------------------------------------------------------------

def test_load_sft_and_prompts(tmp_path, monkeypatch):
    d = tmp_path / "sft" / "v1"
    save_image(d / "images" / "a.png", (6, 4), (200, 100, 50))
    rows = [
        {"question": EMOJI_Q, "image": "images/a.png", "response": ARABIC, "category": "animal_abuse"},
        {"question": "Text only?", "response": "Yes, no image here.", "category": "text"},
        {"question": HEBREW_Q, "image": "images/a.png", "response": HEBREW},
    ]
    path = d / "sft.jsonl"
    write_jsonl(path, rows)
    monkeypatch.chdir(tmp_path)
    source = "sft/v1/sft.jsonl"

    sft, skips = load_sft(source)
    assert not skips
    assert [(r["question"], r["response"], r["category"]) for r in sft] == [
        (EMOJI_Q, ARABIC, "animal_abuse"), ("Text only?", "Yes, no image here.", "text"),
        (HEBREW_Q, HEBREW, "uncategorized")]
    assert sft[0]["image"].size == (6, 4) and open_image(sft[0]["image"]).getpixel((5, 3)) == (200, 100, 50)
    assert sft[1]["image"] is None
    assert len(load_sft(source, limit=2)[0]) == 2

    prompts, _ = load_prompts(source)
    assert [set(p) for p in prompts] == [{"image", "question", "category", "source"}] * 3
    assert [p["source"] for p in prompts] == [f"{source}:{i}" for i in range(3)]  # file:row, the prompt's id
    assert [p["question"] for p in prompts] == [EMOJI_Q, "Text only?", HEBREW_Q]
    assert prompts[0]["image"].size == (6, 4) and prompts[1]["image"] is None

    # invalid SFT rows
    bad = d / "bad.jsonl"
    write_jsonl(bad, [rows[0], {"question": "no response"}, {"question": "q", "response": 5},
                      {"question": "q", "response": "r", "image": "images/missing.png"}, "[]", rows[1]])
    with pytest.raises(DataError) as info:
        load_sft(str(bad))
    assert info.value.reason == "missing_field"
    assert_names(info.value, bad, 1, "response")
    sft, skips = load_sft(str(bad), skip_invalid=True)
    assert [r["question"] for r in sft] == [EMOJI_Q, "Text only?"]
    assert dict(skips) == {"missing_field": 1, "bad_text": 1, "missing_image": 1, "bad_row": 1}


def test_load_prompts_from_pairs(tmp_path):
    root = tmp_path / "hub"
    rows = write_hub(root)
    prompts, skips = load_prompts(str(root), split="train")
    assert not skips
    expected = rows[("animal_abuse", "train")] + rows[("violence_and_physical_harm", "train")]
    assert [(p["question"], p["category"]) for p in prompts] == [(r["question"], r["category"]) for r in expected]
    assert [p["image"].size for p in prompts] == [(1, 1), (6000, 40), (7, 5)]
    assert all(set(p) == {"image", "question", "category", "source"} for p in prompts)
    assert prompts[0]["source"].endswith("animal_abuse/train.parquet:0")
    evaluation, _ = load_prompts(str(root), split="evaluation", categories=["violence_and_physical_harm"])
    assert [p["question"] for p in evaluation] == ["Another evaluation question?"]
    assert len(load_prompts(str(root), limit=2)[0]) == 2

    # pair JSONL whose first line is broken: prompts of the good rows, the broken line counted
    d = bad_row_dir(tmp_path)
    path = d / "pairs.jsonl"
    write_jsonl(path, ["{oops", good(1), good(2)])
    prompts, skips = load_prompts(str(path), skip_invalid=True)
    assert [p["question"] for p in prompts] == ["good 1?", "good 2?"] and dict(skips) == {"bad_json": 1}
    write_jsonl(path, ["[1]", good(1)])
    prompts, skips = load_prompts(str(path), skip_invalid=True)
    assert [p["question"] for p in prompts] == ["good 1?"] and dict(skips) == {"bad_row": 1}


def test_mm_safetybench_layout_and_bad_entries(tmp_path):
    import shutil

    sample = Path(__file__).resolve().parents[1] / "data" / "samples" / "mm_safetybench"
    prompts, skips = load_prompts(str(sample), categories=["Illegal_Activitiy"])
    assert not skips and [p["category"] for p in prompts] == ["Illegal_Activitiy"] * 2
    assert prompts[0]["question"].startswith("The image shows a phrase of an activity")  # the SD question
    assert prompts[0]["image"].size == (1024, 1024) and prompts[0]["source"].endswith("test.json:0")
    root = tmp_path / "mmsb"
    shutil.copytree(sample, root)
    text = root / "text" / "Legal_Opinion" / "test.json"
    entries = json.loads(text.read_text())
    entries["7"] = {"Question": "no image for this one", "Rephrased Question(SD)": "Describe the image."}
    entries["8"] = {"Question": "no SD question"}
    text.write_text(json.dumps(entries))
    with pytest.raises(DataError) as info:
        load_prompts(str(root))
    assert str(text) in str(info.value) and "row 7" in str(info.value) and info.value.reason == "missing_image"
    prompts, skips = load_prompts(str(root), skip_invalid=True)
    assert len(prompts) == 6 and dict(skips) == {"missing_image": 1, "missing_field": 1}
