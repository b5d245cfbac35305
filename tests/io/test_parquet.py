"""ParquetPartsDataset: append per save, reset per instance, load/preview/exists."""

from __future__ import annotations

import pandas as pd
import pytest
from kedro.io import DatasetError

from tulip_pipelines.io.parquet import ParquetPartsDataset


def frame(start: int, n: int) -> pd.DataFrame:
    ids = range(start, start + n)
    return pd.DataFrame({"id": [f"r{i}" for i in ids], "n": ids})


def test_saves_append_parts_and_load_concatenates_in_order(tmp_path):
    ds = ParquetPartsDataset(str(tmp_path / "t"))
    assert not ds.exists()
    for start in (0, 3, 6):
        ds.save(frame(start, 3))
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert ds.exists()
    loaded = ds.load()
    assert list(loaded["id"]) == [f"r{i}" for i in range(9)]
    assert list(loaded["n"]) == list(range(9))


def test_new_instance_replaces_previous_run(tmp_path):
    first = ParquetPartsDataset(str(tmp_path / "t"))
    for start in (0, 3):
        first.save(frame(start, 3))
    second = ParquetPartsDataset(str(tmp_path / "t"))
    second.save(frame(100, 2))
    assert list(second.load()["id"]) == ["r100", "r101"]
    assert len(list((tmp_path / "t").iterdir())) == 1


def test_empty_frames_keep_the_schema_but_add_no_parts(tmp_path):
    ds = ParquetPartsDataset(str(tmp_path / "t"))
    ds.save(frame(0, 0))
    ds.save(frame(0, 0))
    ds.save(frame(0, 2))
    assert len(list((tmp_path / "t").iterdir())) == 2
    assert list(ds.load()["id"]) == ["r0", "r1"]
    only_empty = ParquetPartsDataset(str(tmp_path / "e"))
    only_empty.save(frame(0, 0))
    loaded = only_empty.load()
    assert loaded.empty and list(loaded.columns) == ["id", "n"]


def test_preview_reads_across_parts(tmp_path):
    ds = ParquetPartsDataset(str(tmp_path / "t"))
    for start in (0, 3, 6):
        ds.save(frame(start, 3))
    preview = ds.preview(nrows=5)
    assert preview["columns"] == ["id", "n"]
    assert [row[0] for row in preview["data"]] == ["r0", "r1", "r2", "r3", "r4"]


def test_errors(tmp_path):
    ds = ParquetPartsDataset(str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="no Parquet parts"):
        ds.load()
    with pytest.raises(DatasetError, match="DataFrame"):
        ds.save([1, 2])
