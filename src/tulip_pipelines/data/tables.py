"""Caption tables: CSV, TSV, JSONL or Parquet files read as a stream of rows (no Kedro).

The format is chosen by the file's extension (:data:`TABLE_FORMATS`); pyarrow reads every one of
them in blocks (``pyarrow.csv.open_csv``, ``pyarrow.json.open_json``,
``pyarrow.parquet.ParquetFile.iter_batches``), so memory stays bounded whatever the file size.

Decisions:
    * the columns a caller needs are checked against the file's header (CSV/TSV), its schema
      (Parquet) or the keys of its first block of records (JSONL) before any row is handed out:
      a missing one is a :class:`MissingColumnError` naming the file, the column and the columns
      present (with a hint when the header looks like a wrong delimiter);
    * CSV/TSV values are read as text (leading zeros of ids are kept); quoted values may hold
      newlines; a row with the wrong number of fields is handed out as a :class:`MalformedRow`
      (the caller quarantines it), the rows around it are kept;
    * JSONL and Parquet values keep their types (a caption column holding numbers or lists
      reaches the caller as such); pyarrow's JSON reader needs one type per column, so a column
      whose type changes between records is a :class:`TableFormatError` naming file and column;
    * an empty file (no header, no record) is a :class:`TableFormatError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from tulip_pipelines.progress import progress

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
DELIMITERS = {"csv": ",", "tsv": "\t"}
_BLOCK_BYTES = 1 << 22  # bytes pyarrow's CSV/JSON readers parse at a time
_PARQUET_ROWS = 16_384  # rows per Parquet batch


class TableFormatError(ValueError):
    """The table cannot be read (unknown extension, empty, not parseable); names the file."""


class MissingColumnError(TableFormatError):
    """A column the configuration names is not in the table."""


@dataclass(frozen=True)
class MalformedRow:
    """A CSV/TSV row pyarrow could not split into the header's fields."""

    line: int | None
    expected: int
    actual: int
    text: str

    def describe(self) -> str:
        where = f"line {self.line}" if self.line is not None else "a line"
        return (f"{where} has {self.actual} field(s), the header {self.expected} "
                f"({self.text[:80]!r})")


def table_format(path: str | os.PathLike) -> str:
    """``csv``, ``tsv``, ``jsonl`` or ``parquet`` from the extension, else a TableFormatError."""
    suffix = Path(path).suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise TableFormatError(f"{path}: unknown table extension {suffix!r}; a captions table is "
                               f"one of {sorted(TABLE_FORMATS)}")
    return TABLE_FORMATS[suffix]


def _check_columns(path: Path, fmt: str, present: Sequence[str], needed: dict[str, str]) -> None:
    """``needed`` maps a parameter name (``ingest.columns.caption``) to the column it names."""
    for where, column in needed.items():
        if column in present:
            continue
        hint = ""
        if fmt in DELIMITERS and len(present) == 1:
            others = [name for name, d in (("tab", "\t"), ("comma", ","), ("semicolon", ";"),
                                           ("|", "|")) if d in present[0]
                      and d != DELIMITERS[fmt]]
            if others:
                hint = (f"; the header is one field holding a {others[0]}: wrong delimiter? "
                        f"(.{fmt} files are read with {DELIMITERS[fmt]!r}; name the file "
                        ".tsv for tabs, .csv for commas)")
        raise MissingColumnError(f"{path}: no column {column!r} ({where}); the columns present "
                                 f"are {list(present)}{hint}")


def _csv_batches(path: Path, fmt: str, needed: dict[str, str], malformed: list[MalformedRow]
                 ) -> Iterator[pa.RecordBatch]:
    from pyarrow import csv

    parse = csv.ParseOptions(delimiter=DELIMITERS[fmt], newlines_in_values=True,
                             invalid_row_handler=_collect(malformed))
    read = csv.ReadOptions(block_size=_BLOCK_BYTES, use_threads=False)
    try:
        names = _header_names(path, fmt)
    except pa.ArrowInvalid as err:
        raise _format_error(path, err) from None
    _check_columns(path, fmt, names, needed)
    columns = list(dict.fromkeys(needed.values()))
    convert = csv.ConvertOptions(include_columns=columns,
                                 column_types={c: pa.string() for c in columns},
                                 strings_can_be_null=False, quoted_strings_can_be_null=False)
    try:
        reader = csv.open_csv(path, read_options=read, parse_options=parse,
                              convert_options=convert)
        yield from reader
    except pa.ArrowInvalid as err:
        raise _format_error(path, err) from None


