"""``longclip`` (the Long-CLIP baseline): the teacher with its position embedding stretched to 248,
fine-tuned with exactly expand's loss, steps, batch and learning rate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tulip_pipelines.models import stretch_position_embedding
from tulip_pipelines.params import Problems
from tulip_pipelines.training.stages.base import Built, StageInputs
from tulip_pipelines.training.stages.expand import (
    ContrastiveParams,
    ExpandParams,
    contrastive_build,
)

# what the baseline takes from params:expand (the budget), so that the two cannot drift apart
EXPAND_BUDGET = ("train", "long_weight", "short_weight", "train_towers", "num_processes",
                 "launcher")


@dataclass
class LongclipParams(ContrastiveParams):
    section = "longclip"

    context_length: int = 248
    keep: int = 20

    def check(self, problems: Problems) -> None:
        super().check(problems)
        problems.int_at_least("context_length", self.context_length, 2)
        problems.int_at_least("keep", self.keep, 0)

    @classmethod
    def with_budget(cls, own: Mapping[str, Any] | None,
                    expand: Mapping[str, Any] | None) -> "LongclipParams":
        """``params:longclip`` (only what differs: stretch and run dir) with expand's budget."""
        own = dict(own or {})
        taken = sorted(set(own) & set(EXPAND_BUDGET))
        if taken:
            raise ValueError(f"longclip parameter(s) {taken} come from expand (the baseline "
                             f"trains with expand's budget); set them in parameters_expand.yml")
        budget = ExpandParams.from_params(expand)
        return cls.from_params({**own, **{k: getattr(budget, k) for k in EXPAND_BUDGET}})

    @classmethod
    def from_all(cls, all_params: Mapping[str, Any]) -> "LongclipParams":
        return cls.with_budget(all_params.get("longclip"), all_params.get("expand"))


def build(params: LongclipParams, inputs: StageInputs) -> Built:
    model = stretch_position_embedding(inputs.models["teacher"], params.context_length,
                                       params.keep)
    return contrastive_build(params, inputs, model)
