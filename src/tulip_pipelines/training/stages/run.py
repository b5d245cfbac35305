"""Running a training stage, what every training node calls (:func:`run_stage`): build the stage's
training job, take its run dir's lock, train in this process or on ``num_processes`` through
DeepSpeed's launcher, all inside the stage's MLflow run, then export the model with its
provenance (what its model card shows: :mod:`tulip_pipelines.models.card`).

The launched ranks of a multi-process stage rebuild the same job from the *launch plan*
(:func:`write_launch_plan`) with :func:`build_job`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from tulip_pipelines.data.images import image_source_from_dict
from tulip_pipelines.models import ModelBundle, load_bundle, save_model
from tulip_pipelines.tracking import flatten, lineage, stage_run
from tulip_pipelines.training.job import TrainJob, TrainResult
from tulip_pipelines.training.plots import loss_figure
from tulip_pipelines.training.processes import run_distributed
from tulip_pipelines.training.run_dir import StallWatch, run_lock
from tulip_pipelines.training.stages import STAGES
from tulip_pipelines.training.stages.base import HOUSEKEEPING, StageInputs, StageParams
from tulip_pipelines.training.teacher_embeddings import TeacherTextEmbeddings

logger = logging.getLogger(__name__)


def run_stage(stage: str, params: StageParams, inputs: StageInputs,
              ds_config: Mapping[str, Any], parent: ModelBundle | None = None):
    """Train ``stage`` (a name in :data:`STAGES`) in its own MLflow run: parameters, lineage to
    ``parent`` (the model it starts from), per-step metrics, final metrics, the model directory,
    the loss curve and the unreadable samples skipped. Returns ``(model, history, figure,
    skipped)``; the model's spec records the stage, its MLflow run, its parent and what it was
    trained on."""
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
        "builder": "tulip_pipelines.training.stages.run:build_job",
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
