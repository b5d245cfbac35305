"""Ingest benchmark: streaming ingest of ShareGPT4V's JSON, of the same records as a JSONL
captions table (``ingest.format: table``), and the naive ``json.load`` + ``pandas.DataFrame`` path.

Writes a ShareGPT4V-shaped annotation file (1.25M records by default, ~1.5 GB, caption lengths
like share-captioner's) and the same records as JSONL (``id``, ``image``, ``caption``), then runs
each method in a fresh subprocess (image check off, same validation, same Parquet output) and
prints records, wall time, records/s and peak RSS side by side.

    .venv/bin/python bench/ingest.py                  # full size (needs ~4 GB disk, ~8 GB RAM)
    .venv/bin/python bench/ingest.py --records 100000 # the figures of the README
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

# (first path component and folder, share of records) roughly as in share-captioner_*_1246k
SOURCES = [
    ("sam/images", 0.45),
    ("coco/train2017", 0.09),
    ("llava/llava_pretrain/images", 0.4),
    ("wikiart/images", 0.02),
    ("share_textvqa/images", 0.02),
    ("web-celebrity/images", 0.01),
    ("web-landmark/images", 0.01),
]
WORDS = (
    "the image shows a large small red blue green wooden metal building street person people "
    "standing sitting near with on in of and background foreground left right side top bottom "
    "scene light shadow sky tree car window sign text reads white black wearing holding"
).split()
PROMPT = "<image>\nWhat do you see happening in this image?"


def write_annotations(path: Path, n: int, seed: int = 0, table: Path | None = None) -> None:
    """Stream ``n`` records to ``path``; captions ~N(1050, 300) chars, clipped to [80, 4000].
    With ``table``, the same records as a JSONL captions table there."""
    rng = random.Random(seed)
    pool = " ".join(rng.choice(WORDS) for _ in range(400_000)) + ". "
    folders = [s for s, _ in SOURCES]
    weights = [w for _, w in SOURCES]
    rows = table.open("w", encoding="utf-8") if table else None
    with path.open("w", encoding="utf-8") as f:
        f.write("[")
        for i in range(n):
            length = min(4000, max(80, int(rng.gauss(1050, 300))))
            start = rng.randrange(len(pool) - length)
            caption = pool[start : start + length].strip().capitalize()
            folder = rng.choices(folders, weights)[0]
            record = {
                "id": f"{i:012d}",
                "image": f"{folder}/{i:012d}.jpg",
                "conversations": [
                    {"from": "human", "value": PROMPT},
                    {"from": "gpt", "value": caption},
                ],
            }
            if i:
                f.write(", ")
            f.write(json.dumps(record))
            if rows:
                rows.write(json.dumps({"id": record["id"], "image": record["image"],
                                       "caption": caption}) + "\n")
        f.write("]")
    if rows:
        rows.close()


def run_streaming(annotations: Path, out: Path, format: str = "sharegpt4v") -> tuple[int, int]:
    """The ingest node's path: streamed batches appended as Parquet parts."""
    from tulip_pipelines.data.ingest import IngestParams, iter_ingest_batches
    from tulip_pipelines.io.parquet import ParquetPartsDataset

    kept_ds = ParquetPartsDataset(str(out / "captions"))
    rejected_ds = ParquetPartsDataset(str(out / "rejected"))
    n_kept = n_rejected = 0
    fields = IngestParams(format=format, columns={"id": "id"}).fields()
    for kept, rejected in iter_ingest_batches(annotations, out, False, 50_000, format=format,
                                              fields=fields):
        kept_ds.save(kept)
        rejected_ds.save(rejected)
        n_kept += len(kept)
        n_rejected += len(rejected)
    return n_kept, n_rejected


def run_naive(annotations: Path, out: Path) -> tuple[int, int]:
    """Load everything with ``json.load``, validate, build DataFrames, write one Parquet each."""
    from tulip_pipelines.data.ingest import captions_frame, rejected_frame
    from tulip_pipelines.data.records import validate_record

    with annotations.open("rb") as f:
        records = json.load(f)
    seen: dict[str, int] = {}
    kept, rejected = [], []
    for index, record in enumerate(records):
        row, rejection = validate_record(index, record, out, False, seen)
        if row is not None:
            kept.append(row)
        else:
            rejected.append((index, None, rejection))
    captions_frame(kept).to_parquet(out / "captions.parquet", index=False)
    rejected_frame(rejected).to_parquet(out / "rejected.parquet", index=False)
    return len(kept), len(rejected)


def run_table(annotations: Path, out: Path) -> tuple[int, int]:
    """The same records as a JSONL captions table (``ingest.format: table``)."""
    return run_streaming(annotations.with_suffix(".jsonl"), out, format="table")


METHODS = {"streaming": run_streaming, "table": run_table, "naive": run_naive}
LABELS = {"streaming": "sharegpt4v JSON (streamed)", "table": "table JSONL (streamed)",
          "naive": "sharegpt4v JSON (json.load)"}


def child(method: str, annotations: Path, out: Path) -> None:
    """Run one method in this (fresh) process; print its figures as JSON."""
    start = time.perf_counter()
    n_kept, n_rejected = METHODS[method](annotations, out)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kept": n_kept, "rejected": n_rejected, "wall_s": wall, "peak_kb": peak_kb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_250_000)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--methods", default="streaming,table,naive",
                        help="comma-separated, of: " + ", ".join(METHODS))
    parser.add_argument("--child", choices=sorted(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--annotations", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.annotations, args.out)
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ingest_"))
    workdir.mkdir(parents=True, exist_ok=True)
    annotations = workdir / "share-captioner_bench.json"
    start = time.perf_counter()
    write_annotations(annotations, args.records, table=annotations.with_suffix(".jsonl"))
    size_mb = annotations.stat().st_size / 2**20
    table_mb = annotations.with_suffix(".jsonl").stat().st_size / 2**20
    elapsed = time.perf_counter() - start
    print(f"wrote {args.records:,} records ({size_mb:,.0f} MiB JSON, {table_mb:,.0f} MiB JSONL) "
          f"in {elapsed:.1f} s")
    rows = []
    for method in args.methods.split(","):
        out = workdir / f"out_{method}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        result = subprocess.run(
            [sys.executable, __file__, "--child", method, "--annotations", str(annotations),
             "--out", str(out)],
            check=True, capture_output=True, text=True,
        )
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append((method, figures))
    print(f"{'method':<28} {'records':>10} {'kept':>10} {'wall s':>8} {'records/s':>10} "
          f"{'peak RSS MB':>12}")
    for method, f in rows:
        n = f["kept"] + f["rejected"]
        print(
            f"{LABELS[method]:<28} {n:>10,} {f['kept']:>10,} "
            f"{f['wall_s']:>8.1f} {n / f['wall_s']:>10,.0f} {f['peak_kb'] / 1024:>12,.0f}"
        )
    if args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
