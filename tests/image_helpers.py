"""Images whose colour names their record, so that a test can tell which record it read."""

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def colour(i: int) -> tuple[int, int, int]:
    """A colour per record that survives JPEG (uniform blocks): channels 8 levels apart."""
    return (8 * (i % 32), 8 * (i // 32 % 32), 200)


def write_images(root: Path, n: int) -> pd.DataFrame:
    """``n`` uniform JPEGs under ``root/sub``, 40x60 and 60x40 in turn; their captions table."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = (60, 40) if i % 2 else (40, 60)
        Image.new("RGB", size, colour(i)).save(root / "sub" / f"{i}.jpg", quality=95)
    return pd.DataFrame({"id": [f"rec-{i}" for i in range(n)],
                         "image": [f"sub/{i}.jpg" for i in range(n)],
                         "caption": [f"Caption of record {i}. More words." for i in range(n)]})


def decode_index(pixels) -> int:
    """The record number of an image (PIL) or an image tensor / array [..., H, W, 3] or
    [3, H, W] with values 0-255."""
    array = np.asarray(pixels, dtype=np.float64)
    if array.shape[0] == 3 and array.shape[-1] != 3:
        array = np.moveaxis(array, 0, -1)
    r, g, _ = array.reshape(-1, 3).mean(axis=0)
    return int(round(r / 8)) + 32 * int(round(g / 8))
