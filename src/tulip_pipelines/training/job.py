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

    ``fingerprint_inputs`` describe what else determines the trained weights (model spec, data
    identity); the engine hashes them with the parameters into the run's fingerprint, which decides
    whether the checkpoints in the run dir belong to this run. ``model`` is the model bundle the
    task trains (``None`` for a bare task) and ``finish`` turns it into its exported form after
    training (e.g. Long-CLIP's two position tables merged into one)."""

    task: torch.nn.Module
    train_dataset: Dataset
    val_dataset: Dataset | None
    collate_fn: Callable | None
    params: TrainParams
    fingerprint_inputs: Mapping[str, Any] | None = None
    model: Any = None
    finish: Callable[[Any], Any] | None = None

    def train(self, ds_config: Mapping[str, Any], log_fn: Callable | None = None):
        """Train the task (:func:`tulip_pipelines.training.engine.train`; the one place a stage
        calls it, in this process or on every launched rank). Returns its ``TrainResult``."""
        from tulip_pipelines.training.engine import train

        return train(self.task, self.train_dataset, self.params, ds_config,
                     collate_fn=self.collate_fn, val_dataset=self.val_dataset, log_fn=log_fn,
                     fingerprint_inputs=self.fingerprint_inputs)

    def exported_model(self):
        """The trained model in its exported form, in eval mode."""
        model = self.finish(self.model) if self.finish else self.model
        model.model.eval()
        return model
