"""A tiny linear-regression task for the engine tests (fast, deterministic, no images)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.data import Dataset

from tulip_pipelines.training.job import TrainJob, TrainParams

N_FEATURES = 8


class RegressionData(Dataset):
    """``n`` samples of y = x . w + small noise, the same for a given seed."""

    def __init__(self, n: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, N_FEATURES, generator=gen)
        weights = torch.linspace(-1.0, 1.0, N_FEATURES)
        self.y = self.x @ weights + 0.01 * torch.randn(n, generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class NoisyRegressionData(RegressionData):
    """RegressionData whose inputs get fresh noise from torch's RNG at every read (like the demo
    teacher's random caption variants): a resumed run sees the same samples only if that
    randomness is reproduced."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(i)
        return {**sample, "x": sample["x"] + 0.3 * torch.randn(N_FEATURES)}


class RegressionTask(torch.nn.Module):
    """A trainable linear head (and a 0-dim ``log_scale``, like CLIP's logit_scale) after a
    frozen, registered linear layer; ``delay_s`` slows every forward down, ``dropout`` draws from
    torch's RNG in the forward."""

    def __init__(self, seed: int = 0, delay_s: float = 0.0, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.frozen = torch.nn.Linear(N_FEATURES, N_FEATURES)
        with torch.no_grad():
            self.frozen.weight.copy_(torch.eye(N_FEATURES) + 0.01 * self.frozen.weight)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(N_FEATURES, 1)
        self.log_scale = torch.nn.Parameter(torch.tensor(0.0))
        self.delay_s = delay_s
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.delay_s:
            time.sleep(self.delay_s)
        pred = (self.head(self.dropout(self.frozen(batch["x"]))) * self.log_scale.exp())
        pred = pred.squeeze(-1).float()
        err = pred - batch["y"].float()
        return {"loss": (err**2).mean(), "mae": err.abs().mean()}


def build_job(plan: dict[str, Any]) -> TrainJob:
    """Builder for ``launch.py``: a launch plan with ``n``, ``delay_s`` and ``train``
    (TrainParams)."""
    return TrainJob(
        task=RegressionTask(delay_s=plan.get("delay_s", 0.0)),
        train_dataset=RegressionData(plan.get("n", 256)),
        val_dataset=RegressionData(64, seed=1),
        collate_fn=None,
        params=TrainParams.from_params(plan["train"]),
    )


class PairData(Dataset):
    """``n`` random 48x48 images with a long and a short caption each (TULIP-Tiny inputs),
    the same for a given seed."""

    def __init__(self, n: int, seed: int = 0):
        from tulip_pipelines.models import get_tokenizer

        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 48, 48, generator=gen)
        tokenizer = get_tokenizer("TULIP-Tiny", 248)
        words = ["red", "green", "blue", "circle", "square", "small", "large", "striped"]
        picks = torch.randint(len(words), (n, 12), generator=gen).tolist()
        longs = [" ".join(words[i] for i in row) + ". " + " ".join(words[i] for i in row[::-1])
                 for row in picks]
        self.long = tokenizer(longs)[:, :40]
        self.short = tokenizer([text.split(".")[0] for text in longs])[:, :40]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "long": self.long[i], "short": self.short[i]}


def contrastive_task(seed: int = 0, **options):
    """ContrastiveTask on a TULIP-Tiny CLIP initialised from ``seed``."""
    from tulip_pipelines.models import create_teacher
    from tulip_pipelines.training.tasks import ContrastiveTask

    torch.manual_seed(seed)
    return ContrastiveTask(create_teacher("TULIP-Tiny").model, 0.8, 0.2, **options)


def build_contrastive_job(plan: dict[str, Any]) -> TrainJob:
    """Builder for ``launch.py``: ``contrastive_task`` (``task`` options) on ``PairData(n)``."""
    return TrainJob(
        task=contrastive_task(**plan.get("task", {})),
        train_dataset=PairData(plan["n"]),
        val_dataset=None,
        collate_fn=None,
        params=TrainParams.from_params(plan["train"]),
    )
