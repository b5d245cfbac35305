"""ingest + split as Kedro pipelines: a runner-level run on hand-made data, and a KedroSession
run of demo_data -> ingest -> split in a temporary copy of the project."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from tulip_pipelines.io.annotations import ShareGPT4VAnnotationsDataset
from tulip_pipelines.io.parquet import ParquetPartsDataset
from tulip_pipelines.pipelines import ingest, split


def _record(i: int, **overrides) -> dict:
    rec = {
        "id": f"id{i}",
        "image": f"sam/{i}.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": f"Caption number {i}. More detail."},
        ],
    }
    rec.update(overrides)
    return rec


def test_ingest_then_split_streams_parts_and_reconciles(tmp_path):
    images = tmp_path / "images"
    (images / "sam").mkdir(parents=True)
    for i in range(30):
        (images / "sam" / f"{i}.jpg").write_bytes(b"x")
    records = [_record(i) for i in range(30)]
    records[4] = _record(4, image="/abs/4.jpg")
    records[9] = _record(9, conversations=[])
    records[20] = _record(2)  # duplicate id of record 2
    records.append(_record(77))  # no image file
    raw = ShareGPT4VAnnotationsDataset(str(tmp_path / "ann.json"))
    raw.save(records)

    catalog = DataCatalog(
        datasets={
            "raw_annotations": raw,
            "captions": ParquetPartsDataset(str(tmp_path / "captions")),
            "rejected_captions": ParquetPartsDataset(str(tmp_path / "rejected")),
            "train_captions": MemoryDataset(),
            "val_captions": MemoryDataset(),
        }
    )
    catalog["params:ingest"] = {"check_images": True, "batch_size": 8}
    catalog["params:image_root"] = str(images)
    catalog["params:split"] = {"val_size": 5, "max_train": None}
    SequentialRunner().run(ingest.create_pipeline() + split.create_pipeline(), catalog)

    # 31 records in batches of 8 -> 4 parts of captions; rejected parts only where there are rows
    assert len(list((tmp_path / "captions").glob("part-*.parquet"))) == 4
    captions = catalog.load("captions")
    rejected = catalog.load("rejected_captions")
    assert len(captions) + len(rejected) == len(records)
    assert sorted(rejected["reason"]) == [
        "duplicate_id",
        "image_not_found",
        "no_gpt_turn",
        "unsafe_image_path",
    ]
    assert list(rejected["index"]) == [4, 9, 20, 30]
    assert set(captions["source"]) == {"sam"}
    train, val = catalog.load("train_captions"), catalog.load("val_captions")
    assert list(val["id"]) == ["id0", "id1", "id2", "id3", "id5"]
    assert len(train) == len(captions) - 5
    assert list(train["id"]) == list(captions["id"][5:])


@pytest.mark.slow
def test_kedro_session_runs_demo_data_ingest_split(project_copy):
    project = project_copy  # the working directory: image_root is relative to it
    for pipeline in ("demo_data", "ingest", "split"):
        with KedroSession.create(
            project_path=project,
            runtime_params={"demo_data": {"n_groups": 25}, "split": {"val_size": 20}},
        ) as session:
            session.run(pipeline_names=[pipeline])

    records = json.loads(
        (project / "data/01_raw/sharegpt4v_demo/share-captioner_demo.json").read_text()
    )
    captions = pd.read_parquet(project / "data/02_intermediate/captions")
    rejected = pd.read_parquet(project / "data/02_intermediate/rejected_captions")
    assert len(records) == len(captions) + len(rejected)
    assert rejected.empty, rejected["detail"].tolist()  # the demo data is clean
    assert list(captions["id"]) == [r["id"] for r in records]
    train = pd.read_parquet(project / "data/05_model_input/train_captions.parquet")
    val = pd.read_parquet(project / "data/05_model_input/val_captions.parquet")
    assert len(val) == 20 and len(train) == len(captions) - 20
    assert list(val["id"]) == list(captions["id"][:20])
    image_root = project / "data/01_raw/sharegpt4v_demo/images"
    assert all((image_root / p).is_file() for p in train["image"])
