"""The one record of a training job: what a stage's builder returns, what the engine trains
(:func:`tulip_pipelines.training.engine.train`) and what every launched rank rebuilds from a
launch plan (:mod:`.launch`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from tulip_pipelines.training.train_params import TrainParams


@dataclass
class TrainJob:
    """A task to train on its data with its parameters.

    ``fingerprint`` describes what else determines the trained weights (model spec, data
    identity); the engine hashes it with the parameters into the run's fingerprint, which decides
    whether the checkpoints in the run dir belong to this run. ``model`` is the model bundle the
    task trains (``None`` for a bare task) and ``finish`` turns it into its exported form after
    training (e.g. Long-CLIP's two position tables merged into one)."""

    task: torch.nn.Module
    train_dataset: Dataset
    val_dataset: Dataset | None
    collate_fn: Callable | None
    params: TrainParams
    fingerprint: Mapping[str, Any] | None = None
    model: Any = None
    finish: Callable[[Any], Any] | None = None

    def exported_model(self):
        """The trained model in its exported form, in eval mode."""
        model = self.finish(self.model) if self.finish else self.model
        model.model.eval()
        return model
