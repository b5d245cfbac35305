"""Readers of the retrieval benchmarks, each for the benchmark's own on-disk format.

Every reader returns a :class:`RetrievalBenchmark`: absolute image paths, the texts, and for each
text the index of its image. Entries that cannot be scored are never dropped silently: each one
becomes a :class:`BenchmarkIssue` with a reason (see :class:`IssueReason`). A reader whose files
are absent raises :class:`BenchmarkMissing` naming the expected path.

Formats (facts from the benchmarks' releases and the TULIP / Long-CLIP evaluation code):

* **Urban1k**: ``image/<stem>.jpg`` and ``caption/<stem>.txt``; the caption is the text file's
  first line; pairs are matched by file stem, in sorted stem order.
* **DCI-long**: ``dci_long.csv``, tab-separated, columns ``filepath`` (relative to the root) and
  ``title`` (the long caption), as TULIP prepares it; :func:`build_dci_long` writes it from the
  DCI release's annotation JSON files (one per image, long caption = ``extra_caption``, image file
  name = ``image``; records with an empty ``extra_caption`` are left out, as TULIP does).
* **COCO**: ``val2017/`` and ``annotations/captions_val2017.json`` (``images[].id/file_name``,
  ``annotations[].image_id/caption``); the first 5 captions of each image in annotation order.
* **Flickr30k**: ``results.csv`` with header ``image_name| comment_number| comment`` (``|`` then a
  space), images in ``flickr30k_images/``; optionally only Karpathy's test split
  (``dataset_flickr30k.json``: ``images[].filename`` with ``split == "test"``).
* **table** (a user's own benchmark): a captions table (CSV, TSV, JSONL or Parquet, by its
  extension; :mod:`tulip_pipelines.data.tables`) with an image column (paths relative to the
  root) and a caption column; an image may have several rows (one caption each); images in order
  of first appearance, their captions in row order.
* **ShareGPT4V-1k**: the first 1,000 validation records (``val_captions``), their images read
  through the ``prepared_images`` source (the prepared shards, or the files under the image root).
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from tulip_pipelines.data.images import FolderImages, ImageSource, as_image_source
from tulip_pipelines.data.paths import check_image_path
from tulip_pipelines.data.tables import MalformedRow, iter_table_rows
from tulip_pipelines.evaluation.benchmark import (
    BenchmarkIssue,
    BenchmarkMissing,
    IssueReason,
    RetrievalBenchmark,
)

__all__ = ["BenchmarkIssue", "BenchmarkMissing", "IssueReason", "RetrievalBenchmark", "READERS",
           "build_dci_long", "read_coco", "read_dci_long", "read_flickr30k", "read_sharegpt4v",
           "read_table", "read_urban1k"]

logger = logging.getLogger(__name__)


def _require(name: str, path: Path) -> Path:
    if not path.exists():
        raise BenchmarkMissing(name, path)
    return path


def _pairs(
    name: str, kind: str, items: list[tuple[str, list[str]]], issues: list[BenchmarkIssue]
) -> RetrievalBenchmark:
    """Build a benchmark from ``(image path, its texts)`` in order."""
    texts = [t for _, ts in items for t in ts]
    t2i = [i for i, (_, ts) in enumerate(items) for _ in ts]
    return RetrievalBenchmark(
        name, kind, [p for p, _ in items], texts, np.array(t2i, dtype=np.int64), issues
    )


def _clean(text: object) -> str:
    return text.strip() if isinstance(text, str) else ""


# ---------------------------------------------------------------------------------------------
# Urban1k


def read_urban1k(root: str | Path, name: str = "urban1k", kind: str = "long") -> RetrievalBenchmark:
    """Urban1k: ``image/<stem>.jpg`` + ``caption/<stem>.txt`` (first line), sorted by stem."""
    root = Path(root)
    image_dir, caption_dir = _require(name, root / "image"), _require(name, root / "caption")
    images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() == ".jpg"}
    captions = {p.stem: p for p in caption_dir.iterdir() if p.suffix == ".txt"}
    issues = [
        BenchmarkIssue(
            f"image/{images[s].name}", IssueReason.IMAGE_WITHOUT_CAPTION, f"no caption/{s}.txt"
        )
        for s in sorted(set(images) - set(captions))
    ]
    items = []
    for stem in sorted(captions):
        if stem not in images:
            issues.append(BenchmarkIssue(
                f"caption/{stem}.txt", IssueReason.CAPTION_WITHOUT_IMAGE, f"no image/{stem}.jpg"))
            continue
        lines = captions[stem].read_text(encoding="utf-8").splitlines()
        text = lines[0].strip() if lines else ""
        if not text:
            issues.append(BenchmarkIssue(
                f"caption/{stem}.txt", IssueReason.EMPTY_CAPTION, "first line is empty"))
            continue
        items.append((str(images[stem].resolve()), [text]))
    return _pairs(name, kind, items, issues)


# ---------------------------------------------------------------------------------------------
# DCI-long


def read_dci_long(
    root: str | Path, name: str = "dci_long", kind: str = "long", csv_name: str = "dci_long.csv"
) -> RetrievalBenchmark:
    """DCI-long: tab-separated ``dci_long.csv`` (``filepath`` relative to ``root``, ``title``)."""
    root = Path(root)
    path = _require(name, root / csv_name)
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_MINIMAL)
    missing_columns = {"filepath", "title"} - set(frame.columns)
    if missing_columns:
        raise ValueError(
            f"{path}: missing column(s) {sorted(missing_columns)}; found {list(frame.columns)}"
        )
    items, issues = [], []
    for row, (rel, title) in enumerate(zip(frame["filepath"], frame["title"])):
        item = f"{csv_name} row {row + 1}"
        if not _clean(title):
            issues.append(
                BenchmarkIssue(item, IssueReason.EMPTY_CAPTION, f"empty title for {rel!r}")
            )
        elif not (root / rel).is_file():
            issues.append(
                BenchmarkIssue(item, IssueReason.MISSING_IMAGE, f"{root / rel} not found")
            )
        else:
            items.append((str((root / rel).resolve()), [_clean(title)]))
    return _pairs(name, kind, items, issues)


def build_dci_long(
    annotations_dir: str | Path, photos_prefix: str = "photos"
) -> tuple[pd.DataFrame, int]:
    """``dci_long.csv``'s rows from the DCI annotation JSON files (sorted by file name).

    Returns ``(frame with filepath/title, number of records without a long caption)``;
    ``filepath`` is ``<photos_prefix>/<image>``, relative to the DCI root.
    """
    annotations_dir = Path(annotations_dir)
    if not annotations_dir.is_dir():
        raise BenchmarkMissing("dci_long", annotations_dir)
    rows, without_long = [], 0
    for path in sorted(annotations_dir.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or "image" not in record:
            raise ValueError(
                f"{path}: not a DCI annotation "
                "(expected an object with 'image' and 'extra_caption')"
            )
        long_caption = _clean(record.get("extra_caption"))
        if not long_caption:
            without_long += 1
            continue
        rows.append(
            {
                "filepath": f"{photos_prefix}/{record['image']}"
                if photos_prefix
                else record["image"],
                "title": " ".join(long_caption.split()),
            }
        )  # one line per record in the TSV
    return pd.DataFrame(rows, columns=["filepath", "title"]), without_long


# ---------------------------------------------------------------------------------------------
# COCO


def read_coco(
    root: str | Path,
    name: str = "coco",
    kind: str = "short",
    images_dir: str = "val2017",
    annotations: str = "annotations/captions_val2017.json",
    captions_per_image: int = 5,
) -> RetrievalBenchmark:
    """COCO captions: images in ``images[]`` order, the first ``captions_per_image`` per image."""
    root = Path(root)
    ann_path, image_dir = _require(name, root / annotations), _require(name, root / images_dir)
    data = json.loads(ann_path.read_text(encoding="utf-8"))
    by_image: dict[int, list[str]] = defaultdict(list)
    issues = []
    for ann in data["annotations"]:
        text = _clean(ann.get("caption"))
        if not text:
            issues.append(
                BenchmarkIssue(
                    f"annotation {ann.get('id')}",
                    IssueReason.EMPTY_CAPTION,
                    f"image_id {ann['image_id']}",
                )
            )
        elif len(by_image[ann["image_id"]]) < captions_per_image:
            by_image[ann["image_id"]].append(text)
    items = []
    for image in data["images"]:
        path = image_dir / image["file_name"]
        if not by_image.get(image["id"]):
            issues.append(BenchmarkIssue(
                image["file_name"], IssueReason.IMAGE_WITHOUT_CAPTION, f"image id {image['id']}"))
        elif not path.is_file():
            issues.append(
                BenchmarkIssue(image["file_name"], IssueReason.MISSING_IMAGE, f"{path} not found")
            )
        else:
            items.append((str(path.resolve()), by_image[image["id"]]))
    return _pairs(name, kind, items, issues)


# ---------------------------------------------------------------------------------------------
# Flickr30k


def read_flickr30k(
    root: str | Path,
    name: str = "flickr30k",
    kind: str = "short",
    results: str = "results.csv",
    images_dir: str = "flickr30k_images",
    karpathy_json: str | None = None,
    split: str = "test",
) -> RetrievalBenchmark:
    """Flickr30k ``results.csv`` (``|``-separated), images in first-appearance order.

    With ``karpathy_json`` (relative to ``root``) only that split's images are kept.
    """
    root = Path(root)
    csv_path, image_dir = _require(name, root / results), _require(name, root / images_dir)
    keep = None
    if karpathy_json:
        split_data = json.loads(_require(name, root / karpathy_json).read_text(encoding="utf-8"))
        keep = {img["filename"] for img in split_data["images"] if img.get("split") == split}
    by_image: dict[str, list[str]] = {}
    issues = []
    with open(csv_path, encoding="utf-8") as f:
        header = [h.strip() for h in f.readline().split("|")]
        if header != ["image_name", "comment_number", "comment"]:
            raise ValueError(
                f"{csv_path}: header {header}, expected image_name| comment_number| comment"
            )
        for line_no, line in enumerate(f, start=2):
            if not line.strip():
                continue
            fields = [x.strip() for x in line.rstrip("\n").split("|", 2)]
            item = f"{results} line {line_no}"
            if len(fields) != 3:
                detail = f"{len(fields)} fields: {line.strip()[:80]!r}"
                issues.append(BenchmarkIssue(item, IssueReason.MALFORMED_ROW, detail))
                continue
            image, _, comment = fields
            if keep is not None and image not in keep:
                continue
            texts = by_image.setdefault(image, [])
            if comment:
                texts.append(comment)
            else:
                issues.append(BenchmarkIssue(item, IssueReason.EMPTY_CAPTION, f"image {image}"))
    items = []
    for image, texts in by_image.items():
        path = image_dir / image
        if not path.is_file():
            detail = f"{path} not found ({len(texts)} captions)"
            issues.append(BenchmarkIssue(image, IssueReason.MISSING_IMAGE, detail))
        elif texts:
            items.append((str(path.resolve()), texts))
        else:
            issues.append(BenchmarkIssue(
                image, IssueReason.IMAGE_WITHOUT_CAPTION, "all its captions are empty"))
    if keep is not None and (absent := len(keep - set(by_image))):
        logger.warning("%s: %d %s-split images of %s have no row in %s",
                       name, absent, split, karpathy_json, results)
    return _pairs(name, kind, items, issues)


# ---------------------------------------------------------------------------------------------
# A captions table (a user's own benchmark)


def read_table(root: str | Path, name: str = "table", kind: str = "long",
               captions: str = "captions.csv", image_column: str = "image",
               caption_column: str = "caption") -> RetrievalBenchmark:
    """``captions`` (a table file relative to ``root``, or absolute): one row per caption, its
    image relative to ``root``; images in order of first appearance."""
    root = Path(root)
    path = _require(name, root / captions)
    by_image: dict[str, list[str]] = {}
    issues = []
    needed = {f"evaluate.benchmarks.{name}.image_column": image_column,
              f"evaluate.benchmarks.{name}.caption_column": caption_column}
    for index, row in iter_table_rows(path, needed):
        item = f"{Path(captions).name} record {index}"
        if isinstance(row, MalformedRow):
            issues.append(BenchmarkIssue(item, IssueReason.MALFORMED_ROW, row.describe()))
            continue
        image, caption = row[image_column], row[caption_column]
        relative = check_image_path(image) if isinstance(image, str) and image.strip() else None
        if relative is None:
            issues.append(BenchmarkIssue(item, IssueReason.UNSAFE_IMAGE_PATH if image else
                                         IssueReason.MISSING_IMAGE,
                                         f"{image_column} {image!r} is empty, absolute or "
                                         "escapes the root"))
        elif not isinstance(caption, str) or not caption.strip():
            issues.append(BenchmarkIssue(item, IssueReason.EMPTY_CAPTION,
                                         f"{caption_column} {caption!r:.60} is not a text"))
        else:
            by_image.setdefault(relative, []).append(caption.strip())
    items = []
    for relative, texts in by_image.items():
        if not (root / relative).is_file():
            issues.append(BenchmarkIssue(relative, IssueReason.MISSING_IMAGE,
                                         f"{root / relative} not found ({len(texts)} captions)"))
        else:
            items.append((str((root / relative).resolve()), texts))
    return _pairs(name, kind, items, issues)


# ---------------------------------------------------------------------------------------------
# ShareGPT4V-1k


def read_sharegpt4v(
    val_captions: pd.DataFrame,
    images: ImageSource | str | Path,
    name: str = "sharegpt4v_1k",
    kind: str = "long",
    n: int = 1000,
) -> RetrievalBenchmark:
    """The first ``n`` records of ``val_captions`` (columns ``id``, ``image``, ``caption``), their
    images from ``images`` (an image source; a path means the original files under it)."""
    source = as_image_source(images)
    if isinstance(source, FolderImages) and not source.root.is_dir():
        raise BenchmarkMissing(name, source.root)
    if len(val_captions) < n:
        logger.warning("%s: val_captions has %d records, fewer than %d", name, len(val_captions), n)
    head = val_captions[["id", "image", "caption"]].head(n)
    handles = source.locate(head["id"].astype(str).tolist(), head["image"].astype(str).tolist())
    items, kept, issues = [], [], []
    for (rec_id, image, caption), handle in zip(head.itertuples(index=False), handles):
        if not _clean(caption):
            issues.append(BenchmarkIssue(str(rec_id), IssueReason.EMPTY_CAPTION, f"image {image}"))
        elif handle is None:
            issues.append(BenchmarkIssue(str(rec_id), IssueReason.MISSING_IMAGE,
                                         f"{image} left out by prepare_images (rejected_images)"))
        elif not source.exists(handle):
            issues.append(BenchmarkIssue(str(rec_id), IssueReason.MISSING_IMAGE,
                                         f"{source.describe(handle)} not found"))
        else:
            items.append((source.describe(handle), [_clean(caption)]))
            kept.append(handle)
    bench = _pairs(name, kind, items, issues)
    bench.image_source, bench.image_handles = source, kept
    return bench


# Benchmarks read from files under a root folder, by ``format`` (ShareGPT4V reads val_captions).
READERS = {
    "urban1k": read_urban1k,
    "dci_long": read_dci_long,
    "coco": read_coco,
    "flickr30k": read_flickr30k,
    "table": read_table,
}
