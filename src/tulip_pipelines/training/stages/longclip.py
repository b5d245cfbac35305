"""The Long-CLIP baselines: the teacher with its position embedding stretched to 248 (first 20
rows kept, the rest interpolated 4x), fine-tuned with the kept rows frozen. Two recipes, two
stages:

``longclip_authors``: Long-CLIP's own loss and budget (``params:longclip.authors``): long and
short captions weighted 1:1, the short ones against the image features' primary components,
label smoothing 0.1, a fresh unclamped logit scale, AdamW decaying every parameter.
``longclip_equal_budget``: TULIP's stage-2 loss, budget and data (``params:expand``); only the
position scheme differs from TULIP's expand stage, the controlled comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tulip_pipelines.models import stretch_position_embedding
from tulip_pipelines.models.longclip import freeze_kept_positions, merge_kept_positions
from tulip_pipelines.params import Params, Problems
from tulip_pipelines.training.job import TrainJob
from tulip_pipelines.training.stages.base import StageInputs
from tulip_pipelines.training.stages.expand import (
    ContrastiveParams,
    ExpandParams,
    contrastive_build,
)

RECIPES = ("authors", "equal_budget")
# what the equal-budget baseline takes from params:expand, so that the two cannot drift apart
EXPAND_BUDGET = ("train", "long_weight", "short_weight", "short_caption", "train_towers",
                 "label_smoothing", "short_image_components", "max_logit_scale",
                 "contrastive_batch", "train_augment", "num_processes", "launcher")
# what both recipes take from params:longclip itself (the position scheme)
POSITION_SCHEME = ("context_length", "keep", "freeze_kept")


@dataclass
class LongclipRecipeParams(ContrastiveParams):
    """One Long-CLIP baseline's training parameters (built by :class:`LongclipParams`)."""

    context_length: int = 248
    keep: int = 20
    freeze_kept: bool = True
    init_logit_scale: float | None = None  # Long-CLIP: a fresh ln(100) = 4.6052

    def check(self, problems: Problems) -> None:
        super().check(problems)
        problems.int_at_least("context_length", self.context_length, 2)
        problems.int_at_least("keep", self.keep, 0)
        problems.boolean("freeze_kept", self.freeze_kept)
        problems.number_in("init_logit_scale", self.init_logit_scale, optional=True)


@dataclass
class LongclipAuthorsParams(LongclipRecipeParams):
    section = "longclip_authors"

    registered_model_name: str | None = "longclip-authors"

    def loss_kind(self) -> str:
        return "longclip_contrastive"  # label smoothing, short captions on 32 components


@dataclass
class LongclipEqualBudgetParams(LongclipRecipeParams):
    section = "longclip_equal_budget"

    registered_model_name: str | None = "longclip-equal-budget"


@dataclass
class LongclipParams(Params):
    """``params:longclip``: the position scheme both baselines share, and each recipe's block
    (``authors``: its whole loss and budget; ``equal_budget``: only its run dir and registered
    model name, the rest comes from ``params:expand``)."""

    section = "longclip"

    context_length: int = 248
    keep: int = 20
    freeze_kept: bool = True
    authors: dict[str, Any] = field(default_factory=dict)
    equal_budget: dict[str, Any] = field(default_factory=dict)

    def recipe(self, name: str, expand: Mapping[str, Any] | None = None) -> LongclipRecipeParams:
        scheme = {key: getattr(self, key) for key in POSITION_SCHEME}
        if name == "authors":
            taken = sorted(set(self.authors) & set(POSITION_SCHEME))
            if taken:
                raise ValueError(f"longclip.authors: {taken} are set once for both baselines, "
                                 f"directly under longclip")
            return LongclipAuthorsParams.from_params({**self.authors, **scheme})
        if name == "equal_budget":
            taken = sorted(set(self.equal_budget) - {"run_dir", "registered_model_name"})
            if taken:
                raise ValueError(f"longclip.equal_budget: {taken} come from expand (this baseline "
                                 f"trains with expand's loss and budget); only run_dir and "
                                 f"registered_model_name are its own")
            budget = ExpandParams.from_params(expand)
            own = {key: getattr(budget, key) for key in EXPAND_BUDGET}
            return LongclipEqualBudgetParams.from_params({**own, **self.equal_budget, **scheme})
        raise ValueError(f"unknown Long-CLIP recipe {name!r}; one of {RECIPES}")

    @classmethod
    def from_all(cls, all_params: Mapping[str, Any]) -> "LongclipParams":
        """Built from ``params:longclip`` with both recipes checked (equal_budget reads expand)."""
        out = cls.from_params(all_params.get(cls.section))
        out._recipes = [out.recipe(name, all_params.get("expand")) for name in RECIPES]
        return out

    def run_dirs(self) -> list[str]:
        return [recipe.stage_run_dir for recipe in getattr(self, "_recipes", [])]


def build(params: LongclipRecipeParams, inputs: StageInputs) -> TrainJob:
    model = stretch_position_embedding(inputs.models["teacher"], params.context_length,
                                       params.keep)
    if params.init_logit_scale is not None:
        with torch.no_grad():
            model.model.logit_scale.fill_(params.init_logit_scale)
    finish = None
    if params.freeze_kept:
        model, finish = freeze_kept_positions(model, params.keep), merge_kept_positions
    return contrastive_build(params, inputs, model, finish)
