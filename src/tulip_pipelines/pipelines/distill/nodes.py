"""Node of the distill pipeline (TULIP stage 1: relative position distillation)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tulip_pipelines.models import ModelBundle
from tulip_pipelines.tracking import lineage
from tulip_pipelines.training.stages import DistillParams, run_stage


def distill(teacher_model: ModelBundle, train_captions: pd.DataFrame, val_captions: pd.DataFrame,
            params: dict[str, Any], ds_config: dict[str, Any], image_root: str):
    """Distil the frozen teacher's text embeddings into a RoPE student."""
    stage_params = DistillParams.from_params(params, "distill")  # before touching any input
    tags, source = lineage(teacher_model)
    model, result, figure = run_stage(
        "distill", stage_params, bundles={"teacher": teacher_model},
        frames={"train": train_captions, "val": val_captions}, image_root=image_root, ds_config=ds_config,
        extra=source, tags=tags,
    )
    return model, result.history, figure
