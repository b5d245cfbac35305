"""ShareGPT4V annotations: a streaming reader and record validation (no Kedro).

The annotation file (``share-captioner_coco_lcs_sam_1246k_1107.json``, 1.25M records, ~1.5 GB) is
one JSON array of records shaped like::

    {"id": "000000000009", "image": "coco/train2017/000000000009.jpg",
     "conversations": [{"from": "human", "value": "<image>\\n..."},
                       {"from": "gpt", "value": "CAPTION"}]}

It is parsed as a stream (ijson, C backend when available, through a reader that counts bytes so
that a syntax error is reported with its byte offset), validated record by record and emitted in
fixed-schema batches, so memory stays bounded whatever the file size; the
only state that grows with the input is the id -> index map used to reject duplicate ids.

Decisions:
    * caption = the first ``gpt`` turn's value, stripped of surrounding whitespace;
    * ``image`` is stored normalised and relative to the image root; ``source`` is its first
      path component (``coco``, ``sam``, ``llava``, ...);
    * a record without an ``id`` (or with an empty one) takes its image path as id; an integer id
      is kept as its decimal string; any other id type is rejected;
    * only kept records claim an id: a later record with the same id is rejected as a duplicate
      (the detail names the kept record's index), a rejected record never shadows a good one.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

import ijson
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm
from tulip_pipelines.params import known_params

logger = logging.getLogger(__name__)


def _fastest_backend() -> Any:
    """ijson's C backend when it is built, else ijson's default."""
    try:
        return ijson.get_backend("yajl2_c")
    except ImportError:
        return ijson


_BACKEND = _fastest_backend()
_READ_SIZE = 1 << 20  # bytes fed to the parser at a time
_JSON_WHITESPACE = b" \t\r\n"

_STR = pa.string()
CAPTIONS_SCHEMA = pa.schema(
    {"id": _STR, "image": _STR, "caption": _STR, "source": _STR, "n_chars": pa.int64()}
)
REJECTED_SCHEMA = pa.schema({"index": pa.int64(), "id": _STR, "reason": _STR, "detail": _STR})


class Reason(str, Enum):
    """Why a record was quarantined (the ``reason`` column of ``rejected_captions``)."""

    NOT_AN_OBJECT = "not_an_object"
    INVALID_ID = "invalid_id"
    MISSING_IMAGE = "missing_image"
    UNSAFE_IMAGE_PATH = "unsafe_image_path"
    MISSING_CONVERSATIONS = "missing_conversations"
    NO_GPT_TURN = "no_gpt_turn"
    EMPTY_CAPTION = "empty_caption"
    IMAGE_NOT_FOUND = "image_not_found"
    DUPLICATE_ID = "duplicate_id"


def is_positive_int(value: Any) -> bool:
    """True for an ``int`` (not a ``bool``) >= 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class AnnotationFormatError(ValueError):
    """The annotation file is not a JSON array (names the file and byte offset)."""


class CountMismatchError(RuntimeError):
    """Records read differ from records kept plus records rejected."""


@dataclass(frozen=True)
class IngestConfig:
    """``params:ingest``.

    Attributes:
        image_root: folder the records' ``image`` paths are relative to (relative to the working
            directory, i.e. the project root under ``kedro run``).
        check_images: reject records whose image file is missing (one ``stat`` per record: turn
            it off for 1.2M-record runs on slow disks).
        batch_size: records per Parquet part written.
    """

    image_root: str
    check_images: bool = True
    batch_size: int = 50_000

    def __post_init__(self) -> None:
        if not isinstance(self.image_root, str) or not self.image_root:
            raise ValueError(f"ingest.image_root must be a non-empty path, got {self.image_root!r}")
        if not isinstance(self.check_images, bool):
            raise ValueError(
                f"ingest.check_images must be true or false, got {self.check_images!r}"
            )
        if not is_positive_int(self.batch_size):
            raise ValueError(
                f"ingest.batch_size must be a positive integer, got {self.batch_size!r}"
            )

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> "IngestConfig":
        """Build from the ``ingest`` parameters; unknown keys are an error naming the key."""
        params = known_params(cls, params, "ingest parameter")
        if "image_root" not in params:
            raise ValueError("ingest.image_root is required")
        return cls(**params)


