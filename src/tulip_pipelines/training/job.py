"""A training job: what a stage's builder returns, what the engine trains
(:func:`tulip_pipelines.training.engine.train`) and what every launched rank rebuilds from a
launch plan (:mod:`.launch`): the :class:`TrainJob` record, the engine's parameters
(:class:`TrainParams`) and what it returns (:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch.utils.data import Dataset

from tulip_pipelines.params import Params, Problems


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


# The engine's parameters and what it returns

PRECISIONS = ("fp32", "amp_bf16", "bf16")


# How a run is carried out (where it writes, how often, with how many loader workers), not what
# it learns: left out of the fingerprint and of the model card (stages add theirs: stages/base.py)
HOUSEKEEPING = frozenset({"run_dir", "log_every", "val_every", "checkpoint_every",
                          "keep_checkpoints", "num_workers", "resume", "max_bad_fraction",
                          "stall_minutes"})


@dataclass
class TrainParams(Params):
    """The ``train`` block of a stage's parameters, plus the run's name and folder.

    Steps are optimizer steps (after gradient accumulation); ``batch_size`` is the micro batch of
    one process. The budget is ``max_steps`` or ``epochs`` (passes over the training data, which
    the engine turns into steps for the batch, accumulation and processes of the run). The
    warmup/cosine schedule spans the budget unless ``schedule_steps``/``schedule_epochs`` give a
    longer horizon (TULIP's stage 1 stops at epoch 5 of a 30-epoch schedule). AdamW decays
    matrices only (open_clip's rule) unless ``decay_biases_and_norms`` (Long-CLIP decays every
    parameter). ``val_every``/``checkpoint_every`` of 0 mean "only at the end"; ``stall_minutes``
without an optimizer step log a warning saying where each rank is. The stage's
    *run dir* holds its training checkpoints (``<run_dir>/checkpoints/step_XXXXXXXX``).

    ``precision`` (:data:`PRECISIONS`): ``fp32``; ``amp_bf16``, open_clip's and TULIP's mixed
    precision (float32 weights, gradients and optimizer, the towers' forward under bfloat16
    autocast, features and losses in float32); ``bf16``, DeepSpeed's ``bf16.enabled`` (weights
    and activations in bfloat16, losses included; fp32 master weights in the optimizer). ``None``
    follows the DeepSpeed config's ``bf16.enabled``.

    ``tf32``: TF32 for float32 matmuls and cuDNN convolutions on CUDA
    (``torch.backends.cuda.matmul.allow_tf32`` and cuDNN's), as TULIP's and open_clip's training
    scripts set it; ``None`` leaves torch's default (off for matmuls). No effect on the CPU.
    """

    section = "train"

    run_name: str
    run_dir: str
    batch_size: int
    lr: float
    max_steps: int | None = None
    epochs: float | None = None
    schedule_steps: int | None = None
    schedule_epochs: float | None = None
    decay_biases_and_norms: bool = False
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
    max_bad_fraction: float = 0.001  # unreadable samples tolerated (skipped and recorded)
    precision: str | None = None  # fp32 | amp_bf16 | bf16; None: as params:deepspeed's bf16
    stall_minutes: float = 30.0  # warn when no optimizer step for this long (0: never)
    tf32: bool | None = None  # CUDA float32 matmuls/convolutions in TF32; None: torch's default

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
        for name in ("batch_size", "log_every", "keep_checkpoints"):
            p.int_at_least(name, getattr(self, name), 1)
        p.check((self.max_steps is None) != (self.epochs is None), "max_steps",
                f"or epochs: give exactly one (got max_steps={self.max_steps!r}, "
                f"epochs={self.epochs!r})")
        p.int_at_least("max_steps", self.max_steps, 1, optional=True)
        p.number_in("epochs", self.epochs, 0, low_open=True, optional=True)
        p.check(self.schedule_steps is None or self.schedule_epochs is None, "schedule_steps",
                "and schedule_epochs: give at most one")
        p.int_at_least("schedule_steps", self.schedule_steps, 1, optional=True)
        p.number_in("schedule_epochs", self.schedule_epochs, 0, low_open=True, optional=True)
        p.boolean("decay_biases_and_norms", self.decay_biases_and_norms)
        for name in ("warmup_steps", "val_every", "checkpoint_every", "num_workers", "seed"):
            p.int_at_least(name, getattr(self, name), 0)
        p.number_in("lr", self.lr, 0, low_open=True)
        p.number_in("weight_decay", self.weight_decay, 0)
        p.number_in("eps", self.eps, 0, low_open=True)
        p.number_in("min_lr_ratio", self.min_lr_ratio, 0, 1)
        horizon = self.schedule_steps or self.max_steps
        if isinstance(horizon, int) and isinstance(self.warmup_steps, int):
            p.check(self.warmup_steps <= horizon, "warmup_steps",
                    f"({self.warmup_steps}) must not exceed the schedule's {horizon} steps")
        p.boolean("resume", self.resume)
        p.number_in("max_bad_fraction", self.max_bad_fraction, 0, 1)
        p.one_of("precision", self.precision, (None, *PRECISIONS))
        p.number_in("stall_minutes", self.stall_minutes, 0)
        p.check(self.tf32 is None or isinstance(self.tf32, bool), "tf32",
                f"must be true, false or null, got {self.tf32!r}")
        p.raise_if_any()

    @classmethod
    def for_stage(cls, train: Mapping[str, Any], run_name: str, run_dir: str) -> "TrainParams":
        """A stage's ``train`` block with the stage's name and run dir filled in."""
        return cls.from_params({**train, "run_name": run_name, "run_dir": run_dir})

    def resolved(self, steps_per_epoch: int) -> "TrainParams":
        """These parameters with ``max_steps`` and ``schedule_steps`` in steps, epochs converted
        with ``steps_per_epoch`` (optimizer steps per pass over the data in this run)."""
        def steps(epochs: float) -> int:
            return max(1, math.ceil(epochs * steps_per_epoch))

        max_steps = self.max_steps if self.max_steps is not None else steps(self.epochs)
        schedule = self.schedule_steps
        if schedule is None:
            schedule = steps(self.schedule_epochs) if self.schedule_epochs else max_steps
        # in steps only from here on (a resolved budget is valid TrainParams: ranks rebuild it)
        out = dataclasses.replace(self, max_steps=max_steps, schedule_steps=schedule,
                                  epochs=None, schedule_epochs=None)
        if out.warmup_steps > schedule:
            raise ValueError(f"train ({self.run_name}).warmup_steps ({self.warmup_steps}) exceeds "
                             f"the schedule's {schedule} steps")
        if schedule < max_steps:
            raise ValueError(f"train ({self.run_name}): the schedule ({schedule} steps) ends "
                             f"before the run ({max_steps} steps)")
        return out

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that change the trained weights (not where/how often things are written)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in HOUSEKEEPING}
        if fields["tf32"] is None:  # torch's default: the fingerprint of runs before tf32 existed
            del fields["tf32"]
        return fields


@dataclass
class TrainResult:
    """What ``train`` returns; ``history`` has one row per logged step (resumed runs included).
    ``last_checkpoint`` is the folder of the final step's training checkpoint; ``skipped`` the
    unreadable samples met (``data.images.SKIPPED_COLUMNS``; since this process started)."""

    history: pd.DataFrame
    final_step: int
    resumed_from: int | None
    last_checkpoint: str
    wall_time_s: float
    final_metrics: dict[str, float] = field(default_factory=dict)
    skipped: pd.DataFrame | None = None


# Where a stage's ranks run: how many nodes, node 0's address, and the launcher that starts them
LAUNCHERS = ("deepspeed", "torchrun", "srun")


class NodeError(RuntimeError):
    """A multi-node stage cannot start: names the node (or the parameter) and the cause."""


@dataclass(frozen=True)
class Cluster:
    """How a stage's nodes start: how many, node 0's address (``master_port`` None: a free port
    when the stage starts), DeepSpeed's ``hostfile`` (ssh mode) and the launcher."""

    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    hostfile: str | None = None
    launcher: str = "deepspeed"

    @classmethod
    def resolve(cls, num_nodes: int | None = None, master_addr: str | None = None,
                master_port: int | None = None, hostfile: str | None = None,
                launcher: str | None = None, *, where: str = "stage",
                environ: Mapping[str, str] | None = None) -> Cluster:
        """Parameters first, then the scheduler's environment (``SLURM_NNODES``,
        ``MASTER_ADDR``, ``MASTER_PORT``). ``where`` names the parameters in errors."""
        env = os.environ if environ is None else environ
        nodes = num_nodes if num_nodes is not None else (
            1 if hostfile else _env_int(env, "SLURM_NNODES", 1))  # a hostfile lists the nodes
        port = master_port if master_port is not None else _env_int(env, "MASTER_PORT", None)
        job = env.get("SLURM_JOB_ID")
        launcher = launcher or ("srun" if job and nodes > 1 else "deepspeed")
        if not isinstance(nodes, int) or nodes < 1:
            raise NodeError(f"{where}.num_nodes must be an integer >= 1, got {nodes!r}")
        if hostfile and (nodes > 1 or launcher != "deepspeed"):
            raise NodeError(f"{where}.hostfile is DeepSpeed's ssh mode (it starts every host "
                            f"listed): give it with launcher: deepspeed and num_nodes unset")
        if launcher == "srun" and not job:
            raise NodeError(f"{where}.launcher is srun, but this is not inside a SLURM "
                            f"allocation (SLURM_JOB_ID is not set): run kedro in an sbatch "
                            f"script or under salloc, or choose another launcher")
        if launcher == "srun" and nodes > max(held := _env_int(env, "SLURM_NNODES", 1),
                                              _env_int(env, "SLURM_NTASKS", 0)):
            raise NodeError(f"{where}.num_nodes={nodes}, but the allocation (job {job}) holds "
                            f"{held} node(s): ask sbatch/salloc for --nodes={nodes}")
        if nodes > 1 and launcher == "deepspeed":
            raise NodeError(f"{where}.num_nodes={nodes}: nothing starts the other nodes; use "
                            f"launcher: srun (inside a SLURM allocation), a hostfile (DeepSpeed "
                            f"over ssh) or launcher: torchrun (the other nodes started by hand)")
        addr = master_addr or env.get("MASTER_ADDR") or (
            socket.gethostname() if nodes > 1 else "127.0.0.1")
        return cls(nodes, addr, port, hostfile, launcher)

    @property
    def several(self) -> bool:
        return self.num_nodes > 1


def _env_int(env: Mapping[str, str], key: str, default: int | None) -> int | None:
    raw = env.get(key)
    try:
        return default if raw in (None, "") else int(raw)
    except ValueError:
        raise NodeError(f"environment variable {key}={raw!r} is not a number") from None
