"""Bad samples never stop a run and are never silent: a truncated and a zero-byte JPEG among the
training and validation images are skipped (the next readable record takes their place) and
recorded with stage, split, record id, path and error; beyond max_bad_fraction the run stops,
listing the first offenders."""

import pandas as pd
import pytest
import torch

from tests.conftest import DS_FP32, kept_memory_dataset
from tests.image_helpers import write_images
from tulip_pipelines.models import create_teacher
from tulip_pipelines.training.datasets import CaptionImageDataset, Collate, TooManyBadSamples
from tulip_pipelines.training.engine import train
from tulip_pipelines.training.job import TrainParams
from tulip_pipelines.training.tasks import ContrastiveTask


def corrupt(root, frame, truncated: int, empty: int) -> None:
    path = root / frame["image"][truncated]
    path.write_bytes(path.read_bytes()[:200])
    (root / frame["image"][empty]).write_bytes(b"")


@pytest.fixture
def data(tmp_path):
    frame = write_images(tmp_path, 40)
    corrupt(tmp_path, frame, truncated=5, empty=17)  # training images
    corrupt(tmp_path, frame, truncated=33, empty=36)  # validation images
    return tmp_path, frame


def _run(tmp_path, frame, max_bad_fraction):
    torch.manual_seed(0)
    clip = create_teacher("TULIP-Tiny")
    task = ContrastiveTask(clip.model, 1.0, 0.0)
    train_ds = CaptionImageDataset(frame.iloc[:30], tmp_path, clip.preprocess)
    val_ds = CaptionImageDataset(frame.iloc[30:], tmp_path, clip.preprocess)
    params = TrainParams(run_name="bad", run_dir=str(tmp_path / "run"), max_steps=8,
                         batch_size=10, lr=1e-3, log_every=4, val_every=4,
                         max_bad_fraction=max_bad_fraction)
    return train(task, train_ds, params, DS_FP32, collate_fn=Collate(clip.tokenizer),
                 val_dataset=val_ds)


def test_unreadable_images_are_skipped_and_recorded(data):
    root, frame = data
    result = _run(root, frame, max_bad_fraction=0.2)
    assert result.final_step == 8
    skipped = result.skipped
    assert set(skipped.columns) >= {"stage", "split", "step", "record_id", "path", "error"}
    assert set(skipped["stage"]) == {"bad"}
    train_rows = skipped[skipped["split"] == "train"]
    # 8 steps of 10 over 30 records: each corrupt training image is met about 2-3 times
    assert set(train_rows["record_id"]) == {"rec-5", "rec-17"}
    assert set(skipped[skipped["split"] == "val"]["record_id"]) == {"rec-33", "rec-36"}
    by_id = dict(zip(skipped["record_id"], skipped["error"]))
    assert "truncat" in by_id["rec-5"].lower()
    assert by_id["rec-17"].startswith(("UnidentifiedImageError", "OSError"))
    assert all(str(root / "sub") in path for path in skipped["path"])
    assert result.history["skipped_samples"].iloc[-1] == len(skipped)


def test_too_many_bad_samples_stop_the_run_naming_them(data):
    root, frame = data
    with pytest.raises(TooManyBadSamples, match=r"max_bad_fraction=0\.01.*rec-(5|17)"):
        _run(root, frame, max_bad_fraction=0.01)


def test_a_batch_keeps_its_size_and_a_resumed_run_reads_the_same_substitute(data):
    root, frame = data
    clip = create_teacher("TULIP-Tiny")
    dataset = CaptionImageDataset(frame.iloc[:30], root, clip.preprocess)
    sample = dataset[5]  # unreadable: record 6 takes its place
    assert sample["skipped"][0]["record_id"] == "rec-5"
    assert torch.equal(sample["image"], dataset[6]["image"])
    assert sample["long"] == dataset[6]["long"]


def test_unreadable_benchmark_images_are_left_out_with_their_texts_and_counted(tmp_path):
    """A truncated and a zero-byte JPEG in an Urban1k-layout benchmark and among ShareGPT4V-1k's
    validation images: the evaluate pipeline scores the rest, counts them in benchmark_issues
    (unreadable_image), lists them in skipped_samples and says so in the report."""
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.runner import SequentialRunner

    from tulip_pipelines.data.images import SKIPPED_COLUMNS as COLUMNS
    from tulip_pipelines.data.images import FolderImages
    from tulip_pipelines.models import build_student, stretch_position_embedding
    from tulip_pipelines.pipelines.evaluate import create_pipeline
    from tulip_pipelines.pipelines.evaluate.pipeline import SKIPPED_FROM

    urban = tmp_path / "urban"
    frame = write_images(urban, 8)
    (urban / "sub").rename(urban / "image")
    (urban / "caption").mkdir()
    for i in range(8):
        (urban / "caption" / f"{i}.txt").write_text(f"Caption of image {i}. " + "Words. " * 30)
    corrupt(urban / "image", frame.assign(image=frame["image"].str[4:]), truncated=2, empty=5)
    val_root = tmp_path / "val"
    val = write_images(val_root, 4)
    corrupt(val_root, val, truncated=0, empty=3)

    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    catalog = DataCatalog()
    models = {"teacher_model": teacher, "distilled_model": build_student(teacher, 248),
              "expanded_model": build_student(teacher, 248)}
    for name in ("longclip_authors_model", "longclip_equal_budget_model"):
        models[name] = stretch_position_embedding(teacher, 248, 20)
    for name, bundle in models.items():
        catalog[name] = MemoryDataset(bundle, copy_mode="assign")
    for stage in SKIPPED_FROM[:-1]:
        catalog[f"{stage}_skipped_samples"] = pd.DataFrame(columns=COLUMNS)
    catalog["val_captions"] = val
    catalog["prepared_images"] = FolderImages(val_root)
    catalog["params:evaluate"] = {
        "benchmarks": {"urban": {"format": "urban1k", "root": str(urban)},
                       "val": {"format": "sharegpt4v", "n": 4}},
        "ks": [1], "batch_size": 3, "bootstrap_resamples": 10, "tokens_read": [77]}
    for name in create_pipeline().all_outputs():
        catalog[name] = kept_memory_dataset()
    SequentialRunner().run(create_pipeline(), catalog)

    issues = catalog.load("benchmark_issues")
    unreadable = issues[issues["reason"] == "unreadable_image"]
    assert sorted(unreadable["item"]) == sorted(
        [str(urban / "image/2.jpg"), str(urban / "image/5.jpg"),
         str(val_root / "sub/0.jpg"), str(val_root / "sub/3.jpg")])
    assert unreadable["detail"].str.contains("1 texts left out").all()
    metrics = catalog.load("retrieval_metrics")
    n = metrics.groupby("benchmark")["n_queries"].unique()
    assert n["urban"].tolist() == [6] and n["val"].tolist() == [2]  # recall on the rest
    skipped = catalog.load("skipped_samples")
    assert len(skipped) == 4 and set(skipped["stage"]) == {"evaluate"}
    assert set(skipped["split"]) == {"urban", "val"}
    assert skipped.set_index("path").loc[str(urban / "image/2.jpg"), "error"].lower().count(
        "truncat") == 1
    report = catalog.load("retrieval_report")
    assert "- urban: 6 image queries, 6 text queries; left out: 2 unreadable_image" in report
    assert "recall is over the queries that remain" in report
