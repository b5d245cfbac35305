"""The four training stages as plain functions (the Kedro nodes call these).

``teacher`` (embedded default only): a CLIP trained from scratch with the contrastive loss, on
captions whose sentences are shuffled, so its image tower learns every detail.
``distill`` (TULIP stage 1): RoPE student <- frozen teacher, on text embeddings.
``expand`` (TULIP stage 2): the student fine-tuned contrastively on long + short captions.
``longclip`` (baseline): the teacher with a stretched position embedding, fine-tuned with
exactly expand's loss, steps, batch and learning rate.

Each stage runs in-process for one process, or through DeepSpeed's launcher for several
(``num_processes``): the launched ranks rebuild the same job with :func:`build_job` from a spec
that points at the inputs saved on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tulip_pipelines.models import (
    ModelBundle,
    build_student,
    check_model_name,
    create_teacher,
    expand_rope_context,
    load_bundle,
    save_model,
    stretch_position_embedding,
)
from tulip_pipelines.params import known_params
from tulip_pipelines.tracking import StageTracker, stage_run
from tulip_pipelines.training.data import CaptionImageDataset, Collate
from tulip_pipelines.training.engine import TrainConfig, TrainResult, train
from tulip_pipelines.training.launch import TrainJob, run_distributed
from tulip_pipelines.training.losses import DISTILL_LOSSES
from tulip_pipelines.training.tasks import TOWERS, ContrastiveTask, DistillTask

logger = logging.getLogger(__name__)
STAGES = ("teacher", "distill", "expand", "longclip")


@dataclass
class StageParams:
    """Parameters shared by every stage: ``train`` (a :class:`TrainConfig` minus its name),
    where checkpoints go, and how many processes train."""

    train: dict[str, Any] = field(default_factory=dict)
    checkpoint_dir: str = "data/06_models/checkpoints"
    num_processes: int = 1
    launcher: str = "deepspeed"

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None, stage: str):
        out = cls(**known_params(cls, params, f"{stage} parameter"))
        out.train_config(stage)  # validates the training settings now, before any heavy work
        if not isinstance(out.num_processes, int) or out.num_processes < 1:
            raise ValueError(f"{stage}.num_processes must be an integer >= 1")
        return out

    def train_config(self, stage: str) -> TrainConfig:
        return TrainConfig.from_params({**self.train, "run_name": stage, "output_dir": f"{self.checkpoint_dir}/{stage}"})


@dataclass
class TeacherParams(StageParams):
    model_name: str = "TULIP-Tiny"
    caption_source: str = "shuffled"  # shuffled (the demo's sentence-shuffled variants) | original
    long_weight: float = 1.0
    short_weight: float = 0.0

    def __post_init__(self):
        check_model_name(self.model_name)
        if self.caption_source not in ("shuffled", "original"):
            raise ValueError(f"teacher.caption_source must be shuffled or original, got {self.caption_source!r}")


@dataclass
class DistillParams(StageParams):
    context_length: int = 248
    rope_theta: float = 10000.0
    activation: str | None = None
    loss_type: str = "cosine"
    teacher_input: str = "tokens"  # tokens | windows
    window_overlap: int = 20
    max_windows: int = 5

    def __post_init__(self):
        if self.loss_type not in DISTILL_LOSSES:
            raise ValueError(f"distill.loss_type must be one of {DISTILL_LOSSES}, got {self.loss_type!r}")
        if self.teacher_input not in ("tokens", "windows"):
            raise ValueError(f"distill.teacher_input must be tokens or windows, got {self.teacher_input!r}")
        if self.activation not in (None, "gelu", "quick_gelu"):
            raise ValueError(f"distill.activation must be null, gelu or quick_gelu, got {self.activation!r}")


@dataclass
class ExpandParams(StageParams):
    long_weight: float = 0.8
    short_weight: float = 0.2
    train_towers: list[str] = field(default_factory=lambda: list(TOWERS))
    context_length: int | None = None  # None: the distilled student's
    ntk_scale: float | None = None

    def __post_init__(self):
        if self.long_weight < 0 or self.short_weight < 0 or self.long_weight + self.short_weight == 0:
            raise ValueError("expand.long_weight and short_weight must be >= 0 and not both 0")
        if not set(self.train_towers) <= set(TOWERS) or not self.train_towers:
            raise ValueError(f"expand.train_towers must be a non-empty subset of {list(TOWERS)}")


@dataclass
class LongclipParams:
    """Only what differs from expand: the budget (steps, batch, lr, loss weights) is expand's."""

    context_length: int = 248
    keep: int = 20

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "LongclipParams":
        params = dict(params or {})
        unknown = sorted(set(params) - {"context_length", "keep"})
        if unknown:
            raise ValueError(f"unknown longclip parameter(s) {unknown}; the budget comes from expand")
        return cls(**params)


