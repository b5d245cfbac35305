"""The training stages, registered by name with their parameter class and builder.

``teacher`` (embedded default only), ``distill`` and ``expand`` (TULIP's two stages) and the
two Long-CLIP baselines ``longclip_authors`` and ``longclip_equal_budget`` (both from the
``longclip`` pipeline and its :class:`LongclipParams`). :func:`run_job` trains one; the
launched ranks of a multi-process run rebuild the same job with :func:`build_job` from the
inputs saved on disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from tulip_pipelines.data.images import image_source_from_dict
from tulip_pipelines.models import load_bundle
from tulip_pipelines.training.launch import TrainJob
from tulip_pipelines.training.stages import distill, expand, longclip, teacher
from tulip_pipelines.training.stages.base import Stage, StageInputs, StageParams, run_job
from tulip_pipelines.training.stages.distill import DistillParams
from tulip_pipelines.training.stages.expand import ExpandParams
from tulip_pipelines.training.stages.longclip import (
    LongclipAuthorsParams,
    LongclipEqualBudgetParams,
    LongclipParams,
)
from tulip_pipelines.training.stages.teacher import TeacherParams
from tulip_pipelines.training.targets import TeacherTargets

STAGES: dict[str, Stage] = {
    "teacher": Stage("teacher", TeacherParams, teacher.build),
    "distill": Stage("distill", DistillParams, distill.build),
    "expand": Stage("expand", ExpandParams, expand.build),
    "longclip_authors": Stage("longclip_authors", LongclipAuthorsParams, longclip.build),
    "longclip_equal_budget": Stage("longclip_equal_budget", LongclipEqualBudgetParams,
                                   longclip.build),
}


def build_job(spec: Mapping[str, Any]) -> TrainJob:
    """Per-rank builder for :func:`tulip_pipelines.training.launch.run_distributed`."""
    stage = STAGES[spec["stage"]]
    params = stage.params_cls(**spec["params"])
    inputs = StageInputs(
        models={k: load_bundle(v) for k, v in spec["models"].items()},
        frames={k: pd.read_parquet(v) for k, v in spec["frames"].items()},
        images=image_source_from_dict(spec["images"]),
        targets=TeacherTargets(spec["targets"]) if spec.get("targets") else None,
    )
    job, _ = stage.job(params, inputs, spec["ds_config"])
    return job


__all__ = ["STAGES", "DistillParams", "ExpandParams", "LongclipParams", "Stage", "StageInputs",
           "StageParams", "TeacherParams", "build_job", "run_job"]
# the parameter class of each pipeline that trains (config_checks.py); longclip's covers two stages
PIPELINE_PARAMS = {"teacher": TeacherParams, "distill": DistillParams, "expand": ExpandParams,
                   "longclip": LongclipParams}
