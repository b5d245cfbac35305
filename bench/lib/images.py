"""Photo-like JPEGs for the data benchmarks (``data_path.py``, ``prepare_images.py``).

Smooth colour fields with edges and grain, so that a 1500x2250 image compresses to several
hundred KB at quality 90 as ShareGPT4V's SAM photos do (a flat image would decode faster than a
real photo and flatter every path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SIZES = {"large": (1500, 2250), "small": (640, 480)}  # (width, height): SAM-like, COCO-like


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (max(height // 150, 2), max(width // 150, 2), 3), dtype=np.uint8)
    base = Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)
    edges = Image.fromarray(rng.integers(0, 256, (height // 24, width // 24, 3), dtype=np.uint8))
    edges = edges.resize((width, height), Image.Resampling.NEAREST).filter(ImageFilter.BLUR)
    mixed = np.asarray(Image.blend(base, edges, 0.35), dtype=np.int16)
    grain = rng.normal(0, 4, (height, width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(mixed + grain, 0, 255).astype(np.uint8))


def write_photos(folder: Path, kind: str, n: int, quality: int = 90) -> list[str]:
    """``n`` JPEGs of ``kind`` (``large`` / ``small``) under ``folder/kind``; their relative
    paths (existing files are kept)."""
    width, height = SIZES[kind]
    (folder / kind).mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{kind}/{i:05d}.jpg"
        if not (folder / name).is_file():
            seed = 2 * i + (kind == "large")
            photo(width, height, seed).save(folder / name, quality=quality)
        names.append(name)
    return names
