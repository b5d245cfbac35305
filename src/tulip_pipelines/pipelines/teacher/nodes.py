"""Node of the teacher pipeline (embedded default only)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tulip_pipelines.training.stages import TeacherParams, run_stage


def train_teacher(train_captions: pd.DataFrame, val_captions: pd.DataFrame, shuffled_captions: pd.DataFrame,
                  params: dict[str, Any], ds_config: dict[str, Any], image_root: str):
    """Train a CLIP from scratch (77-token absolute positions) on sentence-shuffled captions."""
    model, result, figure = run_stage(
        "teacher", TeacherParams.from_params(params, "teacher"), bundles={},
        frames={"train": train_captions, "val": val_captions, "shuffled": shuffled_captions},
        image_root=image_root, ds_config=ds_config,
    )
    return model, result.history, figure
