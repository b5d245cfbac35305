"""What every training stage shares: its parameters (:class:`StageParams`), its inputs
(:class:`StageInputs`) and the training job its builder returns (:func:`stage_job`). Running a
stage is :mod:`.run`."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from tulip_pipelines.data.images import ImageSource, as_image_source
from tulip_pipelines.data.text import first_sentence
from tulip_pipelines.models import ModelBundle
from tulip_pipelines.params import Params, Problems
from tulip_pipelines.training.datasets import CaptionImageDataset
from tulip_pipelines.training.job import HOUSEKEEPING as TRAIN_HOUSEKEEPING
from tulip_pipelines.training.job import LAUNCHERS, Cluster, NodeError, TrainJob, TrainParams
from tulip_pipelines.training.teacher_embeddings import TeacherTextEmbeddings

RUNS_DIR = "data/06_models/runs"
REGISTERED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# How a stage is carried out, not what it learns (with its train block's, as dotted keys): left
# out of the fingerprint and of the model card
HOUSEKEEPING = frozenset({"run_dir", "num_processes", "launcher", "num_nodes", "master_addr",
                          "master_port", "hostfile", "node_timeout_s", "registered_model_name"}
                         | {f"train.{key}" for key in TRAIN_HOUSEKEEPING})


@dataclass
class StageParams(Params):
    """Parameters every stage has: ``train`` (the engine's :class:`TrainParams` minus name and
    folder), the stage's run dir (its training checkpoints), how many processes train on each
    node, how several nodes start (:meth:`cluster`; None: from the scheduler's environment,
    else one node), and the name its model is registered under in the MLflow Model
    Registry (when tracking is on; ``None``: logged, not registered)."""

    train: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None  # None: data/06_models/runs/<stage>
    num_processes: int = 1  # on each node
    launcher: str | None = None  # None: srun in a SLURM allocation with num_nodes > 1, else
    #                              deepspeed; torchrun: the other nodes started by hand
    num_nodes: int | None = None  # None: SLURM_NNODES, else 1
    master_addr: str | None = None  # None: MASTER_ADDR, else this host (node 0's address)
    master_port: int | None = None  # None: MASTER_PORT, else a free port
    hostfile: str | None = None  # DeepSpeed's ssh mode: this node starts the hosts listed there
    node_timeout_s: float = 300.0  # how long ranks and nodes wait to join (rendezvous, plan)
    registered_model_name: str | None = None

    def __post_init__(self) -> None:
        p = Problems(self.section)
        p.int_at_least("num_processes", self.num_processes, 1)
        p.check(self.launcher is None or self.launcher in LAUNCHERS, "launcher",
                f"must be null or one of {list(LAUNCHERS)}, got {self.launcher!r}")
        p.number_in("node_timeout_s", self.node_timeout_s, 0, low_open=True)
        try:
            self.cluster()
        except NodeError as err:
            p.check(False, "num_nodes", f"/launcher/hostfile: {err}")
        name = self.registered_model_name
        p.check(name is None or (isinstance(name, str) and bool(REGISTERED_NAME.fullmatch(name))),
                "registered_model_name", f"must be null or letters, digits, '.', '_' and '-' "
                f"(starting with a letter or digit), got {name!r}")
        self.check(p)
        p.raise_if_any()
        self.train_params()  # the training settings are checked now, before any heavy work

    def check(self, problems: Problems) -> None:
        """The stage's own checks (subclasses)."""

    def loss_kind(self) -> str:
        """What the stage's loss is (its MLflow curves are named after it: losses of different
        kinds never share a chart). The CLIP contrastive loss unless a stage says otherwise."""
        return "contrastive"

    def cluster(self) -> Cluster:
        """How the stage's nodes start (:meth:`Cluster.resolve`)."""
        return Cluster.resolve(self.num_nodes, self.master_addr, self.master_port,
                               self.hostfile, self.launcher, where=self.section)

    @property
    def stage_run_dir(self) -> str:
        return self.run_dir or f"{RUNS_DIR}/{self.section}"

    def run_dirs(self) -> list[str]:
        return [self.stage_run_dir]

    def train_params(self) -> TrainParams:
        return TrainParams.for_stage(self.train, self.section, self.stage_run_dir)

    def fingerprint_fields(self) -> dict[str, Any]:
        """What else the trained weights depend on (the engine adds ``train``)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k != "train" and k not in HOUSEKEEPING}


@dataclass
class StageInputs:
    """What a stage reads: models by role (``teacher``, ``distilled``), caption tables by role
    (``train``, ``val``, the demo teacher's ``shuffled``), where their images are (the
    ``prepared_images`` source; a folder path means the original files under it) and, for
    distillation, the teacher text embeddings (the cache, or ``None``)."""

    models: Mapping[str, ModelBundle]
    frames: Mapping[str, pd.DataFrame]
    images: ImageSource | str
    teacher_text_embeddings: TeacherTextEmbeddings | None = None

    def __post_init__(self) -> None:
        self.images = as_image_source(self.images)

    def datasets(self, preprocess, variants=None, *, short_caption=first_sentence,
                 frames: Mapping[str, pd.DataFrame] | None = None, train_preprocess=None
                 ) -> tuple[CaptionImageDataset, CaptionImageDataset | None]:
        """Training and (if there are validation rows) validation datasets; ``preprocess=None``
        reads no images (distillation is text only). Variants and ``train_preprocess`` (an
        augmenting transform) apply to training only. ``frames`` replaces the inputs' caption
        tables (e.g. with extra rows)."""
        frames = frames or self.frames
        train_ds = CaptionImageDataset(frames["train"], self.images,
                                       train_preprocess or preprocess, variants, short_caption)
        val = frames.get("val")
        val_ds = None
        if val is not None and len(val):
            val_ds = CaptionImageDataset(val, self.images, preprocess,
                                         short_caption=short_caption)
        return train_ds, val_ds


def stage_job(params: StageParams, inputs: StageInputs, *, task: torch.nn.Module,
              collate: Callable, train_dataset: CaptionImageDataset,
              val_dataset: CaptionImageDataset | None, model: ModelBundle,
              finish: Callable[[ModelBundle], ModelBundle] | None = None) -> TrainJob:
    """The training job a stage's builder returns: its task, data and model, the stage's
    :class:`TrainParams`, and what else the trained weights depend on (the job's fingerprint inputs:
    the model, the input models, which training records and images, the stage's parameters)."""
    train_ids = inputs.frames["train"]["id"]
    fingerprint_inputs = {
        "model": model.spec.to_dict(),
        "inputs": {k: b.spec.to_dict() for k, b in inputs.models.items()},
        "train_ids": [str(train_ids.iloc[0]), str(train_ids.iloc[-1]), len(train_ids)],
        # which images (prepared or original, size, quality), not where they are
        "images": {k: v for k, v in inputs.images.to_dict().items()
                   if k not in ("folder", "root")},
        "params": params.fingerprint_fields(),
    }
    return TrainJob(task, train_dataset, val_dataset, collate, params.train_params(),
                    fingerprint_inputs, model, finish)


@dataclass(frozen=True)
class Stage:
    """A training stage: its parameter class and its builder (parameters and inputs in, the
    :class:`TrainJob` out)."""

    name: str
    params_cls: type[StageParams]
    build: Callable[[Any, StageInputs], TrainJob]
