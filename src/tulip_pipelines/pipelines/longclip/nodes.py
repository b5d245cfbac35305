"""Node of the longclip pipeline (the Long-CLIP baseline at expand's budget)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tulip_pipelines.models import ModelBundle
from tulip_pipelines.tracking import lineage
from tulip_pipelines.training.stages import ExpandParams, LongclipParams, run_stage


def finetune_longclip(teacher_model: ModelBundle, train_captions: pd.DataFrame, val_captions: pd.DataFrame,
                      params: dict[str, Any], expand_params: dict[str, Any], ds_config: dict[str, Any],
                      image_root: str):
    """Stretch the teacher's positions to 248 (Long-CLIP) and fine-tune with expand's recipe."""
    own = LongclipParams.from_params(params)
    budget = ExpandParams.from_params(expand_params, "expand")
    budget.context_length = None  # the stretched model's own length
    tags, source = lineage(teacher_model)
    model, result, figure = run_stage(
        "longclip", budget, bundles={"teacher": teacher_model},
        frames={"train": train_captions, "val": val_captions}, image_root=image_root, ds_config=ds_config,
        extra={"context_length": own.context_length, "keep": own.keep, **source},
        tags=tags,
    )
    return model, result.history, figure
