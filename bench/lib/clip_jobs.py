"""Launch-plan builders for the multi-node bench (``bench/multinode.py``): a contrastive task on a
randomly initialised CLIP of any open_clip size, on random images and tokens of its own input
size (nothing read from disk). The ranks import this module by name: ``clip_jobs:build_job``."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from tulip_pipelines.models import create_teacher
from tulip_pipelines.training.job import TrainJob, TrainParams
from tulip_pipelines.training.tasks import ContrastiveTask


class RandomPairs(Dataset):
    def __init__(self, n: int, image_size: int, context: int, vocab: int):
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, image_size, image_size, generator=gen)
        self.tokens = torch.randint(1, vocab - 1, (n, context), generator=gen)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "long": self.tokens[i], "short": self.tokens[i]}


def build_job(plan: dict[str, Any]) -> TrainJob:
    torch.manual_seed(0)
    bundle = create_teacher(plan["model"])
    model = bundle.model
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    data = RandomPairs(plan["n"], size, plan.get("context", 32), model.vocab_size)
    return TrainJob(task=ContrastiveTask(model, 0.8, 0.2), train_dataset=data, val_dataset=None,
                    collate_fn=None, params=TrainParams.from_params(plan["train"]))
