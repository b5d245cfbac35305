"""Nodes of the distill pipeline (TULIP stage 1: relative position distillation)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd

from tulip_pipelines.data.images import ImageSource
from tulip_pipelines.models import ModelBundle
from tulip_pipelines.training.stages import DistillParams, StageInputs
from tulip_pipelines.training.stages.base import run_stage
from tulip_pipelines.training.stages.distill import embeddings_request
from tulip_pipelines.training.teacher_embeddings import (
    TeacherTextEmbeddingsPart,
    compute_teacher_text_embeddings,
)


def embed_teacher_texts(teacher_model: ModelBundle, train_captions: pd.DataFrame,
                        val_captions: pd.DataFrame, params: dict[str, Any],
                        teacher_text_embeddings_progress: dict[str, Any]
                        ) -> Iterator[TeacherTextEmbeddingsPart]:
    """The frozen teacher's text embedding of every row the student distils from, part by part
    (``teacher_text_embeddings`` stores each as it comes); what is already written
    (``teacher_text_embeddings_progress``) is reused while teacher and captions are unchanged."""
    request = embeddings_request(DistillParams.from_params(params), teacher_model,
                                 {"train": train_captions, "val": val_captions})
    yield from compute_teacher_text_embeddings(request, teacher_text_embeddings_progress)


def distill(teacher_model: ModelBundle, teacher_text_embeddings, train_captions: pd.DataFrame,
            val_captions: pd.DataFrame, params: dict[str, Any], ds_config: dict[str, Any],
            images: ImageSource):
    """Distil the frozen teacher's text embeddings into a RoPE student."""
    stage_params = DistillParams.from_params(params)  # before touching any input
    inputs = StageInputs({"teacher": teacher_model},
                         {"train": train_captions, "val": val_captions}, images,
                         teacher_text_embeddings=teacher_text_embeddings)
    return run_stage("distill", stage_params, inputs, ds_config, parent=teacher_model)
