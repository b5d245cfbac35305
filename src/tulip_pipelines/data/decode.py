"""Decoding an image file (PIL only, no heavy imports: ingest's check processes and the image
writer processes of prepare_images use it too)."""

from __future__ import annotations

import os
from typing import IO

from PIL import Image


def open_image_file(path: str | os.PathLike | IO[bytes],
                    min_size: int | None = None) -> Image.Image:
    """The decoded RGB image at ``path``. With ``min_size`` a JPEG is decoded in draft mode at
    the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= ``min_size``: what a
    preprocess that resizes the shortest side to ``min_size`` needs, at a fraction of the work.
    Every coefficient is still read, so a truncated or corrupt file fails."""
    with Image.open(path) as image:
        if min_size and image.format == "JPEG":
            image.draft("RGB", (min_size, min_size))
        return image.convert("RGB")
