"""``distill`` (TULIP stage 1, relative position distillation): a RoPE student learns the frozen
teacher's text embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from tulip_pipelines.data.text import tulip_short_caption
from tulip_pipelines.models import ModelBundle, build_student, teacher_context_length
from tulip_pipelines.params import Problems
from tulip_pipelines.training.data import Collate
from tulip_pipelines.training.losses import DISTILL_LOSSES
from tulip_pipelines.training.stages.base import Built, StageInputs, StageParams
from tulip_pipelines.training.targets import DTYPES, TargetsRequest, WithTargets
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
    teacher_targets: str = "cached"  # cached: teacher_text_embeddings | live: the teacher each step
    target_dtype: str = "float16"
    target_batch_size: int = 256

    def check(self, problems: Problems) -> None:
        problems.one_of("rows", self.rows, DISTILL_ROWS)
        problems.one_of("teacher_targets", self.teacher_targets, ("cached", "live"))
        problems.one_of("target_dtype", self.target_dtype, DTYPES)
        problems.int_at_least("target_batch_size", self.target_batch_size, 1)
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
    windows = params.max_windows if params.teacher_input == "windows" else 0
    collate = Collate(model.tokenizer, teacher_tokenizer=teacher.tokenizer, windows=windows,
                      overlap=params.window_overlap)
    frames = distill_rows(params, inputs.frames)
    train_ds, val_ds = inputs.datasets(None, frames=frames)  # text only
    targets = inputs.targets
    if params.teacher_targets == "cached":
        if targets is None or not targets.cached:
            raise ValueError("distill.teacher_targets is cached but teacher_text_embeddings holds "
                             "no cache; run the embed_teacher_texts node first")
        expected = targets_request(params, teacher, inputs.frames).fingerprint()
        if targets.fingerprint != expected:
            raise ValueError(f"teacher_text_embeddings in {targets.folder} are stale (fingerprint "
                             f"{targets.fingerprint}, this teacher and these captions give "
                             f"{expected}); rerun the embed_teacher_texts node")
        train_ds = WithTargets(train_ds, targets.role("train"))
        val_ds = val_ds and WithTargets(val_ds, targets.role("val"))
        task = DistillTask(model.model, None, params.loss_type, params.teacher_input)
    else:
        task = DistillTask(model.model, teacher.model, params.loss_type, params.teacher_input)
    return Built(task, collate, train_ds, val_ds, model)


def distill_rows(params: DistillParams, frames: Mapping[str, pd.DataFrame]
                 ) -> dict[str, pd.DataFrame]:
    """The caption tables the student distils from, by role (with the short rows if asked)."""
    if params.rows == "long_and_short":
        return {role: with_short_rows(frame) for role, frame in frames.items()}
    return dict(frames)


def targets_request(params: DistillParams, teacher: ModelBundle,
                    frames: Mapping[str, pd.DataFrame]) -> TargetsRequest:
    """What ``teacher_text_embeddings`` must hold for these parameters, teacher and captions
    (no texts: the live mode, no cache)."""
    texts = None
    if params.teacher_targets == "cached":
        texts = {role: frame["caption"].tolist()
                 for role, frame in distill_rows(params, frames).items() if len(frame)}
    return TargetsRequest(teacher, texts, params.teacher_input, params.window_overlap,
                          params.max_windows, params.target_dtype, params.target_batch_size)


def with_short_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The captions table followed by one more row per record holding its short caption as
    TULIP's preprocessing writes it (ids get a ``#short`` suffix)."""
    short = frame.assign(id=frame["id"].astype(str) + "#short",
                         caption=frame["caption"].map(tulip_short_caption))
    return pd.concat([frame, short], ignore_index=True)
