"""Where training and evaluation read images from: an *image source* (no Kedro).

Two sources, one interface (:class:`ImageSource`):

* :class:`FolderImages`: the original files under the image root, decoded with JPEG draft mode
  (``Image.draft``) to the smallest scale that still covers the size the model needs;
* :class:`PreparedImages`: the WebDataset tar shards written by ``prepare_images``
  (``data/prepare.py``), read by index through ``wids``.

A source first *locates* records (``id`` + ``image`` path): one handle per record, ``None`` where
the source has left the record out (an image quarantined by ``prepare_images``); then ``open``
returns a handle's image as a decoded RGB ``PIL.Image``. Every image read of training and
evaluation goes through :meth:`ImageSource.open`. A source is described by a small JSON dict
(:meth:`ImageSource.to_dict`, :func:`image_source_from_dict`): what the ``prepared_images``
catalog entry stores and what the multi-process launcher hands to every rank.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tarfile
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
from PIL import Image

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"  # the wids shard index
RECORDS_FILE = "records.parquet"  # id, image, split, row, position, sample (-1: left out), reason


# the ``skipped_samples`` table: an image that could not be read when training or evaluating
SKIPPED_COLUMNS = ["stage", "split", "step", "record_id", "path", "error"]


class StaleImagesError(RuntimeError):
    """The prepared images do not match the caption tables being read."""


def preprocess_size(preprocess: Callable | None) -> int | None:
    """The largest side a preprocess resizes or crops to (open_clip's ``Resize``/``CenterCrop``),
    or ``None`` when it cannot be told (then images are decoded at full size)."""
    for transform in getattr(preprocess, "transforms", ()):
        size = getattr(transform, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, (tuple, list)) and size and all(isinstance(s, int) for s in size):
            return max(size)
    return None


class ImageSource(ABC):
    """Images of caption records, by handle (see the module docstring)."""

    kind: str = ""

    @abstractmethod
    def locate(self, ids: Sequence[str], images: Sequence[str]) -> list[Any]:
        """One handle per record (``ids[i]``, ``images[i]``), ``None`` for a record the source
        left out. Raises :class:`StaleImagesError` for a record the source never saw."""

    @abstractmethod
    def open(self, handle: Any, min_size: int | None = None) -> Image.Image:
        """The image of ``handle``, decoded, RGB; at least ``min_size`` on its shortest side
        when the stored image is (the original file or prepared copy may be smaller)."""

    @abstractmethod
    def describe(self, handle: Any) -> str:
        """Where ``handle``'s image is, for messages."""

    def exists(self, handle: Any) -> bool:
        """Whether ``handle``'s image is there (without decoding it)."""
        return True

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON description; :func:`image_source_from_dict` builds the source again."""

    def resolved(self) -> "ImageSource":
        """The same source with absolute paths (for processes started elsewhere)."""
        return self


class FolderImages(ImageSource):
    """The original image files: ``root / image`` (no file is touched until it is opened), JPEGs
    decoded in draft mode at the size asked for unless ``draft`` is false (every pixel, as the
    originals decode)."""

    kind = "folder"

    def __init__(self, root: str | os.PathLike, draft: bool = True):
        self.root = Path(root)
        self.draft = draft

    def locate(self, ids: Sequence[str], images: Sequence[str]) -> list[str]:
        return [str(image) for image in images]

    def open(self, handle: str, min_size: int | None = None) -> Image.Image:
        return open_image_file(self.root / handle, min_size if self.draft else None)

    def describe(self, handle: str) -> str:
        return str(self.root / handle)

    def exists(self, handle: str) -> bool:
        return image_file_exists(self.root / handle)  # a file, or a member of a tar under root

    def to_dict(self) -> dict[str, Any]:
        # draft only when false: the fingerprints of runs made before the switch stay the same
        extra = {} if self.draft else {"draft": False}
        return {"kind": self.kind, "root": str(self.root), **extra}

    def resolved(self) -> "FolderImages":
        return FolderImages(self.root.resolve(), self.draft)

    def __repr__(self) -> str:
        return f"FolderImages({str(self.root)!r}{'' if self.draft else ', draft=False'})"


class PreparedImages(ImageSource):
    """The shards of ``prepare_images`` under ``folder``: ``index.json`` (wids), ``shards/*.tar``
    and ``records.parquet`` (record id -> sample number in the index's order).

    The wids reader is opened lazily in each process that reads (a DataLoader worker opens its
    own; an opened reader holds file handles and cannot be pickled) and keeps every shard open
    (``lru_size`` = number of shards), so a globally shuffled order never re-indexes a shard.
    Each read checks the sample's key against the records table, so shards replaced after the
    index was written are an error, not a silently wrong image.
    """

    kind = "prepared"

    def __init__(self, folder: str | os.PathLike, info: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.info = dict(info or {})  # what the preparation wrote (size, counts), for people
        self._reader = None
        self._reader_pid = 0  # the process that opened it (a forked worker opens its own)
        self._positions: np.ndarray | None = None  # sample -> position (the key written)

    # -- locating ---------------------------------------------------------------------------

    def records(self, columns: list[str] | None = None) -> pd.DataFrame:
        path = self.folder / RECORDS_FILE
        if not path.is_file():
            raise StaleImagesError(
                f"{path} not found: the image preparation under {self.folder} is incomplete; "
                "run the prepare_images pipeline")
        return pd.read_parquet(path, columns=columns)

    def locate(self, ids: Sequence[str], images: Sequence[str]) -> list[int | None]:
        table = self.records(["id", "image", "sample"])
        where = pd.Series(np.arange(len(table)), index=table["id"].to_numpy())
        rows = where.reindex(pd.Index([str(i) for i in ids])).to_numpy()
        unknown = np.flatnonzero(pd.isna(rows))
        if len(unknown):
            i = int(unknown[0])
            raise StaleImagesError(
                f"{len(unknown)} record(s) are not in the prepared images under {self.folder}, "
                f"e.g. id {ids[i]!r} (image {images[i]!r}): they were prepared from other "
                "caption tables; run the prepare_images pipeline again")
        rows = rows.astype(np.int64)
        prepared_images = table["image"].to_numpy()[rows]
        changed = np.flatnonzero(prepared_images != np.asarray(images, dtype=object))
        if len(changed):
            i = int(changed[0])
            raise StaleImagesError(
                f"record {ids[i]!r}: image {images[i]!r}, but the prepared images under "
                f"{self.folder} hold {prepared_images[i]!r} for it; run prepare_images again")
        samples = table["sample"].to_numpy()[rows]
        return [int(s) if s >= 0 else None for s in samples]

    # -- reading ----------------------------------------------------------------------------

    def _open_reader(self):
        import wids  # imports torch; only where prepared images are read

        index = self.folder / INDEX_FILE
        if not index.is_file():
            raise StaleImagesError(f"{index} not found: run the prepare_images pipeline")
        n_shards = len(json.loads(index.read_text())["shardlist"])
        table = self.records(["position", "sample"])
        kept = table[table["sample"] >= 0].sort_values("sample")
        self._positions = kept["position"].to_numpy(np.int64)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # lru_size > 200 warns about file descriptors
            reader = wids.ShardListDataset(str(index), lru_size=max(n_shards, 1),
                                           localname=_shard_localname(self.folder),
                                           transformations=[])
        reader.check_cache_misses = lambda: None  # every shard stays open: misses are first reads
        return reader

    def open(self, handle: int, min_size: int | None = None) -> Image.Image:
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader, self._reader_pid = self._open_reader(), os.getpid()
        sample = self._reader[handle]
        expected = f"{int(self._positions[handle]):09d}"
        if sample["__key__"] != expected:
            raise StaleImagesError(
                f"{sample['__shard__']}: sample {handle} has key {sample['__key__']!r}, expected "
                f"{expected!r}: the shards changed after {self.folder / INDEX_FILE} was written; "
                "run prepare_images again")
        return open_image_file(sample[".jpg"], min_size)

    def describe(self, handle: int) -> str:
        return f"{self.folder / INDEX_FILE} sample {handle}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "folder": str(self.folder), **self.info}

    def resolved(self) -> "PreparedImages":
        return PreparedImages(self.folder.resolve(), self.info)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = None

    def __getstate__(self) -> dict[str, Any]:  # open readers stay in their process
        return {**self.__dict__, "_reader": None, "_positions": None}

    def __repr__(self) -> str:
        return f"PreparedImages({str(self.folder)!r})"


def _shard_localname(folder: Path) -> Callable[[str], str]:
    """wids' ``localname``: read the shards in place (no copy into its cache). wids takes a
    ``<shard>.lock`` file beside the local name, so for a read-only folder the name is a symlink
    in a writable temporary folder."""
    if os.access(folder / "shards", os.W_OK):
        return _same_name
    return _LinkIn(tempfile.mkdtemp(prefix="tulip_shards_"))


def _same_name(url: str) -> str:
    return url


class _LinkIn:
    def __init__(self, directory: str):
        self.directory = Path(directory)

    def __call__(self, url: str) -> str:
        link = self.directory / Path(url).name
        if not link.exists():
            link.symlink_to(Path(url).resolve())
        return str(link)


def image_source_from_dict(data: dict[str, Any]) -> ImageSource:
    """The source a :meth:`ImageSource.to_dict` describes."""
    kind = data.get("kind")
    if kind == FolderImages.kind:
        return FolderImages(data["root"], data.get("draft", True))
    if kind == PreparedImages.kind:
        return PreparedImages(data["folder"],
                              {k: v for k, v in data.items() if k not in ("kind", "folder")})
    raise ValueError(f"unknown image source kind {kind!r} in {data!r}; expected "
                     f"{FolderImages.kind!r} or {PreparedImages.kind!r}")


def as_image_source(images: ImageSource | str | os.PathLike) -> ImageSource:
    """A source as it is; a folder path as :class:`FolderImages`."""
    return images if isinstance(images, ImageSource) else FolderImages(images)


# Decoding one image file (PIL only): a file on disk or a member of a WebDataset tar

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
