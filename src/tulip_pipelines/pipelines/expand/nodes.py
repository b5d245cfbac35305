"""Node of the expand pipeline (TULIP stage 2: relative position expansion)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tulip_pipelines.data.images import ImageSource
from tulip_pipelines.models import ModelBundle
from tulip_pipelines.training.stages import ExpandParams, StageInputs
from tulip_pipelines.training.stages.base import run_stage


def expand(distilled_model: ModelBundle, teacher_model: ModelBundle, train_captions: pd.DataFrame,
           val_captions: pd.DataFrame, params: dict[str, Any], ds_config: dict[str, Any],
           images: ImageSource):
    """Fine-tune the distilled student contrastively on long and short captions (starting from
    the teacher's text projection, as TULIP does, unless ``text_projection: distilled``)."""
    stage_params = ExpandParams.from_params(params)  # before touching any input
    inputs = StageInputs({"distilled": distilled_model, "teacher": teacher_model},
                         {"train": train_captions, "val": val_captions}, images)
    return run_stage("expand", stage_params, inputs, ds_config, parent=distilled_model)
