"""Fixtures of the serving tests: a tiny 248-token TULIP student written as a model directory,
a caption of more than 200 tokens, and small images as encoded bytes."""

import io

import pytest
import torch
from PIL import Image

from tulip_pipelines.models import build_student, create_teacher, save_model

# 217 tokens with the start and end tokens (10 sentences of 14 tokens, 5 of 15): more than
# 200, within the student's 248
LONG = " ".join(f"In cell {i} there is a small red circle with a striped fill."
                for i in range(15))
# 302 tokens: 'a' is one token
TOO_LONG = " ".join(["a"] * 300)
SHORT = "A blue square on a grey background."


def write_model_dir(folder):
    """A TULIP-Tiny student (context 248, seed 0) saved as a model directory."""
    torch.manual_seed(0)
    student = build_student(create_teacher("TULIP-Tiny"), context_length=248)
    path = folder / "expanded_model"
    save_model(student, path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("models"))


def image_bytes(colour, size=(40, 52), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, colour)
    image.paste((255, 255, 255), (4, 4, 20, 20))  # not flat: the preprocess crop matters
    image.save(buffer, format=fmt)
    return buffer.getvalue()
