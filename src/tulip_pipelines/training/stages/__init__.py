"""The training stages, registered by name with their parameter class and builder.

``teacher`` (embedded default only), ``distill`` and ``expand`` (TULIP's two stages) and the
two Long-CLIP baselines ``longclip_authors`` and ``longclip_equal_budget`` (both from the
``longclip`` pipeline and its :class:`LongclipParams`). :func:`.base.run_stage` runs one.
"""

from __future__ import annotations

from tulip_pipelines.training.stages import distill, expand, longclip, teacher
from tulip_pipelines.training.stages.base import Stage, StageInputs, StageParams
from tulip_pipelines.training.stages.distill import DistillParams
from tulip_pipelines.training.stages.expand import ExpandParams
from tulip_pipelines.training.stages.longclip import (
    LongclipAuthorsParams,
    LongclipEqualBudgetParams,
    LongclipParams,
)
from tulip_pipelines.training.stages.teacher import TeacherParams

STAGES: dict[str, Stage] = {
    "teacher": Stage("teacher", TeacherParams, teacher.build),
    "distill": Stage("distill", DistillParams, distill.build),
    "expand": Stage("expand", ExpandParams, expand.build),
    "longclip_authors": Stage("longclip_authors", LongclipAuthorsParams, longclip.build),
    "longclip_equal_budget": Stage("longclip_equal_budget", LongclipEqualBudgetParams,
                                   longclip.build),
}


__all__ = ["STAGES", "DistillParams", "ExpandParams", "LongclipParams", "Stage", "StageInputs",
           "StageParams", "TeacherParams"]
# the parameter class of each pipeline that trains (params_checks.py); longclip's covers two stages
PIPELINE_PARAMS = {"teacher": TeacherParams, "distill": DistillParams, "expand": ExpandParams,
                   "longclip": LongclipParams}

