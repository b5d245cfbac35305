"""Training on prepared images: the per-rank data order (no duplicates across ranks, identical
after a resume), the launch plan carrying the image source, and a two-process run that
resumes exactly."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import DS_FP32
from tests.image_helpers import decode_index, write_images
from tulip_pipelines.data.images import FolderImages, PreparedImages
from tulip_pipelines.data.prepare import PrepareImagesParams, prepare_images
from tulip_pipelines.data.shards import Encoding
from tulip_pipelines.models import create_teacher
from tulip_pipelines.training.checkpoints import complete_checkpoints
from tulip_pipelines.training.datasets import CaptionImageDataset
from tulip_pipelines.training.sampler import DataPosition, ResumableSampler, SeededSamples
from tulip_pipelines.training.stages import STAGES, StageInputs
from tulip_pipelines.training.stages.longclip import LongclipEqualBudgetParams
from tulip_pipelines.training.stages.run import build_job, run_stage, write_launch_plan

STAGE = "longclip_equal_budget"  # the Long-CLIP baseline at TULIP's budget: images and captions
N_VAL, N_TRAIN = 8, 40


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    frame = write_images(root / "images", N_VAL + N_TRAIN)
    val, train = frame.iloc[:N_VAL], frame.iloc[N_VAL:].reset_index(drop=True)
    params = PrepareImagesParams(output_dir=str(root / "out"), shard_size=8, num_workers=0)
    source = prepare_images(train, val, root / "images", params,
                            Encoding(48, 95, "4:4:4")).source
    return {"root": root, "train": train, "val": val, "source": source}


def as_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


def record_numbers(samples) -> list[int]:
    return [decode_index(s["image"]) for s in samples]


def rank_order(dataset, rank: int, position: DataPosition) -> list[int]:
    """Record numbers rank ``rank`` of 2 reads from ``position`` to the end of that epoch, through
    two DataLoader workers (each opens the shards itself), as the engine reads them."""
    sampler = ResumableSampler(dataset, world_size=2, rank=rank, seed=3, batch_size=4)
    sampler.start(position)
    loader = DataLoader(SeededSamples(dataset, seed=3), batch_size=4, sampler=sampler,
                        drop_last=True, num_workers=2, collate_fn=record_numbers)
    return [number for batch in loader for number in batch]


def test_rank_order_on_prepared_data_has_no_duplicates_and_resumes_identically(prepared):
    dataset = CaptionImageDataset(prepared["train"], prepared["source"], as_tensor)
    for epoch in (0, 1):
        orders = [rank_order(dataset, rank, DataPosition(epoch, 0)) for rank in (0, 1)]
        assert len(orders[0]) == len(orders[1]) == N_TRAIN // 2
        # every training record once per epoch, split between the ranks
        assert sorted(orders[0] + orders[1]) == list(range(N_VAL, N_VAL + N_TRAIN))
        for rank in (0, 1):  # resumed after 3 micro batches: the rest of the same order
            assert rank_order(dataset, rank, DataPosition(epoch, 3)) == orders[rank][12:]
    # the prepared images are the records the sampler asked for, not merely a permutation
    expected = [N_VAL + i for i in ResumableSampler(dataset, 2, 0, 3, 4).base]
    assert rank_order(dataset, 0, DataPosition(0, 0)) == expected


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
    assert job.fingerprint == local.fingerprint
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
def test_two_processes_on_prepared_data_resume_exactly(prepared, tmp_path, project_root,
                                                       monkeypatch):
    """A Long-CLIP stage on TULIP-Tiny through DeepSpeed's launcher (2 CPU processes, gloo),
    reading the prepared shards; the last checkpoint is removed (the state a kill after the
    previous one leaves) and the rerun continues with the same losses."""
    monkeypatch.setenv("PYTHONPATH", f"{project_root / 'src'}{os.pathsep}{project_root}")
    params = LongclipEqualBudgetParams(
        run_dir=str(tmp_path / "run"), num_processes=2,
        train={"max_steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "log_every": 1,
               "val_every": 0, "checkpoint_every": 3, "seed": 0})
    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")

    def run():
        inputs = StageInputs({"teacher": teacher},
                             {"train": prepared["train"], "val": prepared["val"]},
                             prepared["source"])
        model, history, _, _ = run_stage(STAGE, params, inputs, DS_FP32)
        return model.spec.extra["training"], history

    straight, straight_history = run()
    assert straight["steps"] == 6 and straight["resumed_from"] is None
    checkpoints = Path(params.stage_run_dir) / "checkpoints"
    assert [s for s, _, _ in complete_checkpoints(checkpoints)] == [3, 6]
    shutil.rmtree(checkpoints / "step_00000006")

    resumed, resumed_history = run()
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 6
    assert resumed_history["step"].tolist() == list(range(1, 7))
    assert resumed_history["loss"].tolist() == pytest.approx(
        straight_history["loss"].tolist(), rel=1e-5)
