"""Readers of the retrieval benchmarks, each for the benchmark's own on-disk layout.

Every reader returns a :class:`RetrievalBenchmark`; entries that cannot be used (an image without
caption, a caption whose image is missing, an empty caption) are listed in ``issues`` with the
reason, never dropped silently. A benchmark whose files are absent raises
:class:`BenchmarkMissing` naming the path, and the evaluation skips it with that message.

Layouts:
- ``urban1k``: ``<root>/image/<name>.jpg`` and ``<root>/caption/<name>.txt`` (first line).
- ``flickr30k``: ``<root>/results.csv`` (``|``-separated: image_name, comment_number, comment) and
  ``<root>/flickr30k_images/``; optionally only the Karpathy split's images
  (``dataset_flickr30k.json``: ``images[].filename``, ``split``).
- ``coco``: ``<root>/annotations/captions_val2017.json`` and ``<root>/val2017/``; the first
  ``captions_per_image`` captions of each image in annotation order.
- ``dci_long``: ``<root>/dci_long.csv``, tab-separated, columns ``filepath`` (relative to root)
  and ``title`` (the long caption), as TULIP's evaluation prepares it.
- ``sharegpt4v``: the first ``n`` records of a captions table (our ``val_captions``).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class BenchmarkMissing(FileNotFoundError):
    """The benchmark's files are not where the configuration says."""


@dataclass
class RetrievalBenchmark:
    name: str
    image_paths: list[Path]
    texts: list[str]
    text_to_image: list[int]
    issues: list[tuple[str, str]] = field(default_factory=list)  # (entry, reason)

    def __post_init__(self):
        if not self.image_paths or not self.texts:
            raise ValueError(f"benchmark {self.name}: no usable image-text pairs ({len(self.issues)} issues)")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise BenchmarkMissing(f"{what} not found at {path}")
    return path


def _from_pairs(name: str, pairs: dict[Path, list[str]], issues: list) -> RetrievalBenchmark:
    images, texts, links = [], [], []
    for path, captions in pairs.items():
        if not path.is_file():
            issues.append((str(path), "image file missing"))
            continue
        kept = [c.strip() for c in captions if c and c.strip()]
        if len(kept) < len(captions):
            issues.append((str(path), f"{len(captions) - len(kept)} empty caption(s)"))
        if not kept:
            continue
        images.append(path)
        for caption in kept:
            texts.append(caption)
            links.append(len(images) - 1)
    return RetrievalBenchmark(name, images, texts, links, issues)


def read_urban1k(root: str | Path, name: str = "urban1k") -> RetrievalBenchmark:
    root = Path(root)
    image_dir, caption_dir = _require(root / "image", "Urban1k images"), _require(root / "caption", "Urban1k captions")
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    captions = {p.stem: p for p in sorted(caption_dir.glob("*.txt"))}
    issues = [(str(images[s]), "image without caption file") for s in sorted(set(images) - set(captions))]
    pairs = {}
    for stem in sorted(captions):
        lines = captions[stem].read_text(encoding="utf-8").splitlines()
        pairs[images.get(stem, image_dir / f"{stem}.jpg")] = [lines[0] if lines else ""]
    return _from_pairs(name, pairs, issues)


def read_flickr30k(root: str | Path, karpathy_json: str | Path | None = None, split: str = "test",
                   name: str = "flickr30k") -> RetrievalBenchmark:
    root = Path(root)
    results = _require(root / "results.csv", "Flickr30k results.csv")
    image_dir = root / "flickr30k_images"
    keep = None
    if karpathy_json:
        data = json.loads(_require(Path(karpathy_json), "Karpathy split JSON").read_text())
        keep = {im["filename"] for im in data["images"] if im.get("split") == split}
    pairs: dict[Path, list[str]] = defaultdict(list)
    issues = []
    with results.open(encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="|")
        header = [h.strip() for h in next(reader)]
        if header[:3] != ["image_name", "comment_number", "comment"]:
            raise ValueError(f"{results}: expected header 'image_name| comment_number| comment', got {header}")
        for line_no, row in enumerate(reader, start=2):
            if len(row) < 3:
                issues.append((f"{results}:{line_no}", "row without three '|'-separated fields"))
                continue
            image = row[0].strip()
            if keep is None or image in keep:
                pairs[image_dir / image].append("|".join(row[2:]).strip())
    return _from_pairs(name, dict(pairs), issues)


def read_coco(root: str | Path, captions_per_image: int = 5, name: str = "coco") -> RetrievalBenchmark:
    root = Path(root)
    ann = json.loads(_require(root / "annotations" / "captions_val2017.json", "COCO captions").read_text())
    files = {im["id"]: root / "val2017" / im["file_name"] for im in ann["images"]}
    pairs: dict[Path, list[str]] = {path: [] for path in files.values()}
    for a in ann["annotations"]:
        captions = pairs[files[a["image_id"]]]
        if len(captions) < captions_per_image:
            captions.append(a["caption"])
    return _from_pairs(name, pairs, [])


def read_dci_long(root: str | Path, name: str = "dci_long") -> RetrievalBenchmark:
    root = Path(root)
    table = pd.read_csv(_require(root / "dci_long.csv", "DCI-long dci_long.csv"), sep="\t")
    missing = {"filepath", "title"} - set(table.columns)
    if missing:
        raise ValueError(f"{root / 'dci_long.csv'}: missing column(s) {sorted(missing)}")
    pairs = {root / str(r.filepath): [str(r.title) if pd.notna(r.title) else ""] for r in table.itertuples()}
    return _from_pairs(name, pairs, [])


def read_sharegpt4v(captions: pd.DataFrame, image_root: str | Path, n: int = 1000,
                    name: str = "sharegpt4v_1k") -> RetrievalBenchmark:
    if captions is None or captions.empty:
        raise BenchmarkMissing("no validation captions (run the split pipeline)")
    head = captions.head(n)
    pairs = {Path(image_root) / p: [c] for p, c in zip(head["image"], head["caption"])}
    return _from_pairs(name, pairs, [])


READERS = {"urban1k": read_urban1k, "flickr30k": read_flickr30k, "coco": read_coco, "dci_long": read_dci_long}
