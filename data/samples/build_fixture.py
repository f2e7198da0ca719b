"""Rebuild beavertails_v_fixture.jsonl from the copies in this folder (see README.md).

Real PKU-SafeRLHF text preference pairs are put next to real MM-SafetyBench images in the
BeaverTails-V schema. The pairing is ARTIFICIAL: the text never saw the image. It exists only so
the BeaverTails-V loading code can be exercised on real text and real pictures offline.

    python data/samples/build_fixture.py
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
# Fixed order (sorted file names), so the fixture is reproducible byte for byte.
IMAGES = sorted(name for name in os.listdir(os.path.join(HERE, "images")) if name.endswith(".jpg"))
SOURCE = "PKU-SafeRLHF (align-anything sample)"


def fixture_rows() -> list[dict]:
    """BeaverTails-V rows; PKU's 0/1 ids become "1"/"2", the graded rate fields are omitted."""
    with open(os.path.join(HERE, "pku_saferlhf_train.json")) as f:
        pku = json.load(f)
    rows = []
    for row in pku:
        if row["response_0"] == row["response_1"]:  # no preference to learn from a tie
            continue
        rows.append(
            {
                "question": row["prompt"],
                "image": "images/" + IMAGES[len(rows) % len(IMAGES)],
                # PKU rows carry no harm category and MM-SafetyBench's scenario describes the
                # picture, not the text, so neither is claimed here.
                "category": "uncategorized",
                "image_severity": 0,  # not graded upstream; a placeholder
                "response_1": row["response_0"],
                "response_2": row["response_1"],
                "response_1_from": SOURCE,
                "response_2_from": SOURCE,
                "more_helpful_response_id": str(row["better_response_id"] + 1),
                "safer_response_id": str(row["safer_response_id"] + 1),
                "is_response_1_safe": "yes" if row["is_response_0_safe"] else "no",
                "is_response_2_safe": "yes" if row["is_response_1_safe"] else "no",
            }
        )
    return rows


if __name__ == "__main__":
    rows = fixture_rows()
    with open(os.path.join(HERE, "beavertails_v_fixture.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows")
