"""What every training stage shares: its parameters (:class:`StageParams`), its inputs
(:class:`StageInputs`), the job a stage's builder makes (:class:`StageJob`), and running that job
in this process or on several through DeepSpeed's launcher (:func:`run_job`)."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tulip_pipelines.data.images import ImageSource, as_image_source
from tulip_pipelines.data.text import first_sentence
from tulip_pipelines.models import ModelBundle, save_model
from tulip_pipelines.params import Params, Problems
from tulip_pipelines.training.config import TrainParams, TrainResult
from tulip_pipelines.training.data import CaptionImageDataset
from tulip_pipelines.training.engine import LogFn, train
from tulip_pipelines.training.launch import LAUNCHERS, TrainJob, run_distributed
from tulip_pipelines.training.run_lock import run_lock
from tulip_pipelines.training.targets import TeacherTargets

RUNS_DIR = "data/06_models/runs"


@dataclass
class StageParams(Params):
    """Parameters every stage has: ``train`` (the engine's :class:`TrainParams` minus name and
    folder), the stage's run dir (its training checkpoints), and how many processes train."""

    train: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None  # None: data/06_models/runs/<stage>
    num_processes: int = 1
    launcher: str = "deepspeed"

    def __post_init__(self) -> None:
        p = Problems(self.section)
        p.int_at_least("num_processes", self.num_processes, 1)
        p.one_of("launcher", self.launcher, LAUNCHERS)
        self.check(p)
        p.raise_if_any()
        self.train_params()  # the training settings are checked now, before any heavy work

    def check(self, problems: Problems) -> None:
        """The stage's own checks (subclasses)."""

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
                if k not in ("train", "run_dir", "num_processes", "launcher")}


@dataclass
class StageInputs:
    """What a stage reads: models by role (``teacher``, ``distilled``), caption tables by role
    (``train``, ``val``, the demo teacher's ``shuffled``), where their images are (the
    ``prepared_images`` source; a folder path means the original files under it) and, for
    distillation, the cached teacher targets."""

    models: Mapping[str, ModelBundle]
    frames: Mapping[str, pd.DataFrame]
    images: ImageSource | str
    targets: TeacherTargets | None = None

    def __post_init__(self) -> None:
        self.images = as_image_source(self.images)

    def datasets(self, preprocess, variants=None, *, short_caption=first_sentence,
                 frames: Mapping[str, pd.DataFrame] | None = None
                 ) -> tuple[CaptionImageDataset, CaptionImageDataset | None]:
        """Training and (if there are validation rows) validation datasets; ``preprocess=None``
        reads no images (distillation is text only). Variants apply to training only.
        ``frames`` replaces the inputs' caption tables (e.g. with extra rows)."""
        frames = frames or self.frames
        train_ds = CaptionImageDataset(frames["train"], self.images, preprocess, variants,
                                       short_caption)
        val = frames.get("val")
        val_ds = None
        if val is not None and len(val):
            val_ds = CaptionImageDataset(val, self.images, preprocess,
                                         short_caption=short_caption)
        return train_ds, val_ds


@dataclass
class Built:
    """What a stage's builder returns: the task to train, its data, the model it trains and,
    optionally, how that model is turned into its exported form after training."""

    task: Any
    collate: Callable
    train_dataset: CaptionImageDataset
    val_dataset: CaptionImageDataset | None
    model: ModelBundle
    finish: Callable[[ModelBundle], ModelBundle] | None = None


@dataclass(frozen=True)
class Stage:
    """A training stage: its parameter class and its builder."""

    name: str
    params_cls: type[StageParams]
    build: Callable[[Any, StageInputs], Built]

    def job(self, params: StageParams, inputs: StageInputs,
            ds_config: Mapping[str, Any]) -> tuple[TrainJob, Built]:
        built = self.build(params, inputs)
        train_ids = inputs.frames["train"]["id"]
        fingerprint = {
            "model": built.model.spec.to_dict(),
            "inputs": {k: b.spec.to_dict() for k, b in inputs.models.items()},
            "train_ids": [str(train_ids.iloc[0]), str(train_ids.iloc[-1]), len(train_ids)],
            # which images (prepared or original, size, quality), not where they are
            "images": {k: v for k, v in inputs.images.to_dict().items()
                       if k not in ("folder", "root")},
            "params": params.fingerprint_fields(),
        }
        job = TrainJob(built.task, built.train_dataset, built.val_dataset, built.collate,
                       params.train_params(), dict(ds_config), fingerprint)
        return job, built


def run_job(stage: Stage, params: StageParams, inputs: StageInputs, ds_config: Mapping[str, Any],
            log_fn: LogFn | None = None) -> tuple[ModelBundle, TrainResult]:
    """Train one stage: in this process, or on ``num_processes`` through the launcher (which
    rebuilds the same job on every rank from the inputs saved in the run dir)."""
    job, built = stage.job(params, inputs, ds_config)
    with run_lock(params.stage_run_dir):  # one run per run dir at a time
        if params.num_processes == 1:
            result = train(job.task, job.train_dataset, job.params, job.ds_config,
                           collate_fn=job.collate_fn, val_dataset=job.val_dataset,
                           log_fn=log_fn, fingerprint=job.fingerprint)
        else:
            spec = _launch_spec(stage.name, params, inputs, ds_config)
            with tempfile.TemporaryDirectory() as tmp:
                result = run_distributed(spec, params.num_processes, params.launcher,
                                         module=job.task, log_fn=log_fn,
                                         result_dir=Path(tmp) / "result")
    model = built.finish(built.model) if built.finish else built.model
    model.model.eval()
    return model, result


def _launch_spec(stage: str, params: StageParams, inputs: StageInputs,
                 ds_config: Mapping[str, Any]) -> dict[str, Any]:
    """Save the inputs under the run dir; the spec every rank's :func:`build_job` reads."""
    folder = Path(params.stage_run_dir) / "launch_inputs"
    folder.mkdir(parents=True, exist_ok=True)
    for name, bundle in inputs.models.items():
        save_model(bundle, folder / name)
    for name, frame in inputs.frames.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)
    return {
        "builder": "tulip_pipelines.training.stages:build_job",
        "stage": stage,
        "params": params.to_dict(),
        "models": {name: str(folder / name) for name in inputs.models},
        "frames": {name: str(folder / f"{name}.parquet") for name in inputs.frames},
        "images": inputs.images.resolved().to_dict(),
        "targets": str(inputs.targets.folder.resolve()) if inputs.targets else None,
        "ds_config": dict(ds_config),
    }
