"""Node of the teacher pipeline (embedded default only)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tulip_pipelines.data.images import ImageSource
from tulip_pipelines.training.stages import StageInputs, TeacherParams
from tulip_pipelines.training.stages.base import run_stage


def train_teacher(train_captions: pd.DataFrame, val_captions: pd.DataFrame,
                  shuffled_captions: pd.DataFrame, params: dict[str, Any],
                  ds_config: dict[str, Any], images: ImageSource):
    """Train a CLIP from scratch (77-token absolute positions) on sentence-shuffled captions."""
    inputs = StageInputs({}, {"train": train_captions, "val": val_captions,
                              "shuffled": shuffled_captions}, images)
    return run_stage("teacher", TeacherParams.from_params(params), inputs, ds_config)
