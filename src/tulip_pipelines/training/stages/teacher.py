"""``teacher`` (embedded default only): a CLIP trained from scratch with the contrastive loss, on
captions whose sentences are shuffled, so that its image tower learns every detail although its
text tower reads only 77 tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tulip_pipelines.models import check_model_name, create_teacher
from tulip_pipelines.params import Problems
from tulip_pipelines.training.datasets import Collate
from tulip_pipelines.training.job import TrainJob
from tulip_pipelines.training.stages.base import StageInputs, StageParams, stage_job
from tulip_pipelines.training.stages.expand import check_loss_weights
from tulip_pipelines.training.tasks import ContrastiveTask

CAPTION_SOURCES = ("shuffled", "original")


@dataclass
class TeacherParams(StageParams):
    section = "teacher"

    model_name: str = "TULIP-Tiny"
    caption_source: str = "shuffled"  # the demo's sentence-shuffled variants, or the original
    long_weight: float = 1.0
    short_weight: float = 0.0
    registered_model_name: str | None = "tulip-teacher"

    def check(self, problems: Problems) -> None:
        try:
            check_model_name(self.model_name)
        except ValueError as err:
            problems.add("model_name", str(err))
        problems.one_of("caption_source", self.caption_source, CAPTION_SOURCES)
        check_loss_weights(problems, self.long_weight, self.short_weight)


def build(params: TeacherParams, inputs: StageInputs) -> TrainJob:
    torch.manual_seed(params.train_params().seed)  # a reproducible initialisation on every rank
    model = create_teacher(params.model_name)
    variants = None
    if params.caption_source == "shuffled":
        variants = inputs.frames["shuffled"].groupby("id")["caption"].apply(list).to_dict()
    task = ContrastiveTask(model.model, params.long_weight, params.short_weight)
    collate = Collate(model.tokenizer, model.tokenizer if params.short_weight else None)
    train_ds, val_ds = inputs.datasets(model.preprocess, variants)
    return stage_job(params, inputs, task=task, collate=collate, train_dataset=train_ds,
                     val_dataset=val_ds, model=model)
