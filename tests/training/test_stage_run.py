"""Training on prepared images: the per-rank data order (no duplicates across ranks, identical
after a resume), the launch plan carrying the image source, and a two-process run that
resumes exactly."""

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import DS_FP32
from tests.training.conftest import N_TRAIN
from tulip_pipelines.data.images import FolderImages, PreparedImages
from tulip_pipelines.models import create_teacher
from tulip_pipelines.training.checkpoints import complete_checkpoints
from tulip_pipelines.training.stages import STAGES, StageInputs
from tulip_pipelines.training.stages.base import build_job, run_stage, write_launch_plan
from tulip_pipelines.training.stages.longclip import LongclipEqualBudgetParams

STAGE = "longclip_equal_budget"  # the Long-CLIP baseline at TULIP's budget: images and captions












def test_the_launch_plan_carries_the_image_source(prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative folder, as the catalog entry gives it
    source = PreparedImages(os.path.relpath(prepared["source"].folder), prepared["source"].info)
    params = LongclipEqualBudgetParams(run_dir=str(tmp_path / "run"), num_processes=2,
                            train={"max_steps": 2, "batch_size": 4, "lr": 1e-3})
    inputs = StageInputs({"teacher": create_teacher("TULIP-Tiny")},
                         {"train": prepared["train"], "val": prepared["val"]}, source)
    plan = write_launch_plan(STAGE, params, inputs, DS_FP32)
    assert plan["images"]["kind"] == "prepared"
    assert plan["images"]["folder"] == str(prepared["source"].folder.resolve())
    job = build_job(plan)  # what every launched rank does
    local = STAGES[STAGE].build(params, inputs)
    assert isinstance(job.train_dataset.source, PreparedImages)
    assert job.fingerprint_inputs == local.fingerprint_inputs
    for i in (0, 17, N_TRAIN - 1):
        assert torch.equal(job.train_dataset[i]["image"], local.train_dataset[i]["image"])
    # the original files, for a run that skipped the preparation
    folder = StageInputs({"teacher": inputs.models["teacher"]}, inputs.frames,
                         str(prepared["root"] / "images"))
    plan = write_launch_plan(STAGE, params, folder, DS_FP32)
    assert plan["images"] == {"kind": "folder",
                              "root": str((prepared["root"] / "images").resolve())}
    assert isinstance(build_job(plan).train_dataset.source, FolderImages)


@pytest.mark.slow
def test_two_processes_on_prepared_data_resume_on_one_process(prepared, tmp_path, project_root,
                                                       monkeypatch):
    """A Long-CLIP stage on TULIP-Tiny through torchrun (2 CPU processes, gloo),
    reading the prepared shards; the last checkpoint is removed (the state a kill after the
    previous one leaves) and the rerun, in this process with accumulation 2 (the same global
    batch on what is left: one process), continues with the same losses."""
    monkeypatch.setenv("PYTHONPATH", f"{project_root / 'src'}{os.pathsep}{project_root}")
    params = LongclipEqualBudgetParams(  # torchrun: the lighter launcher (DeepSpeed's: e2e)
        run_dir=str(tmp_path / "run"), num_processes=2, launcher="torchrun",
        train={"max_steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "log_every": 1,
               "val_every": 0, "checkpoint_every": 3, "seed": 0})
    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")

    def run(params, ds_config):
        inputs = StageInputs({"teacher": teacher},
                             {"train": prepared["train"], "val": prepared["val"]},
                             prepared["source"])
        model, history, _, _ = run_stage(STAGE, params, inputs, ds_config)
        return model.spec.extra["training"], history

    straight, straight_history = run(params, DS_FP32)
    assert straight["steps"] == 6 and straight["resumed_from"] is None
    checkpoints = Path(params.stage_run_dir) / "checkpoints"
    assert [s for s, _, _ in complete_checkpoints(checkpoints)] == [3, 6]
    shutil.rmtree(checkpoints / "step_00000006")

    resumed, resumed_history = run(dataclasses.replace(params, num_processes=1),
                                   {**DS_FP32, "gradient_accumulation_steps": 2})
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 6
    assert resumed_history["step"].tolist() == list(range(1, 7))
    assert resumed_history["loss"].tolist() == pytest.approx(
        straight_history["loss"].tolist(), rel=1e-5)
