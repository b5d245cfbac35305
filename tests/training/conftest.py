"""Fixtures of the training tests: a TULIP-Tiny teacher and its student, a small tree of images
prepared into shards."""

import pytest
import torch

from tests.image_helpers import write_images
from tulip_pipelines.data.prepare import PrepareImagesParams, prepare_images
from tulip_pipelines.data.shards import Encoding
from tulip_pipelines.models import build_student, create_teacher

N_VAL, N_TRAIN = 8, 40


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    frame = write_images(root / "images", N_VAL + N_TRAIN)
    val, train = frame.iloc[:N_VAL], frame.iloc[N_VAL:].reset_index(drop=True)
    params = PrepareImagesParams(output_dir=str(root / "out"), shard_size=8, num_workers=0)
    source = prepare_images(train, val, root / "images", params,
                            Encoding(48, 95, "4:4:4")).source
    return {"root": root, "train": train, "val": val, "source": source}


@pytest.fixture(scope="module")
def tiny():
    """A TULIP-Tiny teacher (seed 0) and its 248-token RoPE student."""
    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    return teacher, build_student(teacher, 248)
