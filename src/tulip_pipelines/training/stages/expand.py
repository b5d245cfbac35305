"""``expand`` (TULIP stage 2, relative position expansion): the distilled student fine-tuned
contrastively on long captions and their first sentence."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from tulip_pipelines.models import ModelBundle, expand_rope_context
from tulip_pipelines.models.clip import train_preprocess
from tulip_pipelines.params import Problems
from tulip_pipelines.training.datasets import SHORT_CAPTIONS, Collate
from tulip_pipelines.training.job import TrainJob
from tulip_pipelines.training.stages.base import StageInputs, StageParams, stage_job
from tulip_pipelines.training.tasks import CONTRASTIVE_BATCHES, TOWERS, ContrastiveTask

TEXT_PROJECTIONS = ("teacher", "distilled")
TRAIN_AUGMENTS = ("none", "random_resized_crop")


def check_loss_weights(problems: Problems, long_weight, short_weight) -> None:
    """The contrastive loss weights: each at least 0, not both 0 (as ContrastiveTask needs)."""
    problems.number_in("long_weight", long_weight, 0)
    problems.number_in("short_weight", short_weight, 0)
    if long_weight == 0 and short_weight == 0:
        problems.add("long_weight", "and short_weight must not both be 0")


@dataclass
class ContrastiveParams(StageParams):
    """The contrastive fine-tuning that expand and the Long-CLIP baselines share (defaults:
    TULIP's stage 2)."""

    long_weight: float = 0.8
    short_weight: float = 0.2
    short_caption: str = "first_sentence"  # how it is cut: datasets.SHORT_CAPTIONS
    train_towers: list[str] = field(default_factory=lambda: list(TOWERS))
    label_smoothing: float = 0.0
    short_image_components: int | None = None  # Long-CLIP's primary component matching
    max_logit_scale: float | None = 100.0
    contrastive_batch: str = "global"  # global: a step's whole batch | micro: each micro batch
    train_augment: str = "none"  # random_resized_crop: open_clip's train transform (TULIP's)

    def check(self, problems: Problems) -> None:
        check_loss_weights(problems, self.long_weight, self.short_weight)
        problems.one_of("short_caption", self.short_caption, SHORT_CAPTIONS)
        problems.check(bool(self.train_towers) and set(self.train_towers) <= set(TOWERS),
                       "train_towers", f"must be a non-empty subset of {list(TOWERS)}, "
                                       f"got {self.train_towers!r}")
        problems.number_in("label_smoothing", self.label_smoothing, 0, 1)
        problems.int_at_least("short_image_components", self.short_image_components, 1,
                              optional=True)
        problems.number_in("max_logit_scale", self.max_logit_scale, 0, low_open=True,
                           optional=True)
        problems.one_of("contrastive_batch", self.contrastive_batch, CONTRASTIVE_BATCHES)
        problems.one_of("train_augment", self.train_augment, TRAIN_AUGMENTS)


@dataclass
class ExpandParams(ContrastiveParams):
    section = "expand"

    context_length: int | None = None  # None: the distilled student's
    ntk_scale: float | None = None
    text_projection: str = "teacher"  # TULIP's stage 2 keeps the teacher's, not the student's
    registered_model_name: str | None = "tulip-expanded"

    def check(self, problems: Problems) -> None:
        super().check(problems)
        problems.int_at_least("context_length", self.context_length, 2, optional=True)
        problems.number_in("ntk_scale", self.ntk_scale, 0, low_open=True, optional=True)
        problems.one_of("text_projection", self.text_projection, TEXT_PROJECTIONS)


def contrastive_build(params: ContrastiveParams, inputs: StageInputs, model: ModelBundle,
                      finish=None) -> TrainJob:
    """Long and short captions against the images, for ``model``."""
    task = ContrastiveTask(model.model, params.long_weight, params.short_weight,
                           params.train_towers, label_smoothing=params.label_smoothing,
                           short_image_components=params.short_image_components,
                           max_logit_scale=params.max_logit_scale,
                           contrastive_batch=params.contrastive_batch)
    collate = Collate(model.tokenizer, model.tokenizer)
    augment = train_preprocess(model.model) if params.train_augment != "none" else None
    train_ds, val_ds = inputs.datasets(model.preprocess, train_preprocess=augment,
                                       short_caption=SHORT_CAPTIONS[params.short_caption])
    return stage_job(params, inputs, task=task, collate=collate, train_dataset=train_ds,
                     val_dataset=val_ds, model=model, finish=finish)


def with_teacher_projection(student: ModelBundle, teacher: ModelBundle) -> ModelBundle:
    """A copy of the student whose text projection is the teacher's (TULIP's stage 2 start)."""
    model = copy.deepcopy(student.model)
    model.text_projection.data = teacher.model.text_projection.detach().clone()
    return dataclasses.replace(student, model=model)


def build(params: ExpandParams, inputs: StageInputs) -> TrainJob:
    model = inputs.models["distilled"]
    if params.text_projection == "teacher":
        model = with_teacher_projection(model, inputs.models["teacher"])
    if params.context_length and params.context_length != model.spec.context_length:
        model = expand_rope_context(model, params.context_length, params.ntk_scale)
    return contrastive_build(params, inputs, model)
