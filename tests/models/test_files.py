"""Model directories (models/files.py): a saved model loads back identical; a missing one is a
clear error."""


import pytest
import torch

from tests.models.conftest import LONG
from tulip_pipelines.models import (
    load_bundle,
    load_model,
    save_model,
)


def test_save_load_round_trip_is_identical(student, tmp_path):
    save_model(student, tmp_path / "ckpt")
    model, preprocess, tokenizer = load_model(tmp_path / "ckpt")
    tok = tokenizer([LONG, "short"])
    image = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model.encode_text(tok), student.model.encode_text(tok))
        assert torch.equal(model.encode_image(image), student.model.encode_image(image))
    assert load_bundle(tmp_path / "ckpt").spec == student.spec


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_bundle(tmp_path / "nothing")
