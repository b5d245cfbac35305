"""ShareGPT4V annotation files: a streaming reader (no Kedro).

The annotation file (``share-captioner_coco_lcs_sam_1246k_1107.json``, 1.25M records, ~1.5 GB) is
one JSON array of records shaped like::

    {"id": "000000000009", "image": "coco/train2017/000000000009.jpg",
     "conversations": [{"from": "human", "value": "<image>\\n..."},
                       {"from": "gpt", "value": "CAPTION"}]}

It is parsed as a stream (ijson, C backend when available, through a reader that counts bytes so
that a syntax error is reported with its byte offset), so memory stays bounded whatever the file
size. Validating the records is :mod:`tulip_pipelines.data.ingest`'s job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import ijson

from tulip_pipelines.progress import progress


def _fastest_backend() -> Any:
    """ijson's C backend when it is built, else ijson's default."""
    try:
        return ijson.get_backend("yajl2_c")
    except ImportError:
        return ijson


_BACKEND = _fastest_backend()
_READ_SIZE = 1 << 20  # bytes fed to the parser at a time
_JSON_WHITESPACE = b" \t\r\n"


class AnnotationFormatError(ValueError):
    """The annotation file is not a JSON array (names the file and byte offset)."""


@dataclass(frozen=True)
class AnnotationFile:
    """Handle on a ShareGPT4V annotation file; iterating streams ``(index, record)`` pairs."""

    path: Path

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return iter_records(self.path)


def iter_records(path: str | os.PathLike, show_progress: bool = False
                 ) -> Iterator[tuple[int, Any]]:
    """Stream the records of the top-level JSON array in ``path`` as ``(index, record)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        AnnotationFormatError: the file is empty, its top-level value is not an array, or it is
            not valid JSON; the message names the file, the byte offset and the last good record.
    """
    path = Path(path)
    index = 0
    with path.open("rb") as f, progress(path.stat().st_size, f"read {path.name}", "B",
                                        enabled=show_progress) as bar:
        _check_array_start(path, f)
        reader = _CountingReader(f, bar)
        try:
            for record in _BACKEND.items(reader, "item", buf_size=_READ_SIZE):
                yield index, record
                index += 1
        except (ijson.JSONError, ValueError) as err:  # ValueError: pure-Python backend
            raise _located_error(path, reader.n_read - reader.last_read, index, err) from None


class _CountingReader:
    """File wrapper that counts the bytes handed to the parser (to locate parse errors)."""

    def __init__(self, f: BinaryIO, bar: Any) -> None:
        self._f = f
        self._bar = bar
        self.n_read = 0
        self.last_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.n_read += len(data)
        self.last_read = len(data)
        self._bar.update(len(data))
        return data


class _NullSink:
    """Discards parser events (used only to locate an error)."""

    def send(self, _event: Any) -> None:
        return None


def _check_array_start(path: Path, f: BinaryIO) -> None:
    """Fail unless the first non-whitespace byte of ``f`` opens an array; rewinds ``f``."""
    offset = 0
    while chunk := f.read(1 << 16):
        stripped = chunk.lstrip(_JSON_WHITESPACE)
        if stripped:
            if stripped[:1] != b"[":
                found = stripped[:20].decode("utf-8", "replace")
                raise AnnotationFormatError(
                    f"{path}: expected a JSON array of records ('[') at byte offset "
                    f"{offset + len(chunk) - len(stripped)}, found {found!r}"
                )
            f.seek(0)
            return
        offset += len(chunk)
    raise AnnotationFormatError(
        f"{path}: empty file (no JSON value up to byte offset {offset}), "
        "expected an array of records"
    )


def _located_error(
    path: Path, chunk_start: int, n_good: int, err: Exception
) -> AnnotationFormatError:
    """Wrap a parser error with the exact byte offset, found by re-parsing up to the bad chunk."""
    at = _error_offset(path, chunk_start)
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return AnnotationFormatError(
        f"{path}: invalid JSON at byte offset {at} (after {n_good} complete records): {reason}"
    )


def _error_offset(path: Path, chunk_start: int) -> int:
    """Byte offset of the first byte the parser rejects (the file size for a truncated file).

    Bytes before ``chunk_start`` parsed without error in the main pass; they are fed again in
    large chunks, then the failing chunk one byte at a time. Only runs on the error path.
    """
    parser = _BACKEND.basic_parse_coro(_NullSink())
    with path.open("rb") as f:
        remaining = chunk_start
        while remaining > 0:
            chunk = f.read(min(_READ_SIZE, remaining))
            parser.send(chunk)
            remaining -= len(chunk)
        chunk = f.read(_READ_SIZE)
    for i in range(len(chunk)):
        try:
            parser.send(chunk[i : i + 1])
        except (ijson.JSONError, ValueError):
            return chunk_start + i
    return chunk_start + len(chunk)