@dataclass(frozen=True)
class Rejection:
    """A quarantined record: its category and a message naming the field."""

    reason: Reason
    detail: str


@dataclass(frozen=True)
class CaptionRow:
    """A kept record, as one row of the ``captions`` table."""

    id: str
    image: str
    caption: str
    source: str


@dataclass(frozen=True)
class AnnotationFile:
    """Handle on a ShareGPT4V annotation file; iterating streams ``(index, record)`` pairs."""

    path: Path

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return iter_records(self.path)


def iter_records(path: str | os.PathLike, progress: bool = False) -> Iterator[tuple[int, Any]]:
    """Stream the records of the top-level JSON array in ``path`` as ``(index, record)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        AnnotationFormatError: the file is empty, its top-level value is not an array, or it is
            not valid JSON; the message names the file, the byte offset and the last good record.
    """
    path = Path(path)
    index = 0
    with path.open("rb") as f, tqdm(
        total=path.stat().st_size,
        unit="B",
        unit_scale=True,
        desc=f"read {path.name}",
        disable=None if progress else True,
    ) as bar:
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

    def __init__(self, f: BinaryIO, bar: tqdm) -> None:
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


def check_image_path(image: str) -> str | None:
    """Normalised relative form of ``image``, or None if absolute or escaping the image root."""
    if image.startswith(("/", "\\")) or (len(image) > 1 and image[1] == ":"):
        return None
    normalised = posixpath.normpath(image.replace("\\", "/"))
    if normalised == ".." or normalised.startswith("../") or normalised == ".":
        return None
    return normalised


def validate_record(
    index: int,
    record: Any,
    image_root: Path,
    check_images: bool,
    seen_ids: dict[str, int],
) -> tuple[CaptionRow | None, Rejection | None]:
    """Validate one record: exactly one of the returned pair is set.

    ``image_root`` must be resolved (absolute, symlinks followed) when ``check_images`` is on.
    ``seen_ids`` maps the ids of kept records to their index; a kept record's id is added to it.
    """
    if not isinstance(record, dict):
        return None, Rejection(
            Reason.NOT_AN_OBJECT, f"record {index} is a {type(record).__name__}, not an object"
        )
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        return None, Rejection(
            Reason.MISSING_IMAGE,
            f"record {index}: field 'image' is missing or not a non-empty string",
        )
    relative = check_image_path(image)
    if relative is None:
        return None, Rejection(
            Reason.UNSAFE_IMAGE_PATH,
            f"record {index}: field 'image' {image!r} is absolute or escapes the image root",
        )
    raw_id = record.get("id")
    if raw_id is None or raw_id == "":
        record_id = relative
    elif isinstance(raw_id, str) or (isinstance(raw_id, int) and not isinstance(raw_id, bool)):
        record_id = str(raw_id)
    else:
        return None, Rejection(
            Reason.INVALID_ID, f"record {index}: field 'id' is a {type(raw_id).__name__}"
        )
    conversations = record.get("conversations")
    if not isinstance(conversations, list):
        return None, Rejection(
            Reason.MISSING_CONVERSATIONS,
            f"record {index}: field 'conversations' is missing or not a list",
        )
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") == "gpt":
            break
    else:
        return None, Rejection(
            Reason.NO_GPT_TURN, f"record {index}: field 'conversations' has no 'gpt' turn"
        )
    caption = turn.get("value")
    if not isinstance(caption, str) or not caption.strip():
        return None, Rejection(
            Reason.EMPTY_CAPTION,
            f"record {index}: field 'conversations[from=gpt].value' is empty or not a string",
        )
    if check_images:
        candidate = (image_root / relative).resolve()
        if not candidate.is_relative_to(image_root):
            return None, Rejection(
                Reason.UNSAFE_IMAGE_PATH,
                f"record {index}: field 'image' {image!r} resolves outside the image root "
                f"(symlink to {candidate})",
            )
        if not candidate.is_file():
            return None, Rejection(
                Reason.IMAGE_NOT_FOUND, f"record {index}: field 'image' file {candidate} not found"
            )
    first = seen_ids.get(record_id)
    if first is not None:
        return None, Rejection(
            Reason.DUPLICATE_ID,
            f"record {index}: field 'id' {record_id!r} duplicates kept record {first}",
        )
    seen_ids[record_id] = index
    return CaptionRow(record_id, relative, caption.strip(), relative.split("/", 1)[0]), None


