"""Nodes of the distill pipeline (TULIP stage 1: relative position distillation)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tulip_pipelines.data.images import ImageSource
from tulip_pipelines.models import ModelBundle
from tulip_pipelines.tracking import train_stage
from tulip_pipelines.training.stages import DistillParams, StageInputs
from tulip_pipelines.training.stages.distill import targets_request


def embed_teacher_texts(teacher_model: ModelBundle, train_captions: pd.DataFrame,
                        val_captions: pd.DataFrame, params: dict[str, Any]):
    """The frozen teacher's targets for every row the student distils from, written once by the
    ``teacher_text_embeddings`` dataset (reused while teacher and captions are unchanged)."""
    return targets_request(DistillParams.from_params(params), teacher_model,
                           {"train": train_captions, "val": val_captions})


def distill(teacher_model: ModelBundle, teacher_text_embeddings, train_captions: pd.DataFrame,
            val_captions: pd.DataFrame, params: dict[str, Any], ds_config: dict[str, Any],
            images: ImageSource):
    """Distil the frozen teacher's text embeddings into a RoPE student."""
    stage_params = DistillParams.from_params(params)  # before touching any input
    inputs = StageInputs({"teacher": teacher_model},
                         {"train": train_captions, "val": val_captions}, images,
                         targets=teacher_text_embeddings)
    return train_stage("distill", stage_params, inputs, ds_config, parent=teacher_model)
