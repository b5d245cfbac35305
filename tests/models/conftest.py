"""Fixtures of the model tests: a TULIP-Tiny teacher (seed 0), its 248-token student, and a
caption longer than 248 tokens."""

import pytest
import torch

from tulip_pipelines.models import build_student, create_teacher

LONG = " ".join(f"In cell {i} there is a small red circle with a striped fill." for i in range(40))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return create_teacher("TULIP-Tiny")


@pytest.fixture(scope="module")
def student(teacher):
    return build_student(teacher, context_length=248)