def _header_names(path: Path, fmt: str) -> list[str]:
    """The header's field names (pyarrow's schema is empty when no column is included)."""
    from pyarrow import csv

    reader = csv.open_csv(path, read_options=csv.ReadOptions(block_size=_BLOCK_BYTES),
                          parse_options=csv.ParseOptions(delimiter=DELIMITERS[fmt],
                                                         newlines_in_values=True,
                                                         invalid_row_handler=lambda row: "skip"))
    return reader.schema.names


def _collect(malformed: list[MalformedRow]):
    def handler(row: Any) -> str:
        malformed.append(MalformedRow(row.number, row.expected_columns, row.actual_columns,
                                      row.text))
        return "skip"
    return handler


def _jsonl_batches(path: Path, needed: dict[str, str]) -> Iterator[pa.RecordBatch]:
    from pyarrow import json

    try:
        reader = json.open_json(path, read_options=json.ReadOptions(block_size=_BLOCK_BYTES,
                                                                    use_threads=False))
    except pa.ArrowInvalid as err:
        raise _format_error(path, err) from None
    _check_columns(path, "jsonl", reader.schema.names, needed)
    columns = list(dict.fromkeys(needed.values()))
    try:
        for batch in reader:
            yield batch.select(columns)
    except pa.ArrowInvalid as err:
        raise _format_error(path, err) from None
    except KeyError as err:  # a column absent from a later block
        raise MissingColumnError(f"{path}: column {err} is absent from some records") from None


def _parquet_batches(path: Path, needed: dict[str, str]) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise _format_error(path, err) from None
    _check_columns(path, "parquet", file.schema_arrow.names, needed)
    yield from file.iter_batches(batch_size=_PARQUET_ROWS,
                                 columns=list(dict.fromkeys(needed.values())))


def _format_error(path: Path, err: Exception) -> TableFormatError:
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "Empty" in message or (path.is_file() and path.stat().st_size == 0):
        return TableFormatError(f"{path}: empty file, expected a table of captions "
                                "(a header row naming the columns for CSV/TSV)")
    if "changed from" in message:
        return TableFormatError(f"{path}: {message}: pyarrow's JSON reader needs one type per "
                                "column (e.g. every caption a string, every id a string or every "
                                "id a number)")
    return TableFormatError(f"{path}: cannot be read as a table: {message}")


def iter_table_rows(path: str | os.PathLike, needed: dict[str, str], show_progress: bool = False
                    ) -> Iterator[tuple[int, dict[str, Any] | MalformedRow]]:
    """Stream ``path`` as ``(index, row)``: ``row`` maps the columns named by ``needed`` (a dict
    parameter name -> column) to their values, or is a :class:`MalformedRow`. Raises
    :class:`MissingColumnError` before the first row when a needed column is absent,
    :class:`TableFormatError` for an unreadable file, ``FileNotFoundError`` for a missing one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions table {path} not found")
    fmt = table_format(path)
    malformed: list[MalformedRow] = []
    if fmt in DELIMITERS:
        batches = _csv_batches(path, fmt, needed, malformed)
    elif fmt == "jsonl":
        batches = _jsonl_batches(path, needed)
    else:
        batches = _parquet_batches(path, needed)
    index = 0
    with progress(None, f"read {path.name}", "record", enabled=show_progress) as bar:
        for batch in batches:
            for bad in malformed:
                yield index, bad
                index += 1
            del malformed[:]
            for row in batch.to_pylist():
                yield index, row
                index += 1
            bar.update(batch.num_rows)
        for bad in malformed:
            yield index, bad
            index += 1
