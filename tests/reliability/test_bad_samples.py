"""Bad samples never stop a run and are never silent: a truncated and a zero-byte JPEG among the
training and validation images are skipped (the next readable record takes their place) and
recorded with stage, split, record id, path and error; beyond max_bad_fraction the run stops,
listing the first offenders."""

import pytest
import torch

from tests.conftest import DS_FP32
from tests.image_helpers import write_images
from tulip_pipelines.models import create_teacher
from tulip_pipelines.training.config import TrainParams
from tulip_pipelines.training.data import CaptionImageDataset, Collate
from tulip_pipelines.training.engine import train
from tulip_pipelines.training.skipped import TooManyBadSamples
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
