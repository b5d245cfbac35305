"""What every training stage shares, and how one runs.

A stage's parameters (:class:`StageParams`), its inputs (:class:`StageInputs`), the training job
its builder returns (:func:`stage_job`) and :func:`run_stage`, what every training node calls:
build the stage's training job, take its run dir's lock, train in this process or on
``num_processes`` through DeepSpeed's launcher, all inside the stage's MLflow run, then export
the model with its provenance (what its model card shows: :mod:`tulip_pipelines.models.card`).
The stages themselves are registered by name in :data:`tulip_pipelines.training.stages.STAGES`.

The launched ranks of a multi-process stage rebuild the same job from the *launch plan*
(:func:`write_launch_plan`) with :func:`build_job`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tulip_pipelines.data.images import ImageSource, as_image_source, image_source_from_dict
from tulip_pipelines.models import ModelBundle, load_bundle, save_model
from tulip_pipelines.params import Params, Problems
from tulip_pipelines.tracking.stage_runs import flatten, lineage, stage_run
from tulip_pipelines.training.datasets import CaptionImageDataset, first_sentence
from tulip_pipelines.training.job import HOUSEKEEPING as TRAIN_HOUSEKEEPING
from tulip_pipelines.training.job import (
    LAUNCHERS,
    Cluster,
    NodeError,
    TrainJob,
    TrainParams,
    TrainResult,
)
from tulip_pipelines.training.plots import loss_figure
from tulip_pipelines.training.processes import run_distributed
from tulip_pipelines.training.run_dir import StallWatch, run_lock
from tulip_pipelines.training.teacher_embeddings import TeacherTextEmbeddings

logger = logging.getLogger(__name__)

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
        "model": dataclasses.asdict(model.spec),
        "inputs": {k: dataclasses.asdict(b.spec) for k, b in inputs.models.items()},
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


def run_stage(stage: str, params: StageParams, inputs: StageInputs,
              ds_config: Mapping[str, Any], parent: ModelBundle | None = None):
    """Train ``stage`` (a name in :data:`STAGES`) in its own MLflow run: parameters, lineage to
    ``parent`` (the model it starts from), per-step metrics, final metrics, the model directory,
    the loss curve and the unreadable samples skipped. Returns ``(model, history, figure,
    skipped)``; the model's spec records the stage, its MLflow run, its parent and what it was
    trained on."""
    from tulip_pipelines.training.stages import STAGES  # the registry imports this module

    tags, source = lineage(parent) if parent is not None else ({}, {})
    with stage_run(stage, {**params.to_dict(), **source}, ds_config, tags,
                   loss_kind=params.loss_kind()) as tracker:
        job = STAGES[stage].build(params, inputs)
        cluster = params.cluster()
        with run_lock(params.stage_run_dir):  # one run per run dir at a time
            if params.num_processes == 1 and not cluster.several and not cluster.hostfile \
                    and cluster.launcher != "srun":
                with StallWatch(params.stage_run_dir, stage, job.params.stall_minutes):
                    result = job.train(ds_config, log_fn=tracker.log)
            else:
                plan = write_launch_plan(stage, params, inputs, ds_config)
                plan["mlflow"] = tracker.target()
                result = run_distributed(
                    plan, params.num_processes, cluster.launcher, run_dir=params.stage_run_dir,
                    run_name=stage, stall_minutes=job.params.stall_minutes, cluster=cluster,
                    module=job.task)
        model = job.exported_model()
        # a new spec: the input model (e.g. expand's distilled one) keeps its own provenance
        provenance = {**model.spec.extra, "stage": stage, "mlflow_run_id": tracker.run_id,
                      "kedro_run_id": tracker.parent_run_id,
                      "parent": parent_reference(parent) if parent is not None else None,
                      "training": training_summary(params, inputs, ds_config, result)}
        model = dataclasses.replace(model, spec=dataclasses.replace(model.spec, extra=provenance),
                                    source_dir=None)
        tracker.log_model(model, registered_model_name=params.registered_model_name, name=stage)
        figure = loss_figure(result.history, stage)
        tracker.log_figure(figure, f"{stage}_loss.png")
        tracker.log_table(result.skipped, "skipped_samples.parquet")
    logger.info("%s: %d steps in %.1f s, final %s", stage, result.final_step, result.wall_time_s,
                result.final_metrics)
    return model, result.history, figure, result.skipped


def write_launch_plan(stage: str, params: StageParams, inputs: StageInputs,
                      ds_config: Mapping[str, Any]) -> dict[str, Any]:
    """Save the inputs under the run dir and return the launch plan every rank's
    :func:`build_job` reads (JSON-able)."""
    folder = Path(params.stage_run_dir) / "launch_inputs"
    folder.mkdir(parents=True, exist_ok=True)
    for name, bundle in inputs.models.items():
        save_model(bundle, folder / name)
    for name, frame in inputs.frames.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)
    embeddings = inputs.teacher_text_embeddings
    return {
        "builder": "tulip_pipelines.training.stages.base:build_job",
        "stage": stage,
        "params": params.to_dict(),
        "models": {name: str(folder / name) for name in inputs.models},
        "frames": {name: str(folder / f"{name}.parquet") for name in inputs.frames},
        "images": inputs.images.resolved().to_dict(),
        "teacher_text_embeddings": str(embeddings.folder.resolve()) if embeddings else None,
        "ds_config": dict(ds_config),
        "node_timeout_s": params.node_timeout_s,
    }


def build_job(plan: Mapping[str, Any]) -> TrainJob:
    """Per-rank builder of a launched stage (:func:`tulip_pipelines.training.launch.main`)."""
    from tulip_pipelines.training.stages import STAGES  # the registry imports this module

    stage = STAGES[plan["stage"]]
    params = stage.params_cls(**plan["params"])
    inputs = StageInputs(
        models={k: load_bundle(v) for k, v in plan["models"].items()},
        frames={k: pd.read_parquet(v) for k, v in plan["frames"].items()},
        images=image_source_from_dict(plan["images"]),
        teacher_text_embeddings=(TeacherTextEmbeddings(plan["teacher_text_embeddings"])
                                 if plan.get("teacher_text_embeddings") else None),
    )
    return stage.build(params, inputs)


def parent_reference(bundle: ModelBundle) -> dict[str, Any]:
    """What a model card says of the model a stage started from."""
    extra = bundle.spec.extra
    return {"stage": extra.get("stage"), "mlflow_run_id": extra.get("mlflow_run_id"),
            "model_name": bundle.spec.model_name, "source": lineage(bundle)[1]["init_model"]}


def training_summary(params: StageParams, inputs: StageInputs, ds_config: Mapping[str, Any],
                     result: TrainResult) -> dict[str, Any]:
    """Data counts, key parameters and final metrics of a finished stage (for its model card)."""
    flat = flatten(params.to_dict())
    key_params = {k: v for k, v in flat.items() if k not in HOUSEKEEPING}
    accumulation = int(ds_config.get("gradient_accumulation_steps", 1) or 1)
    key_params["deepspeed.gradient_accumulation_steps"] = str(accumulation)
    key_params["deepspeed.zero_stage"] = str(ds_config.get("zero_optimization", {}).get("stage", 0))
    key_params["deepspeed.bf16"] = str(ds_config.get("bf16", {}).get("enabled", False))
    processes = int(params.num_processes) * params.cluster().num_nodes
    batch = int(params.train_params().batch_size) * processes * accumulation
    return {
        "records": {role: len(frame) for role, frame in inputs.frames.items()},
        "images": inputs.images.to_dict(),
        "skipped_samples": 0 if result.skipped is None else len(result.skipped),
        "steps": int(result.final_step),
        "global_batch": batch,
        "resumed_from": result.resumed_from,
        "params": key_params,
        "final_metrics": {k: float(v) for k, v in result.final_metrics.items()},
    }
