"""WebDataset tar shards as ingest input (``ingest.format: webdataset``; no Kedro).

A shard holds samples as consecutive members named ``<key>.<extension>``: an image
(``.jpg``, ``.jpeg``, ``.png``, ``.webp``) and a caption (``.txt``: the text; ``.json``: an object
whose ``ingest.columns.caption`` field is the caption, or a JSON string). webdataset's own tar
iteration and key grouping (``webdataset.tariterators``) read the shards as a stream.

Each sample becomes one record ``{"id": key, "image": "<shard>/<member>", "caption": ...}`` where
``<shard>`` is the tar's path relative to the image root: the image is named *inside* the tar
(:mod:`tulip_pipelines.data.images` reads such a path in place), so ``prepare_images`` re-encodes
it from the shard like any other image and nothing is unpacked. A key without an image or without
a caption is handed on with that part ``None`` (ingest quarantines it with its reason).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tulip_pipelines.data.images import TAR_SUFFIX
from tulip_pipelines.progress import progress

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")


class ShardInputError(ValueError):
    """The shards cannot be read as ingest input (names the path)."""


class UnparsableJSON:
    """A ``.json`` caption file that is not JSON (not text: ingest rejects it)."""

    def __init__(self, error: str):
        self.error = error

    def __repr__(self) -> str:
        return f"parse error: {self.error}"


def shard_files(path: str | os.PathLike, image_root: str | os.PathLike) -> list[Path]:
    """The ``.tar`` files at ``path`` (one tar, or a folder searched recursively, sorted), which
    must lie under ``image_root``."""
    path, root = Path(path), Path(image_root).resolve()
    if path.is_file():
        shards = [path] if path.name.endswith(TAR_SUFFIX) else []
    elif path.is_dir():
        shards = sorted(path.rglob(f"*{TAR_SUFFIX}"))
    else:
        raise FileNotFoundError(f"WebDataset shards {path} not found (raw_annotations.filepath)")
    if not shards:
        raise ShardInputError(f"{path}: no .tar shard (raw_annotations.filepath names a .tar file "
                              "or a folder of them)")
    for shard in shards:
        if not shard.resolve().is_relative_to(root):
            raise ShardInputError(f"shard {shard} is not under the image root {root}: put the "
                                  "shards under image_root (parameters.yml), images are named "
                                  "relative to it")
    return shards


def _caption(sample: dict[str, Any], caption_field: str) -> Any:
    """The caption of a grouped sample: ``.txt`` text, else the ``.json``'s field; ``None`` when
    the sample has neither (a non-string value is returned as it is, for ingest to judge)."""
    for ext in CAPTION_EXTENSIONS:
        for name, value in sample.items():
            if name.lower() != ext:
                continue
            text = value.decode("utf-8", "replace")
            if ext == "txt":
                return text
            try:
                data = json.loads(text)
            except ValueError as err:
                return UnparsableJSON(str(err))  # ingest: invalid_caption
            return data.get(caption_field) if isinstance(data, dict) else data
    return None


def iter_shard_records(path: str | os.PathLike, image_root: str | os.PathLike,
                       caption_field: str = "caption", show_progress: bool = False
                       ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream the samples of the shards at ``path`` as ``(index, record)``; ``record`` has
    ``id`` (the key), ``image`` (``<shard>/<member>`` relative to ``image_root``, or ``None``),
    ``caption`` (or ``None``) and ``shard``."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    shards = shard_files(path, image_root)
    root = Path(image_root).resolve()
    index = 0
    with progress(len(shards), "read shards", "shard", enabled=show_progress) as bar:
        for shard in shards:
            relative = shard.resolve().relative_to(root).as_posix()
            with open(shard, "rb") as stream:
                members = ({**member, "__url__": relative} for member in tar_file_iterator(stream))
                try:
                    for sample in group_by_keys(members, lcase=False):
                        yield index, _record(sample, relative, caption_field)
                        index += 1
                except (OSError, ValueError, tarfile.TarError) as err:
                    raise ShardInputError(f"{shard}: not a readable WebDataset shard ({err})"
                                          ) from None
            bar.update(1)


def _record(sample: dict[str, Any], shard: str, caption_field: str) -> dict[str, Any]:
    key = sample["__key__"]
    image_ext = next((name for name in sample if name.lower() in IMAGE_EXTENSIONS), None)
    return {"id": key, "shard": shard,
            "image": f"{shard}/{key}.{image_ext}" if image_ext else None,
            "caption": _caption(sample, caption_field)}