@dataclass
class IngestStats:
    """Running counts of an ingest; ``n_in == n_kept + n_rejected`` once it is complete."""

    n_in: int = 0
    n_kept: int = 0
    reasons: Counter = field(default_factory=Counter)

    @property
    def n_rejected(self) -> int:
        return sum(self.reasons.values())


def captions_frame(rows: list[CaptionRow]) -> pd.DataFrame:
    """``captions`` batch with the fixed schema (also for an empty batch)."""
    columns = {
        "id": [r.id for r in rows],
        "image": [r.image for r in rows],
        "caption": [r.caption for r in rows],
        "source": [r.source for r in rows],
        "n_chars": [len(r.caption) for r in rows],
    }
    return pa.table(columns, schema=CAPTIONS_SCHEMA).to_pandas()


def rejected_frame(rows: list[tuple[int, str | None, Rejection]]) -> pd.DataFrame:
    """``rejected_captions`` batch with the fixed schema (also for an empty batch)."""
    columns = {
        "index": [i for i, _, _ in rows],
        "id": [record_id for _, record_id, _ in rows],
        "reason": [r.reason.value for _, _, r in rows],
        "detail": [r.detail for _, _, r in rows],
    }
    return pa.table(columns, schema=REJECTED_SCHEMA).to_pandas()


def _raw_id(record: Any) -> str | None:
    raw = record.get("id") if isinstance(record, dict) else None
    return None if raw is None else str(raw)


def iter_ingest_batches(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    check_images: bool = True,
    batch_size: int = 50_000,
    stats: IngestStats | None = None,
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Stream ``path`` and yield ``(kept, rejected)`` DataFrames per ``batch_size`` records.

    Every record lands in exactly one of the two tables. When the stream ends the counts are
    reconciled (``CountMismatchError`` if records read != kept + rejected) and logged.
    """
    root = Path(image_root).resolve() if check_images else Path(image_root)
    if check_images and not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a directory (ingest.image_root)")
    stats = stats if stats is not None else IngestStats()
    seen_ids: dict[str, int] = {}
    kept: list[CaptionRow] = []
    rejected: list[tuple[int, str | None, Rejection]] = []
    n_yielded = 0
    for index, record in iter_records(path, progress=True):
        stats.n_in += 1
        row, rejection = validate_record(index, record, root, check_images, seen_ids)
        if row is not None:
            kept.append(row)
        else:
            rejected.append((index, _raw_id(record), rejection))
            stats.reasons[rejection.reason.value] += 1
        if len(kept) + len(rejected) >= batch_size:
            stats.n_kept += len(kept)
            n_yielded += len(kept) + len(rejected)
            yield captions_frame(kept), rejected_frame(rejected)
            kept, rejected = [], []
    if kept or rejected or n_yielded == 0:
        stats.n_kept += len(kept)
        n_yielded += len(kept) + len(rejected)
        yield captions_frame(kept), rejected_frame(rejected)
    if not stats.n_in == n_yielded == stats.n_kept + stats.n_rejected:
        raise CountMismatchError(
            f"{path}: read {stats.n_in} records but wrote {n_yielded} "
            f"({stats.n_kept} kept + {stats.n_rejected} rejected)"
        )
    logger.info(
        "ingested %s: %d records in = %d kept + %d rejected %s",
        path,
        stats.n_in,
        stats.n_kept,
        stats.n_rejected,
        dict(sorted(stats.reasons.items())),
    )