def check_stage_params(stage: str, params: Mapping[str, Any], all_params: Mapping[str, Any]) -> None:
    """Validate a stage's parameters and the checks that span stages (for the fail-fast hook)."""
    if stage == "teacher":
        TeacherParams.from_params(params, stage)
    elif stage == "distill":
        p = DistillParams.from_params(params, stage)
        teacher = all_params.get("teacher") or {}
        if "model_name" in teacher:
            import open_clip

            ctx = open_clip.get_model_config(teacher["model_name"])["text_cfg"].get("context_length", 77)
            if p.context_length < ctx:
                raise ValueError(f"distill.context_length {p.context_length} is shorter than the teacher's {ctx}")
    elif stage == "expand":
        ExpandParams.from_params(params, stage)
    elif stage == "longclip":
        LongclipParams.from_params(params)
        ExpandParams.from_params(all_params.get("expand"), "expand")


# ---------------------------------------------------------------------------------------------
# Jobs


def _job(stage: str, p: StageParams, bundles: Mapping[str, ModelBundle], frames: Mapping[str, pd.DataFrame],
         image_root: str, ds_config: Mapping[str, Any], extra: Mapping[str, Any]) -> tuple[TrainJob, ModelBundle]:
    """The training job of ``stage`` and the bundle whose model it trains."""
    train_df, val_df = frames["train"], frames.get("val")
    cfg = p.train_config(stage)
    if stage == "teacher":
        assert isinstance(p, TeacherParams)
        torch.manual_seed(cfg.seed)  # a reproducible initialisation, the same on every rank
        model = create_teacher(p.model_name)
        variants = None
        if p.caption_source == "shuffled":
            variants = frames["shuffled"].groupby("id")["caption"].apply(list).to_dict()
        task = ContrastiveTask(model.model, p.long_weight, p.short_weight)
        collate = Collate(model.tokenizer, model.tokenizer if p.short_weight else None)
        train_ds = CaptionImageDataset(train_df, image_root, model.preprocess, variants)
    elif stage == "distill":
        assert isinstance(p, DistillParams)
        teacher = bundles["teacher"]
        model = build_student(teacher, p.context_length, p.rope_theta, p.activation)
        task = DistillTask(model.model, teacher.model, p.loss_type, p.teacher_input)
        windows = p.max_windows if p.teacher_input == "windows" else 0
        collate = Collate(model.tokenizer, teacher_tokenizer=teacher.tokenizer, windows=windows, overlap=p.window_overlap)
        train_ds = CaptionImageDataset(train_df, image_root, None)  # text only
    else:
        assert isinstance(p, ExpandParams)
        if stage == "expand":
            model = bundles["distilled"]
            if p.context_length and p.context_length != model.spec.context_length:
                model = expand_rope_context(model, p.context_length, p.ntk_scale)
        else:
            model = stretch_position_embedding(bundles["teacher"], extra["context_length"], extra["keep"])
        task = ContrastiveTask(model.model, p.long_weight, p.short_weight, p.train_towers)
        collate = Collate(model.tokenizer, model.tokenizer)
        train_ds = CaptionImageDataset(train_df, image_root, model.preprocess)
    val_ds = None
    if val_df is not None and len(val_df):
        val_ds = CaptionImageDataset(val_df, image_root, None if stage == "distill" else model.preprocess)
    fingerprint = {"model": model.spec.to_dict(), "inputs": {k: b.spec.to_dict() for k, b in bundles.items()},
                   "train_ids": [str(train_df["id"].iloc[0]), str(train_df["id"].iloc[-1]), len(train_df)],
                   "params": {k: v for k, v in dataclasses.asdict(p).items() if k not in ("train", "checkpoint_dir")},
                   "extra": dict(extra)}
    return TrainJob(task, train_ds, val_ds, collate, cfg, dict(ds_config), fingerprint), model


