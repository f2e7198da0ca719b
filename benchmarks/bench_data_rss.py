"""Host memory of loading image rows: resident set size (RSS) after import, at its peak and after load_pairs.

Writes N JPEG images (384 px by default) and the same N BeaverTails-V rows twice, as a JSONL file with image
paths and as a parquet file with the image bytes embedded (the hub layout), then loads each in a fresh process
with the data layer found under every --code folder (e.g. an older checkout, to compare) and prints a table.

    python benchmarks/bench_data_rss.py                                   # this checkout
    git archive 1e582ca | tar -x -C /tmp/orig_root                        # the data layer before issue #11
    python benchmarks/bench_data_rss.py --code /tmp/orig_root --code .    # before / after

RSS is read from /proc/self/status (VmRSS now, VmHWM peak); Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["HF_DATASETS_CACHE"] = sys.argv[3]

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # MiB

from data.sources import load_pairs
import datasets  # both versions may import it; count it in the baseline
import pyarrow.parquet
baseline = rss("VmRSS")
start = time.time()
rows, skips = load_pairs(sys.argv[2])
seconds = time.time() - start
print(json.dumps({"rows": len(rows), "baseline_mib": baseline, "peak_mib": rss("VmHWM"), "after_mib": rss("VmRSS"),
                  "seconds": seconds, "image_type": type(rows[0]["image"]).__name__}))
"""


def make_data(root: Path, n: int, size: int) -> tuple[Path, Path]:
    """N photo-like JPEGs (smooth gradients + noise, about 30-40 KB at 384 px), a JSONL with their paths and a
    parquet (hub layout root/<category>/train.parquet) with their bytes."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / size
    rows, structs = [], []
    for i in range(n):
        phase = rng.uniform(0, 6.28, 3)
        base = np.stack([np.sin(6 * x + phase[c]) * np.cos(4 * y + phase[c]) for c in range(3)], -1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        path = images / f"{i}.jpg"
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        row = {"question": f"What is in picture {i}?", "category": "bench", "response_1": f"A pattern {i}.",
               "response_2": "I cannot tell.", "more_helpful_response_id": "1", "safer_response_id": "2",
               "is_response_1_safe": "yes", "is_response_2_safe": "yes", "response_1_harmless_rate": 1,
               "response_2_harmless_rate": 2}
        rows.append({**row, "image": f"images/{i}.jpg"})
        structs.append({**row, "image": {"bytes": path.read_bytes(), "path": None}})
    jsonl = root / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    parquet = root / "hub" / "bench" / "train.parquet"
    parquet.parent.mkdir(parents=True, exist_ok=True)
    columns = {k: [r[k] for r in structs] for k in structs[0]}
    datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image()).to_parquet(str(parquet))
    return jsonl, root / "hub"


def measure(code: Path, source: Path, cache: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(code), str(source), str(cache)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(code)})
    if out.returncode != 0:
        raise SystemExit(f"measurement failed for {code} on {source}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", action="append", help="folder holding the data/ package (repeatable; default .)")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--workdir", default="", help="where the images go (default: a temporary folder)")
    args = parser.parse_args()
    codes = [Path(c).resolve() for c in (args.code or ["."])]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        jsonl, hub = make_data(root, args.rows, args.size)
        total = sum(p.stat().st_size for p in (root / "images").iterdir()) / 2**20
        print(f"{args.rows} JPEGs of {args.size} px, {total:.0f} MiB encoded "
              f"({args.rows * args.size * args.size * 3 / 2**20:.0f} MiB as RGB pixels)")
        print(f"| code | source | rows | image in row | RSS after import | peak | after load | peak - import | "
              f"after - import | load s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for code in codes:
            for name, source in (("jsonl (paths)", jsonl), ("parquet (bytes)", hub)):
                r = measure(code, source, root / f"cache-{codes.index(code)}")
                print(f"| {code} | {name} | {r['rows']} | {r['image_type']} | {r['baseline_mib']:.0f} MiB | "
                      f"{r['peak_mib']:.0f} MiB | {r['after_mib']:.0f} MiB | "
                      f"{r['peak_mib'] - r['baseline_mib']:.0f} MiB | {r['after_mib'] - r['baseline_mib']:.0f} MiB | "
                      f"{r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
