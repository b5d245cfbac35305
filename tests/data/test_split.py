"""Train/validation split."""

from __future__ import annotations

import pandas as pd
import pytest

from tulip_pipelines.data.split import SplitParams, split_captions


def captions(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "image": [f"coco/{i}.jpg" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "source": ["coco"] * n,
            "n_chars": [len(f"caption {i}") for i in range(n)],
        },
        index=range(100, 100 + n),  # a non-default index must not leak into the outputs
    )


def test_first_records_are_validation_in_order():
    train, val = split_captions(captions(10), SplitParams(val_size=3))
    assert list(val["id"]) == ["r0", "r1", "r2"]
    assert list(train["id"]) == [f"r{i}" for i in range(3, 10)]
    assert list(train.index) == list(range(7)) and list(val.index) == [0, 1, 2]
    assert list(train.columns) == list(captions(1).columns)


def test_max_train_caps_training_records_only():
    train, val = split_captions(captions(10), SplitParams(val_size=2, max_train=4))
    assert list(train["id"]) == ["r2", "r3", "r4", "r5"]
    assert len(val) == 2
    train, _ = split_captions(captions(10), SplitParams(val_size=2, max_train=100))
    assert len(train) == 8


def test_default_is_the_papers_1000():
    assert SplitParams().val_size == 1000
    train, val = split_captions(captions(1500), SplitParams())
    assert (len(train), len(val)) == (500, 1000)


def test_val_size_must_leave_training_data():
    with pytest.raises(ValueError, match=r"val_size=5 .* only 5 records"):
        split_captions(captions(5), SplitParams(val_size=5))


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"val_size": 0}, "val_size"),
        ({"val_size": "10"}, "val_size"),
        ({"val_size": True}, "val_size"),
        ({"max_train": -1}, "max_train"),
        ({"val_sise": 10}, "val_sise"),
    ],
)
def test_config_errors_name_the_field(params, match):
    with pytest.raises(ValueError, match=match):
        SplitParams.from_params(params)


@pytest.mark.parametrize("name, accepted, rejected", [
    ("val_size", [1], [0]), ("max_train", [1, None], [0])])
def test_each_bound_accepts_its_edge_and_rejects_one_step_past(name, accepted, rejected):
    from tests.bounds import assert_bounds

    assert_bounds(SplitParams, name, accepted, rejected)
