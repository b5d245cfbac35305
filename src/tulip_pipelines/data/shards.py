"""One shard of prepared images: decode, resize, re-encode as JPEG and write a WebDataset tar
(no Kedro). What a worker process of ``prepare_images`` runs (``data/prepare.py`` plans).

A shard is written under a temporary name and renamed when complete; its manifest (``.json``
beside the tar: the inputs' cache key, the samples kept and the images left out with their
reason) is renamed last, so a shard whose manifest exists and matches is complete. Samples are
named by the record's *position* in the preparation's input order (``000001234.jpg`` +
``000001234.json``), so a reader can check that it got the sample it asked for.
"""

from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from PIL import Image

from tulip_pipelines.data.images import open_image_file
from tulip_pipelines.data.paths import check_image_path

SHARD_PATTERN = "images-{:06d}"
PARTIAL = ".partial"


class ImageReason(str, Enum):
    """Why ``prepare_images`` left an image out (the ``reason`` of ``rejected_images``)."""

    IMAGE_NOT_FOUND = "image_not_found"
    UNREADABLE_IMAGE = "unreadable_image"
    UNSAFE_IMAGE_PATH = "unsafe_image_path"


@dataclass(frozen=True)
class Encoding:
    """How images are stored: shortest side ``size`` (never upscaled), JPEG ``quality`` and
    chroma ``subsampling`` (``"4:4:4"`` keeps full colour resolution). ``draft``: JPEGs are
    decoded in draft mode at the smallest DCT scale that still covers ``size`` (fast); false
    decodes every pixel as the originals do."""

    size: int
    quality: int
    subsampling: str
    draft: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The settings (``draft`` only when false: shards written before the switch keep their
        cache keys)."""
        out = asdict(self)
        if self.draft:
            del out["draft"]
        return out


@dataclass
class ShardTask:
    """Shard ``number``: the records at positions ``first_position``, ``first_position + 1``, ...
    of the input order, with their ``ids`` and ``images`` (relative to ``root``)."""

    number: int
    first_position: int
    ids: list[str]
    images: list[str]
    root: str
    folder: str
    encoding: Encoding
    cache_key: str

    @property
    def tar_path(self) -> Path:
        return shard_path(self.folder, self.number, ".tar")

    @property
    def manifest_path(self) -> Path:
        return shard_path(self.folder, self.number, ".json")


@dataclass
class ShardResult:
    """A complete shard: ``kept`` positions in sample order, ``rejected`` as
    ``[position, reason, detail]``, and the tar's size."""

    number: int
    cache_key: str
    kept: list[int] = field(default_factory=list)
    rejected: list[list[Any]] = field(default_factory=list)
    filesize: int = 0

    @property
    def nsamples(self) -> int:
        return len(self.kept)


def shard_path(folder: str | os.PathLike, number: int, suffix: str) -> Path:
    return Path(folder) / (SHARD_PATTERN.format(number) + suffix)


def encode_image(path: Path, encoding: Encoding) -> bytes:
    """The image at ``path`` as JPEG bytes, its shortest side resized to ``encoding.size``
    (aspect kept; a smaller image keeps its size). JPEGs are decoded in draft mode first unless
    ``encoding.draft`` is false."""
    # decodes every coefficient either way: a broken file fails here
    rgb = open_image_file(path, encoding.size if encoding.draft else None)
    width, height = rgb.size
    short = min(width, height)
    if short > encoding.size:
        scale = encoding.size / short
        rgb = rgb.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                         Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=encoding.quality, subsampling=encoding.subsampling)
    return out.getvalue()


def read_image(root: Path, image: str, encoding: Encoding) -> tuple[bytes | None, str, str]:
    """``(jpeg, "", "")``, or ``(None, reason, detail)`` for an image that cannot be prepared."""
    relative = check_image_path(image)
    if relative is None:
        return None, ImageReason.UNSAFE_IMAGE_PATH.value, (
            f"image {image!r} is absolute or escapes the image root")
    path = root / relative
    try:
        return encode_image(path, encoding), "", ""
    except FileNotFoundError:
        return None, ImageReason.IMAGE_NOT_FOUND.value, f"{path} not found"
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for a corrupt file
        return None, ImageReason.UNREADABLE_IMAGE.value, f"{path}: {type(err).__name__}: {err}"


def tar_writer() -> type:
    """webdataset's ``TarWriter``. webdataset imports torch when it can; a writer process has no
    use for it, so where torch is not loaded yet it is hidden during that import (a writer then
    takes ~60 MB instead of ~400 MB)."""
    if "torch" in sys.modules:
        from webdataset import TarWriter
        return TarWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` -> ImportError
    try:
        from webdataset import TarWriter
    finally:
        del sys.modules["torch"]
    return TarWriter


def write_shard(task: ShardTask) -> ShardResult:
    """Write shard ``task.number`` (temporary names, renamed when complete); its result."""
    result = ShardResult(task.number, task.cache_key)
    root = Path(task.root)
    tar_tmp = task.tar_path.with_name(task.tar_path.name + PARTIAL)
    with open(tar_tmp, "wb") as stream:
        with tar_writer()(stream, mtime=0, user="tulip", group="tulip") as writer:
            for offset, (record_id, image) in enumerate(zip(task.ids, task.images)):
                position = task.first_position + offset
                jpeg, reason, detail = read_image(root, image, task.encoding)
                if jpeg is None:
                    result.rejected.append([position, reason, detail])
                    continue
                meta = {"id": record_id, "image": image}
                writer.write({"__key__": f"{position:09d}", "jpg": jpeg,
                              "json": json.dumps(meta).encode()})
                result.kept.append(position)
        stream.flush()
        os.fsync(stream.fileno())
    result.filesize = tar_tmp.stat().st_size
    os.replace(tar_tmp, task.tar_path)
    manifest_tmp = task.manifest_path.with_name(task.manifest_path.name + PARTIAL)
    manifest_tmp.write_text(json.dumps(asdict(result)))
    os.replace(manifest_tmp, task.manifest_path)
    return result


def complete_shard(task: ShardTask) -> ShardResult | None:
    """The result of an earlier run's shard ``task.number`` if it is complete and was written
    from the same inputs and encoding; ``None`` otherwise."""
    try:
        data = json.loads(task.manifest_path.read_text())
        if "fingerprint" in data:  # a shard written before "fingerprint" became "cache_key"
            data["cache_key"] = data.pop("fingerprint")
        result = ShardResult(**data)
        size = task.tar_path.stat().st_size
    except (OSError, ValueError, TypeError):
        return None
    if result.cache_key != task.cache_key or result.filesize != size:
        return None
    return result
