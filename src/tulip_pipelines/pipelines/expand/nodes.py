"""Node of the expand pipeline (TULIP stage 2: relative position expansion)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tulip_pipelines.models import ModelBundle
from tulip_pipelines.tracking import lineage
from tulip_pipelines.training.stages import ExpandParams, run_stage


def expand(distilled_model: ModelBundle, train_captions: pd.DataFrame, val_captions: pd.DataFrame,
           params: dict[str, Any], ds_config: dict[str, Any], image_root: str):
    """Fine-tune the distilled student contrastively on long and short captions."""
    stage_params = ExpandParams.from_params(params, "expand")  # before touching any input
    tags, source = lineage(distilled_model)
    model, result, figure = run_stage(
        "expand", stage_params, bundles={"distilled": distilled_model},
        frames={"train": train_captions, "val": val_captions}, image_root=image_root, ds_config=ds_config,
        extra=source, tags=tags,
    )
    return model, result.history, figure
