"""Ingest: caption records validated one by one into the ``captions`` table, unusable ones
into the ``rejected_captions`` quarantine table with a reason (no Kedro).

Three ways in (``ingest.format``), one set of rules and one ``captions`` table out:
    * ``sharegpt4v``: ShareGPT4V's JSON array of records (:mod:`.annotations`);
    * ``table``: a CSV, TSV, JSONL or Parquet file, columns named by ``ingest.columns``
      (:mod:`.tables`); a row is a record whose caption is its caption column;
    * ``webdataset``: WebDataset tar shards (:mod:`.webdataset_input`): a key is a record, its
      image named inside its shard; a key without an image or a caption is quarantined.

Decisions:
    * caption = the first ``gpt`` turn's value (``sharegpt4v``) or the caption column / the
      ``.txt`` or ``.json`` caption (``table``, ``webdataset``), stripped of surrounding
      whitespace; in a table or a shard a caption that is not text (a number, a list; also
      a text that is only a number, what a CSV column of numbers holds) is ``invalid_caption``;
    * ``image`` is stored normalised and relative to the image root; ``source`` is its first
      path component (``coco``, ``sam``, ``llava``, ...);
    * a record without an ``id`` (or with an empty one) takes its image path as id; an integer id
      is kept as its decimal string; any other id type is rejected;
    * only kept records claim an id: a later record with the same id is rejected as a duplicate
      (the detail names the kept record's index), a rejected record never shadows a good one.

Records are emitted in fixed-schema batches, so memory stays bounded whatever the file size; the
only state that grows with the input is the id -> index map used to reject duplicate ids.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from tulip_pipelines.data.annotations import iter_records
from tulip_pipelines.data.records import (
    SHAREGPT4V_FIELDS,
    CaptionRow,
    Reason,
    RecordFields,
    Rejection,
    claim_id,
    decode_error,
    validate_record,
)
from tulip_pipelines.data.tables import iter_table_rows
from tulip_pipelines.data.webdataset_input import iter_shard_records
from tulip_pipelines.params import Params, Problems

logger = logging.getLogger(__name__)

_STR = pa.string()
CAPTIONS_SCHEMA = pa.schema(
    {"id": _STR, "image": _STR, "caption": _STR, "source": _STR, "n_chars": pa.int64()}
)
REJECTED_SCHEMA = pa.schema({"index": pa.int64(), "id": _STR, "reason": _STR, "detail": _STR})


FORMATS = ("sharegpt4v", "table", "webdataset")
DEFAULT_COLUMNS = {"image": "image", "caption": "caption", "id": None}


class CountMismatchError(RuntimeError):
    """Records read differ from records kept plus records rejected."""


@dataclass(frozen=True)
class IngestParams(Params):
    """``params:ingest``.

    Attributes:
        check_images: ``exists`` rejects records whose image file is missing (one ``stat`` per
            record); ``decode`` also opens and decodes every image, in parallel over
            ``decode_workers`` processes, and rejects unreadable ones (``unreadable_image``);
            ``false`` checks nothing (for 1.2M-record runs on slow disks). ``true`` = ``exists``.
        batch_size: records per Parquet part written.
        format: ``sharegpt4v`` (the ``raw_annotations`` file is ShareGPT4V's JSON), ``table``
            (a CSV, TSV, JSONL or Parquet file, by its extension) or ``webdataset`` (a ``.tar``
            shard or a folder of them, under the image root).
        columns: ``image``, ``caption`` and optional ``id``: the table's column names
            (``webdataset``: ``caption`` is the field of a ``.json`` caption); ``id`` null: a
            record's id is its image path (``webdataset``: its key).
    """

    section = "ingest"

    check_images: bool | str = "exists"
    batch_size: int = 50_000
    decode_workers: int | None = None  # None: every core
    format: str = "sharegpt4v"
    columns: dict[str, str | None] = field(default_factory=lambda: dict(DEFAULT_COLUMNS))

    def __post_init__(self) -> None:
        p = Problems(self.section)
        p.one_of("format", self.format, FORMATS)
        columns = self.columns if isinstance(self.columns, dict) else None
        p.check(columns is not None and set(columns) <= set(DEFAULT_COLUMNS), "columns",
                f"must be a mapping with keys among {sorted(DEFAULT_COLUMNS)}, got "
                f"{self.columns!r}")
        if columns is not None:
            merged = {**DEFAULT_COLUMNS, **columns}
            for key in ("image", "caption"):
                p.check(isinstance(merged[key], str) and bool(merged[key]), f"columns.{key}",
                        f"must be a column name, got {merged[key]!r}")
            p.check(merged["id"] is None or (isinstance(merged["id"], str) and bool(merged["id"])),
                    "columns.id", f"must be a column name or null, got {merged['id']!r}")
        p.one_of("check_images", self.check_images, (False, True, "exists", "decode"))
        p.int_at_least("decode_workers", self.decode_workers, 1, optional=True)
        p.int_at_least("batch_size", self.batch_size, 1)
        p.raise_if_any()

    def fields(self) -> RecordFields:
        """Where this format's records keep image, caption and id."""
        if self.format == "sharegpt4v":
            return SHAREGPT4V_FIELDS
        merged = {**DEFAULT_COLUMNS, **self.columns}
        if self.format == "webdataset":
            return RecordFields("image", merged["caption"], "id")
        return RecordFields(merged["image"], merged["caption"], merged["id"])


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


def _raw_id(record: Any, id_field: str | None) -> str | None:
    raw = record.get(id_field) if isinstance(record, dict) and id_field else None
    return None if raw is None else str(raw)


def iter_ingest_batches(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    check_images: bool | str = "exists",
    batch_size: int = 50_000,
    stats: IngestStats | None = None,
    decode_workers: int | None = None,
    format: str = "sharegpt4v",
    fields: RecordFields | None = None,
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Stream ``path`` and yield ``(kept, rejected)`` DataFrames per ``batch_size`` records.

    ``format`` and ``fields`` say how to read ``path`` (:class:`IngestParams`; ``fields``
    defaults to ``IngestParams(format=format).fields()``).

    Every record lands in exactly one of the two tables. When the stream ends the counts are
    reconciled (``CountMismatchError`` if records read != kept + rejected) and logged. With
    ``check_images="decode"`` each batch's images are decoded in parallel before their ids are
    claimed (an unreadable record never shadows a later good one with its id).
    """
    check_images = {True: "exists", False: False}.get(check_images, check_images)
    root = Path(image_root).resolve() if check_images else Path(image_root)
    if check_images and not root.is_dir():
        raise FileNotFoundError(
            f"image root {root} is not a directory (image_root, parameters.yml)"
        )
    stats = stats if stats is not None else IngestStats()
    decode = check_images == "decode"
    fields = fields or IngestParams(format=format).fields()
    records = _records(path, format, fields, root)
    shards = format == "webdataset"  # images are tar members: present by construction
    seen_ids: dict[str, int] = {}
    pending: list[tuple[int, CaptionRow]] = []  # decode: checked but for the image's decoding
    kept: list[CaptionRow] = []
    rejected: list[tuple[int, str | None, Rejection]] = []
    n_yielded = 0
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ProcessPoolExecutor(decode_workers)) if decode else None
        for index, record in records:
            stats.n_in += 1
            rejection = _shard_sample_rejection(index, record) if shards else None
            if rejection is None:
                row, rejection = validate_record(index, record, root,
                                                 bool(check_images) and not shards,
                                                 None if decode else seen_ids, fields)
            else:
                row = None
            if row is not None and decode:
                pending.append((index, row))
            elif row is not None:
                kept.append(row)
            else:
                rejected.append((index, _raw_id(record, fields.id), rejection))
                stats.reasons[rejection.reason.value] += 1
            if len(pending) + len(kept) + len(rejected) >= batch_size:
                if pending:
                    _decode_pending(pending, root, pool, seen_ids, kept, rejected, stats)
                    pending = []
                stats.n_kept += len(kept)
                n_yielded += len(kept) + len(rejected)
                yield captions_frame(kept), rejected_frame(rejected)
                kept, rejected = [], []
        if pending:
            _decode_pending(pending, root, pool, seen_ids, kept, rejected, stats)
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


def _records(path: str | os.PathLike, format: str, fields: RecordFields, root: Path
             ) -> Iterator[tuple[int, Any]]:
    """``(index, record)`` of ``path`` read as ``format``; a table's needed columns are checked
    before the first record."""
    if format == "table":
        needed = {"ingest.columns.image": fields.image, "ingest.columns.caption": fields.caption}
        if fields.id:
            needed["ingest.columns.id"] = fields.id
        return iter_table_rows(path, needed, show_progress=True)
    if format == "webdataset":
        return iter_shard_records(path, root, fields.caption or "caption", show_progress=True)
    return iter_records(path, show_progress=True)


def _shard_sample_rejection(index: int, record: dict[str, Any]) -> Rejection | None:
    """A WebDataset key without an image or without a caption."""
    where = f"record {index}: key {record['id']!r} of shard {record['shard']}"
    if record["image"] is None:
        return Rejection(Reason.MISSING_IMAGE, f"{where} has no image (.jpg, .jpeg, .png, .webp)"
                         + ("" if record["caption"] is None else " but a caption"))
    if record["caption"] is None:
        return Rejection(Reason.MISSING_CAPTION,
                         f"{where} has an image but no caption (.txt, .json)")
    return None


def _decode_pending(pending: list[tuple[int, CaptionRow]], root: Path, pool,
                    seen_ids: dict[str, int], kept: list[CaptionRow],
                    rejected: list[tuple[int, str | None, Rejection]], stats: IngestStats) -> None:
    """Decode the images of ``pending`` rows in the pool; keep the readable ones (claiming their
    ids, in record order), quarantine the others as ``unreadable_image``."""
    paths = [str(root / row.image) for _, row in pending]
    errors = pool.map(decode_error, paths, chunksize=max(1, len(paths) // 64))
    for (index, row), path, error in zip(pending, paths, errors):
        rejection = None
        if error is not None:
            rejection = Rejection(Reason.UNREADABLE_IMAGE,
                                  f"record {index}: field 'image' file {path} cannot be decoded "
                                  f"({error})")
        else:
            rejection = claim_id(index, row, seen_ids)
        if rejection is None:
            kept.append(row)
        else:
            rejected.append((index, row.id, rejection))
            stats.reasons[rejection.reason.value] += 1
