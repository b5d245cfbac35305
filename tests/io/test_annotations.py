"""ShareGPT4VAnnotationsDataset: save a record list, load a streaming handle, clear errors."""

from __future__ import annotations

import pytest
from kedro.io import DatasetError

from tulip_pipelines.data.annotations import AnnotationFile
from tulip_pipelines.io.annotations import ShareGPT4VAnnotationsDataset

RECORDS = [
    {
        "id": "demo_000001",
        "image": "demo/000001.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": "Ünïcode caption."},
        ],
    },
    {"id": "demo_000002", "image": "demo/000002.png", "conversations": []},
]


def test_round_trip_returns_a_handle_that_streams_records(tmp_path):
    path = tmp_path / "sub" / "ann.json"
    ds = ShareGPT4VAnnotationsDataset(str(path))
    assert not ds.exists()
    ds.save(RECORDS)
    assert ds.exists()
    handle = ds.load()
    assert isinstance(handle, AnnotationFile) and handle.path == path
    assert list(handle) == list(enumerate(RECORDS))
    assert not (tmp_path / "sub" / "ann.json.tmp").exists()


def test_missing_file_error_names_the_path_and_the_setting(tmp_path):
    missing = tmp_path / "nowhere" / "share-captioner.json"
    with pytest.raises(DatasetError) as err:
        ShareGPT4VAnnotationsDataset(str(missing)).load()
    assert str(missing) in str(err.value) and "sharegpt4v_root" in str(err.value)


def test_save_rejects_non_list(tmp_path):
    with pytest.raises(DatasetError, match="list of record dicts"):
        ShareGPT4VAnnotationsDataset(str(tmp_path / "a.json")).save({"id": 1})