_PARAMS = {"teacher": TeacherParams, "distill": DistillParams, "expand": ExpandParams, "longclip": ExpandParams}


def build_job(spec: Mapping[str, Any]) -> TrainJob:
    """Per-rank builder for :func:`tulip_pipelines.training.launch.run_distributed`."""
    params = _PARAMS[spec["stage"]](**spec["params"])
    bundles = {k: load_bundle(v) for k, v in spec["bundles"].items()}
    frames = {k: pd.read_parquet(v) for k, v in spec["frames"].items()}
    job, _ = _job(spec["stage"], params, bundles, frames, spec["image_root"], spec["ds_config"], spec["extra"])
    return job


def run_stage(
    stage: str,
    params: StageParams,
    *,
    bundles: Mapping[str, ModelBundle],
    frames: Mapping[str, pd.DataFrame],
    image_root: str,
    ds_config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> tuple[ModelBundle, TrainResult, Any]:
    """Train one stage (tracked in MLflow); return the trained model, its result and loss curve."""
    extra = dict(extra or {})
    job, model = _job(stage, params, bundles, frames, image_root, ds_config, extra)
    logged = {**dataclasses.asdict(params), **extra}
    with stage_run(stage, logged, job.ds_config, tags) as tracker:
        if params.num_processes == 1:
            result = train(job.task, job.train_dataset, job.cfg, job.ds_config, collate_fn=job.collate_fn,
                           val_dataset=job.val_dataset, log_fn=tracker.log, fingerprint=job.fingerprint)
        else:
            result = _run_launched(stage, params, bundles, frames, image_root, ds_config, extra, job, tracker)
        model.model.eval()
        # a new spec: the input bundle (e.g. expand's distilled model) keeps its own provenance
        provenance = {**model.spec.extra, "stage": stage, "mlflow_run_id": tracker.run_id}
        model = dataclasses.replace(model, spec=dataclasses.replace(model.spec, extra=provenance))
        tracker.log_final(result.final_metrics)
        tracker.log_model(model)
        figure = loss_figure(result.history, stage)
        tracker.log_figure(figure, f"{stage}_loss.png")
    logger.info("%s: %d steps in %.1f s, final %s", stage, result.final_step, result.wall_time_s, result.final_metrics)
    return model, result, figure


def _run_launched(stage, params, bundles, frames, image_root, ds_config, extra, job: TrainJob,
                  tracker: StageTracker) -> TrainResult:
    """Save the inputs, start ``num_processes`` ranks with DeepSpeed's launcher, load the result."""
    inputs = Path(params.checkpoint_dir) / stage / "launch_inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for name, b in bundles.items():
        save_model(b, inputs / name)
    for name, frame in frames.items():
        frame.to_parquet(inputs / f"{name}.parquet", index=False)
    spec = {
        "builder": "tulip_pipelines.training.stages:build_job",
        "stage": stage,
        "params": dataclasses.asdict(params),
        "bundles": {name: str(inputs / name) for name in bundles},
        "frames": {name: str(inputs / f"{name}.parquet") for name in frames},
        "image_root": str(Path(image_root).resolve()),
        "ds_config": dict(ds_config),
        "extra": dict(extra),
    }
    with tempfile.TemporaryDirectory() as tmp:
        return run_distributed(spec, params.num_processes, params.launcher, module=job.task,
                               log_fn=tracker.log, result_dir=Path(tmp) / "result")


def loss_figure(history: pd.DataFrame, stage: str):
    """Training loss (and validation loss, learning rate) per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if not history.empty:
        ax.plot(history["step"], history["loss"], label="train loss")
        val_cols = [c for c in history.columns if c.startswith("val_") and "loss" in c]
        for col in val_cols[:1]:
            rows = history.dropna(subset=[col])
            ax.plot(rows["step"], rows[col], "o-", label=col.replace("_", " "))
        lr_ax = ax.twinx()
        lr_ax.plot(history["step"], history["lr"], color="grey", alpha=0.4, label="lr")
        lr_ax.set_ylabel("learning rate")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{stage}: loss")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig
