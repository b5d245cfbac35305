"""Nodes of the longclip pipeline: the two Long-CLIP baselines (the authors' recipe, and TULIP's
stage-2 budget with only the position scheme changed)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tulip_pipelines.data.images import ImageSource
from tulip_pipelines.models import ModelBundle
from tulip_pipelines.training.stages import LongclipParams, StageInputs
from tulip_pipelines.training.stages.base import run_stage


def finetune_longclip_authors(teacher_model: ModelBundle, train_captions: pd.DataFrame,
                              val_captions: pd.DataFrame, params: dict[str, Any],
                              ds_config: dict[str, Any], images: ImageSource):
    """Stretch the teacher's positions to 248 and fine-tune with Long-CLIP's own recipe."""
    recipe = LongclipParams.from_params(params).recipe("authors")
    return _finetune("longclip_authors", recipe, teacher_model, train_captions, val_captions,
                     ds_config, images)


def finetune_longclip_equal_budget(teacher_model: ModelBundle, train_captions: pd.DataFrame,
                                   val_captions: pd.DataFrame, params: dict[str, Any],
                                   expand_params: dict[str, Any], ds_config: dict[str, Any],
                                   images: ImageSource):
    """Stretch the teacher's positions to 248 and fine-tune with expand's loss and budget."""
    recipe = LongclipParams.from_params(params).recipe("equal_budget", expand_params)
    return _finetune("longclip_equal_budget", recipe, teacher_model, train_captions,
                     val_captions, ds_config, images)


def _finetune(stage, recipe, teacher_model, train_captions, val_captions, ds_config, images):
    inputs = StageInputs({"teacher": teacher_model},
                         {"train": train_captions, "val": val_captions}, images)
    return run_stage(stage, recipe, inputs, ds_config, parent=teacher_model)
