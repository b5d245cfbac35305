"""Node of the longclip pipeline (the Long-CLIP baseline at expand's budget)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tulip_pipelines.data.images import ImageSource
from tulip_pipelines.models import ModelBundle
from tulip_pipelines.tracking import train_stage
from tulip_pipelines.training.stages import LongclipParams, StageInputs


def finetune_longclip(teacher_model: ModelBundle, train_captions: pd.DataFrame,
                      val_captions: pd.DataFrame, params: dict[str, Any],
                      expand_params: dict[str, Any], ds_config: dict[str, Any],
                      images: ImageSource):
    """Stretch the teacher's positions to 248 (Long-CLIP) and fine-tune with expand's budget."""
    stage_params = LongclipParams.with_budget(params, expand_params)
    inputs = StageInputs({"teacher": teacher_model},
                         {"train": train_captions, "val": val_captions}, images)
    return train_stage("longclip", stage_params, inputs, ds_config, parent=teacher_model)
