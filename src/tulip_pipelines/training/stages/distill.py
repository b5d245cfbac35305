"""``distill`` (TULIP stage 1, relative position distillation): a RoPE student learns the frozen
teacher's text embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from tulip_pipelines.data.text import tulip_short_caption
from tulip_pipelines.models import build_student, teacher_context_length
from tulip_pipelines.params import Problems
from tulip_pipelines.training.data import Collate
from tulip_pipelines.training.losses import DISTILL_LOSSES
from tulip_pipelines.training.stages.base import Built, StageInputs, StageParams
from tulip_pipelines.training.tasks import TEACHER_INPUTS, DistillTask

DISTILL_ROWS = ("long", "long_and_short")


@dataclass
class DistillParams(StageParams):
    section = "distill"

    context_length: int = 248
    rope_theta: float = 10000.0
    activation: str | None = None
    loss_type: str = "cosine"
    teacher_input: str = "tokens"  # tokens | windows
    window_overlap: int = 20
    max_windows: int = 5
    rows: str = "long_and_short"  # TULIP distils the long caption and `caption.split('.')[0] + '.'`

    def check(self, problems: Problems) -> None:
        problems.one_of("rows", self.rows, DISTILL_ROWS)
        problems.int_at_least("context_length", self.context_length, 2)
        problems.number_in("rope_theta", self.rope_theta, 1, low_open=True)
        problems.one_of("activation", self.activation, (None, "gelu", "quick_gelu"))
        problems.one_of("loss_type", self.loss_type, DISTILL_LOSSES)
        problems.one_of("teacher_input", self.teacher_input, TEACHER_INPUTS)
        problems.int_at_least("window_overlap", self.window_overlap, 0)
        problems.int_at_least("max_windows", self.max_windows, 1)

    def check_with(self, all_params: Mapping[str, Any]) -> None:
        """The student reads at least as many tokens as the teacher it learns from."""
        teacher = all_params.get("teacher") or {}
        if "model_name" in teacher:
            context = teacher_context_length(teacher["model_name"])
            if self.context_length < context:
                raise ValueError(f"distill.context_length {self.context_length} is shorter than "
                                 f"the teacher's {context}")


def build(params: DistillParams, inputs: StageInputs) -> Built:
    teacher = inputs.models["teacher"]
    model = build_student(teacher, params.context_length, params.rope_theta, params.activation)
    task = DistillTask(model.model, teacher.model, params.loss_type, params.teacher_input)
    windows = params.max_windows if params.teacher_input == "windows" else 0
    collate = Collate(model.tokenizer, teacher_tokenizer=teacher.tokenizer, windows=windows,
                      overlap=params.window_overlap)
    frames = inputs.frames
    if params.rows == "long_and_short":
        frames = {role: with_short_rows(frame) for role, frame in frames.items()}
    train_ds, val_ds = inputs.datasets(None, frames=frames)  # text only
    return Built(task, collate, train_ds, val_ds, model)


def with_short_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The captions table followed by one more row per record holding its short caption as
    TULIP's preprocessing writes it (ids get a ``#short`` suffix)."""
    short = frame.assign(id=frame["id"].astype(str) + "#short",
                         caption=frame["caption"].map(tulip_short_caption))
    return pd.concat([frame, short], ignore_index=True)
