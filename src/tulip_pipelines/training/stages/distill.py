"""``distill`` (TULIP stage 1, relative position distillation): a RoPE student learns the frozen
teacher's text embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from tulip_pipelines.models import ModelBundle, build_student, teacher_context_length
from tulip_pipelines.models.device import check_placement
from tulip_pipelines.params import Problems
from tulip_pipelines.training.datasets import Collate, tulip_short_caption
from tulip_pipelines.training.job import TrainJob
from tulip_pipelines.training.stages.base import StageInputs, StageParams, stage_job
from tulip_pipelines.training.tasks import DISTILL_LOSSES, TEACHER_INPUTS, DistillTask
from tulip_pipelines.training.teacher_embeddings import (
    DTYPES,
    TeacherTextEmbeddingsRequest,
    WithTeacherTextEmbeddings,
)

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
    teacher_embeddings: str = "cached"  # cached: teacher_text_embeddings | live: each step
    embedding_dtype: str = "float16"
    embedding_batch_size: int = 256
    embedding_device: str = "auto"  # where the teacher embeds (auto: the accelerator if any)
    embedding_autocast: str | None = "bf16"  # on an accelerator; null: float32
    embedding_processes: int | None = None  # null: one per GPU of the node (auto), else 1
    registered_model_name: str | None = "tulip-distilled"

    def check(self, problems: Problems) -> None:
        problems.one_of("rows", self.rows, DISTILL_ROWS)
        problems.one_of("teacher_embeddings", self.teacher_embeddings, ("cached", "live"))
        problems.one_of("embedding_dtype", self.embedding_dtype, DTYPES)
        problems.int_at_least("embedding_batch_size", self.embedding_batch_size, 1)
        check_placement(problems, "embedding_device", self.embedding_device,
                        "embedding_autocast", self.embedding_autocast)
        problems.int_at_least("embedding_processes", self.embedding_processes, 1, optional=True)
        problems.int_at_least("context_length", self.context_length, 2)
        problems.number_in("rope_theta", self.rope_theta, 1, low_open=True)
        problems.one_of("activation", self.activation, (None, "gelu", "quick_gelu"))
        problems.one_of("loss_type", self.loss_type, DISTILL_LOSSES)
        problems.one_of("teacher_input", self.teacher_input, TEACHER_INPUTS)
        problems.int_at_least("window_overlap", self.window_overlap, 0)
        problems.int_at_least("max_windows", self.max_windows, 1)

    def loss_kind(self) -> str:
        return f"distill_{self.loss_type}"  # a distance to the teacher's embedding

    def check_with(self, all_params: Mapping[str, Any]) -> None:
        """The student reads at least as many tokens as the teacher it learns from."""
        teacher = all_params.get("teacher") or {}
        if "model_name" in teacher:
            context = teacher_context_length(teacher["model_name"])
            if self.context_length < context:
                raise ValueError(f"distill.context_length {self.context_length} is shorter than "
                                 f"the teacher's {context}")


def build(params: DistillParams, inputs: StageInputs) -> TrainJob:
    teacher = inputs.models["teacher"]
    model = build_student(teacher, params.context_length, params.rope_theta, params.activation)
    windows = params.max_windows if params.teacher_input == "windows" else 0
    collate = Collate(model.tokenizer, teacher_tokenizer=teacher.tokenizer, windows=windows,
                      overlap=params.window_overlap)
    frames = distill_rows(params, inputs.frames)
    train_ds, val_ds = inputs.datasets(None, frames=frames)  # text only
    cache = inputs.teacher_text_embeddings
    if params.teacher_embeddings == "cached":
        if cache is None or not cache.cached:
            raise ValueError("distill.teacher_embeddings is cached but teacher_text_embeddings "
                             "holds no cache; run the embed_teacher_texts node first")
        expected = embeddings_request(params, teacher, inputs.frames).cache_key()
        if cache.cache_key != expected:
            raise ValueError(f"teacher_text_embeddings in {cache.folder} are stale (cache key "
                             f"{cache.cache_key}, this teacher and these captions give "
                             f"{expected}); rerun the embed_teacher_texts node")
        train_ds = WithTeacherTextEmbeddings(train_ds, cache.role("train"))
        val_ds = val_ds and WithTeacherTextEmbeddings(val_ds, cache.role("val"))
        task = DistillTask(model.model, None, params.loss_type, params.teacher_input)
    else:
        task = DistillTask(model.model, teacher.model, params.loss_type, params.teacher_input)
    return stage_job(params, inputs, task=task, collate=collate, train_dataset=train_ds,
                     val_dataset=val_ds, model=model)


def distill_rows(params: DistillParams, frames: Mapping[str, pd.DataFrame]
                 ) -> dict[str, pd.DataFrame]:
    """The caption tables the student distils from, by role (with the short rows if asked)."""
    if params.rows == "long_and_short":
        return {role: with_short_rows(frame) for role, frame in frames.items()}
    return dict(frames)


def embeddings_request(params: DistillParams, teacher: ModelBundle,
                       frames: Mapping[str, pd.DataFrame]) -> TeacherTextEmbeddingsRequest:
    """What ``teacher_text_embeddings`` must hold for these parameters, teacher and captions
    (no texts: the live mode, no cache)."""
    texts = None
    if params.teacher_embeddings == "cached":
        texts = {role: frame["caption"].tolist()
                 for role, frame in distill_rows(params, frames).items() if len(frame)}
    return TeacherTextEmbeddingsRequest(teacher, texts, params.teacher_input, params.window_overlap,
                                    params.max_windows, params.embedding_dtype,
                                    params.embedding_batch_size, params.embedding_device,
                                    params.embedding_autocast, params.embedding_processes)


def with_short_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The captions table followed by one more row per record holding its short caption as
    TULIP's preprocessing writes it (ids get a ``#short`` suffix)."""
    short = frame.assign(id=frame["id"].astype(str) + "#short",
                         caption=frame["caption"].map(tulip_short_caption))
    return pd.concat([frame, short], ignore_index=True)
