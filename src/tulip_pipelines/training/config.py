"""What one training run does (:class:`TrainParams`) and what it returned (:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from tulip_pipelines.params import Params, Problems


@dataclass
class TrainParams(Params):
    """The ``train`` block of a stage's parameters, plus the run's name and folder.

    Steps are optimizer steps (after gradient accumulation); ``batch_size`` is the micro batch of
    one process. ``val_every``/``checkpoint_every`` of 0 mean "only at the end". The stage's
    *run dir* holds its training checkpoints (``<run_dir>/checkpoints/step_XXXXXXXX``).
    """

    section = "train"

    run_name: str
    run_dir: str
    max_steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    log_every: int = 10
    val_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    num_workers: int = 0
    seed: int = 0
    resume: bool = True

    def __post_init__(self) -> None:
        p = Problems(f"train ({self.run_name})")
        try:
            self.betas = tuple(float(b) for b in self.betas)  # YAML gives a list
            valid_betas = len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas)
        except (TypeError, ValueError):
            valid_betas = False
        p.check(valid_betas, "betas", f"must be two numbers in [0, 1), got {self.betas!r}")
        p.check(bool(self.run_name), "run_name", "must be a non-empty string")
        p.check(bool(self.run_dir), "run_dir", "must be a non-empty path")
        for name in ("max_steps", "batch_size", "log_every", "keep_checkpoints"):
            p.int_at_least(name, getattr(self, name), 1)
        for name in ("warmup_steps", "val_every", "checkpoint_every", "num_workers", "seed"):
            p.int_at_least(name, getattr(self, name), 0)
        p.number_in("lr", self.lr, 0, low_open=True)
        p.number_in("weight_decay", self.weight_decay, 0)
        p.number_in("eps", self.eps, 0, low_open=True)
        p.number_in("min_lr_ratio", self.min_lr_ratio, 0, 1)
        if isinstance(self.max_steps, int) and isinstance(self.warmup_steps, int):
            p.check(self.warmup_steps <= self.max_steps, "warmup_steps",
                    f"({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")
        p.boolean("resume", self.resume)
        p.raise_if_any()

    @classmethod
    def for_stage(cls, train: Mapping[str, Any], run_name: str, run_dir: str) -> "TrainParams":
        """A stage's ``train`` block with the stage's name and run dir filled in."""
        return cls.from_params({**train, "run_name": run_name, "run_dir": run_dir})

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that change the trained weights (not where/how often things are written)."""
        ignored = {"run_dir", "log_every", "val_every", "checkpoint_every", "keep_checkpoints",
                   "num_workers", "resume"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}


@dataclass
class TrainResult:
    """What ``train`` returns; ``history`` has one row per logged step (resumed runs included).
    ``last_checkpoint`` is the folder of the final step's training checkpoint."""

    history: pd.DataFrame
    final_step: int
    resumed_from: int | None
    last_checkpoint: str
    wall_time_s: float
    final_metrics: dict[str, float] = field(default_factory=dict)
