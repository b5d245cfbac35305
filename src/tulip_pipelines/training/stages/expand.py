"""``expand`` (TULIP stage 2, relative position expansion): the distilled student fine-tuned
contrastively on long captions and their first sentence."""

from __future__ import annotations

from dataclasses import dataclass, field

from tulip_pipelines.models import expand_rope_context
from tulip_pipelines.params import Problems
from tulip_pipelines.training.data import Collate
from tulip_pipelines.training.stages.base import Built, StageInputs, StageParams
from tulip_pipelines.training.tasks import TOWERS, ContrastiveTask


@dataclass
class ContrastiveParams(StageParams):
    """The contrastive fine-tuning that expand and the Long-CLIP baseline share."""

    long_weight: float = 0.8
    short_weight: float = 0.2
    train_towers: list[str] = field(default_factory=lambda: list(TOWERS))
    local_loss: bool = False  # true: each process contrasts each micro batch alone

    def check(self, problems: Problems) -> None:
        problems.boolean("local_loss", self.local_loss)
        problems.number_in("long_weight", self.long_weight, 0)
        problems.number_in("short_weight", self.short_weight, 0)
        if self.long_weight == 0 and self.short_weight == 0:
            problems.add("long_weight", "and short_weight must not both be 0")
        problems.check(bool(self.train_towers) and set(self.train_towers) <= set(TOWERS),
                       "train_towers", f"must be a non-empty subset of {list(TOWERS)}, "
                                       f"got {self.train_towers!r}")


@dataclass
class ExpandParams(ContrastiveParams):
    section = "expand"

    context_length: int | None = None  # None: the distilled student's
    ntk_scale: float | None = None

    def check(self, problems: Problems) -> None:
        super().check(problems)
        problems.int_at_least("context_length", self.context_length, 2, optional=True)
        problems.number_in("ntk_scale", self.ntk_scale, 0, low_open=True, optional=True)


def contrastive_build(params: ContrastiveParams, inputs: StageInputs, model) -> Built:
    """Long and short captions against the images, for ``model``."""
    task = ContrastiveTask(model.model, params.long_weight, params.short_weight,
                           params.train_towers, local_loss=params.local_loss)
    collate = Collate(model.tokenizer, model.tokenizer)
    train_ds, val_ds = inputs.datasets(model.preprocess)
    return Built(task, collate, train_ds, val_ds, model)


def build(params: ExpandParams, inputs: StageInputs) -> Built:
    model = inputs.models["distilled"]
    if params.context_length and params.context_length != model.spec.context_length:
        model = expand_rope_context(model, params.context_length, params.ntk_scale)
    return contrastive_build(params, inputs, model)
