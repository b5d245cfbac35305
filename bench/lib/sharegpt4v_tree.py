"""A generated tree in the real-scale layouts, for running ``--env sharegpt4v`` end to end without
the data: ShareGPT4V's annotation JSON with its COCO and SAM image folders (JPEGs of the real
sizes: 640x480 and 1500x2250), Urban1k, COCO val2017 and Flickr30k (with Karpathy's split) under
a benchmarks root, and a teacher weights file (an open_clip state dict of random weights). DCI is
left out (the evaluation skips a missing benchmark with a log line). Captions are long, several
sentences, each naming the record, so that every benchmark has one right answer per query."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

ANNOTATIONS = "share-captioner_coco_lcs_sam_1246k_1107.json"
WORDS = ("red", "green", "blue", "small", "large", "striped", "round", "square", "bright", "dark",
         "wooden", "metal", "left", "right", "above", "below")


def write_photo(path: Path, size: tuple[int, int], seed: int) -> None:
    """A smooth random image (compresses like a photo, not like noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(path, quality=90)


def long_caption(rng: random.Random, n: int, sentences: int = 8) -> str:
    """A long caption: record ``n`` named first, then sentences of random detail."""
    first = f"Photograph number {n} shows a {rng.choice(WORDS)} scene."
    rest = [f"There is a {rng.choice(WORDS)} {rng.choice(WORDS)} object "
            f"{rng.choice(WORDS)} of a {rng.choice(WORDS)} one, item {n}."
            for _ in range(sentences)]
    return " ".join([first, *rest])


def write_tree(root: str | Path, records: int = 300, sam_share: float = 0.25,
               benchmark_images: int = 40, seed: int = 0) -> dict[str, Path]:
    """Write the tree under ``root``; returns its ``sharegpt4v_root`` and ``benchmarks_root``."""
    root, rng = Path(root), random.Random(seed)
    data, bench = root / "ShareGPT4V" / "data", root / "benchmarks"
    items = []
    for n in range(records):
        sam = n < records * sam_share
        image = f"sam/images/sa_{n}.jpg" if sam else f"coco/train2017/{n:012d}.jpg"
        write_photo(data / image, (1500, 2250) if sam else (640, 480), seed + n)
        items.append({"id": f"rec{n}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"},
            {"from": "gpt", "value": long_caption(rng, n)}]})
    (data / ANNOTATIONS).write_text(json.dumps(items))

    urban = bench / "Urban1k"
    coco_images, coco_annotations = [], []
    flickr_lines, karpathy = ["image_name| comment_number| comment"], []
    for n in range(benchmark_images):
        write_photo(urban / "image" / f"{n}.jpg", (640, 480), 10_000 + n)
        (urban / "caption").mkdir(parents=True, exist_ok=True)
        (urban / "caption" / f"{n}.txt").write_text(long_caption(rng, n, 10) + "\n")
        write_photo(bench / "coco" / "val2017" / f"{n:012d}.jpg", (640, 480), 20_000 + n)
        coco_images.append({"id": n, "file_name": f"{n:012d}.jpg"})
        coco_annotations += [{"id": 5 * n + k, "image_id": n,
                              "caption": f"A photo of item {n}, view {k}."} for k in range(5)]
        write_photo(bench / "flickr30k" / "flickr30k_images" / f"{n}.jpg", (500, 375), 30_000 + n)
        flickr_lines += [f"{n}.jpg| {k}| A picture of thing {n} , take {k} ." for k in range(5)]
        karpathy.append({"filename": f"{n}.jpg", "split": "test" if n % 2 else "train"})
    (bench / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
    (bench / "coco" / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"images": coco_images, "annotations": coco_annotations}))
    (bench / "flickr30k" / "results.csv").write_text("\n".join(flickr_lines) + "\n")
    (bench / "flickr30k" / "dataset_flickr30k.json").write_text(json.dumps({"images": karpathy}))
    return {"sharegpt4v_root": data, "benchmarks_root": bench}


def write_teacher_weights(path: str | Path, model_name: str, seed: int = 0) -> Path:
    """Random weights of ``model_name`` as an open_clip state dict (safetensors), the format a
    user's own weights file can have."""
    import torch
    from safetensors.torch import save_file

    from tulip_pipelines.models import create_teacher

    torch.manual_seed(seed)
    model = create_teacher(model_name).model
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
