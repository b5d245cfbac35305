"""A Parquet table written in parts, for nodes that stream their output in batches."""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from kedro.io import AbstractDataset, DatasetError
from kedro.io.core import get_protocol_and_path
from kedro_datasets._typing import TablePreview

PART_GLOB = "part-*.parquet"


class ParquetPartsDataset(AbstractDataset[pd.DataFrame, pd.DataFrame]):
    """A directory of ``part-00000.parquet``, ``part-00001.parquet``, ... read as one DataFrame.

    Each ``save`` appends one part, so a generator node can write a table larger than memory
    batch by batch. The first ``save`` of a dataset instance (one per Kedro run) deletes the parts
    of the previous run first. Empty frames are written only as the first part, so that a table
    with no rows still has its schema on disk.

    Example catalog entry::

        captions:
          type: tulip_pipelines.io.parquet.ParquetPartsDataset
          filepath: data/02_intermediate/captions
    """

    def __init__(
        self,
        filepath: str,
        save_args: dict[str, Any] | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        protocol, path = get_protocol_and_path(filepath)
        self._protocol = protocol
        self._path = path.rstrip("/")
        self._fs = fsspec.filesystem(protocol, **(credentials or {}), **(fs_args or {}))
        self._save_args = save_args or {}
        self._n_saved = 0
        self.metadata = metadata

    def _parts(self) -> list[str]:
        if not self._fs.isdir(self._path):
            return []
        return sorted(self._fs.glob(posixpath.join(self._path, PART_GLOB)))

    def load(self) -> pd.DataFrame:
        parts = self._parts()
        if not parts:
            raise DatasetError(f"no Parquet parts ({PART_GLOB}) under {self._path}")
        tables = []
        for part in parts:
            with self._fs.open(part, "rb") as f:
                tables.append(pq.read_table(f))
        # an empty first part only carries the schema (which may be untyped): skip it if rows follow
        tables = [t for t in tables if t.num_rows] or tables[:1]
        return pa.concat_tables(tables, promote_options="permissive").to_pandas()

    def save(self, data: pd.DataFrame) -> None:
        if not isinstance(data, pd.DataFrame):
            raise DatasetError(
                f"{self._path}: expected a pandas DataFrame per save, got {type(data).__name__}"
            )
        if self._n_saved == 0:
            for part in self._parts():
                self._fs.rm(part)
            self._fs.makedirs(self._path, exist_ok=True)
        elif data.empty:
            return
        part = posixpath.join(self._path, f"part-{self._n_saved:05d}.parquet")
        with self._fs.open(part, "wb") as f:
            pq.write_table(pa.Table.from_pandas(data, preserve_index=False), f, **self._save_args)
        self._n_saved += 1

    def _exists(self) -> bool:
        return bool(self._parts())

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._path, "protocol": self._protocol, "save_args": self._save_args}

    def preview(self, nrows: int = 5) -> TablePreview:
        """First ``nrows`` rows (from the first parts only), in pandas' ``split`` layout."""
        rows: list[pd.DataFrame] = []
        n = 0
        for part in self._parts():
            with self._fs.open(part, "rb") as f:
                head = pq.read_table(f).slice(0, nrows - n).to_pandas()
            rows.append(head)
            n += len(head)
            if n >= nrows:
                break
        frame = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
        return TablePreview(frame.to_dict(orient="split"))
