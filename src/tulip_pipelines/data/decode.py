"""Decoding an image file (PIL only, no heavy imports: ingest's check processes and the image
writer processes of prepare_images use it too).

An image path may lead into a tar file: ``<folder>/<shard>.tar/<member>`` names the member
``<member>`` of the tar ``<folder>/<shard>.tar`` (how ingest names the images of WebDataset
shards, ``ingest.format: webdataset``). The member is read in place, without unpacking: each
process indexes a tar's members once (their data offsets, one pass over the headers) and then
seeks to the member it needs.
"""

from __future__ import annotations

import io
import os
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import IO

from PIL import Image

TAR_SUFFIX = ".tar"


def split_tar_member(path: str | os.PathLike) -> tuple[Path, str] | None:
    """``(tar file, member name)`` when ``path`` leads into an existing ``.tar`` file, else
    ``None``."""
    parts = Path(path).parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1].endswith(TAR_SUFFIX):
            tar = Path(*parts[:i])
            if tar.is_file():
                return tar, "/".join(parts[i:])
    return None


@lru_cache(maxsize=64)
def _tar_index(tar: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) of the regular files of ``tar`` (a header pass)."""
    with tarfile.open(tar, "r:") as archive:
        return {m.name: (m.offset_data, m.size) for m in archive if m.isreg()}


def read_tar_member(tar: str | os.PathLike, member: str) -> bytes:
    """The bytes of ``member`` of the tar file ``tar`` (``FileNotFoundError`` when absent)."""
    stat = os.stat(tar)
    index = _tar_index(str(tar), stat.st_mtime_ns, stat.st_size)
    if member not in index:
        raise FileNotFoundError(f"{tar} has no member {member!r}")
    offset, size = index[member]
    with open(tar, "rb") as f:
        f.seek(offset)
        return f.read(size)


def open_image_file(path: str | os.PathLike | IO[bytes],
                    min_size: int | None = None) -> Image.Image:
    """The decoded RGB image at ``path`` (a file, a member of a tar file as in the module
    docstring, or a binary stream). With ``min_size`` a JPEG is decoded in draft mode at
    the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= ``min_size``: what a
    preprocess that resizes the shortest side to ``min_size`` needs, at a fraction of the work.
    Every coefficient is still read, so a truncated or corrupt file fails."""
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        inside = split_tar_member(path)
        if inside is not None:
            path = io.BytesIO(read_tar_member(*inside))
    with Image.open(path) as image:
        if min_size and image.format == "JPEG":
            image.draft("RGB", (min_size, min_size))
        return image.convert("RGB")


def image_file_exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file, or a member of a tar file (module docstring)."""
    if os.path.isfile(path):
        return True
    inside = split_tar_member(path)
    if inside is None:
        return False
    stat = os.stat(inside[0])
    return inside[1] in _tar_index(str(inside[0]), stat.st_mtime_ns, stat.st_size)
