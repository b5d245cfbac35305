"""Training state on disk (training/checkpoints.py) as the engine uses it: a rerun resumes from the
newest complete checkpoint whose fingerprint matches (after a hard kill too, with the same loss
curve), a finished run returns at once, a changed run starts fresh and keeps the old checkpoints
aside, an incomplete checkpoint is ignored."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import DS_FP32, small_train_params
from tests.training.toy_tasks import RegressionData, RegressionTask
from tulip_pipelines.training.checkpoints import (
    COMPLETE_MARKER,
    GlobalBatchChanged,
    complete_checkpoints,
)
from tulip_pipelines.training.engine import train
from tulip_pipelines.training.job import TrainParams

CHILD = """
import json, sys
from tests.training.toy_tasks import RegressionData, RegressionTask
from tulip_pipelines.training.engine import TrainParams, train
params = TrainParams(**json.loads(sys.argv[1]))
train(RegressionTask(delay_s=0.1), RegressionData(256), params, json.loads(sys.argv[2]))
"""


def _config(run_dir: Path) -> dict:
    return dict(run_name="resume", run_dir=str(run_dir), max_steps=30, batch_size=16,
                lr=0.05, warmup_steps=3, log_every=1, checkpoint_every=5, keep_checkpoints=3)


@pytest.mark.slow
def test_killed_run_resumes_and_its_curve_continues(tmp_path, project_root):
    params = _config(tmp_path / "killed")
    ckpt_root = tmp_path / "killed" / "checkpoints"
    env = dict(os.environ, PYTHONPATH=str(project_root), OMP_NUM_THREADS="1")
    log = tmp_path / "child.log"
    with log.open("w") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(params), json.dumps(DS_FP32)],
            cwd=project_root, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not complete_checkpoints(ckpt_root):
        assert child.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint completed in time"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = complete_checkpoints(ckpt_root)[-1][0]
    assert 5 <= killed_at < 30, "the child should have been killed mid-run"

    resumed = train(RegressionTask(), RegressionData(256), TrainParams(**params), DS_FP32)
    assert resumed.resumed_from == killed_at
    assert resumed.final_step == 30
    history = resumed.history
    assert history["step"].tolist() == list(range(1, 31))  # continuous, no restart at 0

    uninterrupted = train(RegressionTask(), RegressionData(256),
                          TrainParams(**_config(tmp_path / "straight")), DS_FP32)
    assert history["loss"].tolist() == pytest.approx(uninterrupted.history["loss"].tolist(),
                                                     rel=1e-5)
    assert history["lr"].tolist() == pytest.approx(uninterrupted.history["lr"].tolist())


def test_finished_run_rerun_returns_at_once_with_its_weights(tmp_path):
    params = small_train_params(tmp_path)
    first_task = RegressionTask()
    first = train(first_task, RegressionData(256), params, DS_FP32)
    again_task = RegressionTask()
    again = train(again_task, RegressionData(256), params, DS_FP32)
    assert again.resumed_from == 8 and again.final_step == 8
    assert again.history.equals(first.history)
    assert torch.equal(again_task.head.weight, first_task.head.weight)


def test_changed_fingerprint_starts_fresh_and_keeps_the_old_run(tmp_path, caplog):
    train(RegressionTask(), RegressionData(256), small_train_params(tmp_path), DS_FP32)
    with caplog.at_level(logging.WARNING, logger="tulip_pipelines.training.engine"):
        result = train(RegressionTask(), RegressionData(256),
                       small_train_params(tmp_path, lr=0.01), DS_FP32)
    assert result.resumed_from is None
    assert "fingerprint" in caplog.text
    moved = list((tmp_path / "run").glob("checkpoints.old-*"))
    assert len(moved) == 1 and complete_checkpoints(moved[0])


def test_incomplete_checkpoint_is_ignored(tmp_path):
    params = small_train_params(tmp_path, max_steps=6, checkpoint_every=3, log_every=1,
                                num_workers=2)
    full = train(RegressionTask(), RegressionData(256), params, DS_FP32)
    ckpt_root = Path(params.run_dir) / "checkpoints"
    (ckpt_root / "step_00000006" / COMPLETE_MARKER).unlink()  # as if killed while writing it
    rerun = train(RegressionTask(), RegressionData(256), params, DS_FP32)
    assert rerun.resumed_from == 3 and rerun.final_step == 6
    assert rerun.history["step"].tolist() == list(range(1, 7))
    assert rerun.history["loss"].tolist() == pytest.approx(full.history["loss"].tolist(), rel=1e-5)


def test_a_changed_global_batch_stops_with_how_to_continue(tmp_path):
    """Same run, accumulation 2 instead of 1: the checkpoints are kept and the message says
    which accumulation continues them; resume=false starts afresh, moving them aside."""
    params = small_train_params(tmp_path, max_steps=4, checkpoint_every=2)
    train(RegressionTask(), RegressionData(256), params, DS_FP32)
    doubled = {**DS_FP32, "gradient_accumulation_steps": 2}
    with pytest.raises(GlobalBatchChanged, match=r"gradient_accumulation_steps .*to 1\b"):
        train(RegressionTask(), RegressionData(256), params, doubled)
    assert [s for s, _, _ in complete_checkpoints(Path(params.run_dir) / "checkpoints")] == [2, 4]
    fresh = train(RegressionTask(), RegressionData(256),
                  small_train_params(tmp_path, max_steps=4, checkpoint_every=2, resume=False),
                  doubled)
    assert fresh.resumed_from is None and fresh.final_step == 4
    assert len(list(Path(params.run_dir).glob("checkpoints.old-*"))) == 1


def _zero_plan(run_dir: Path, stage: int) -> dict:
    return {
        "builder": "tests.training.toy_tasks:build_job",
        "n": 256,
        "train": dict(run_name=f"zero{stage}", run_dir=str(run_dir), max_steps=4, batch_size=8,
                      lr=0.05, warmup_steps=1, log_every=1, checkpoint_every=2,
                      keep_checkpoints=3),
        "ds_config": {"zero_optimization": {"stage": stage}, "gradient_accumulation_steps": 1,
                      "gradient_clipping": 1.0},
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_two_processes_resume_on_one_with_accumulation_doubled(tmp_path, project_root,
                                                                monkeypatch, stage):
    """2 processes x 4 steps (global batch 16 = 8 x 1 x 2) with ZeRO-1/2; their step-4
    checkpoint removed, as if killed after step 2; resumed on 1 process with accumulation 2
    (8 x 2 x 1): DeepSpeed's universal checkpoint restores the sharded optimizer state, the data
    continues at the same global sample, and the weights equal the uninterrupted run's."""
    from tulip_pipelines.training.processes import run_distributed

    monkeypatch.setenv("PYTHONPATH", str(project_root))
    plan = _zero_plan(tmp_path / "run", stage)
    reference = RegressionTask()
    # torchrun: the lighter launcher; DeepSpeed's is tested in test_processes.py
    full = run_distributed(plan, nproc=2, launcher="torchrun", run_dir=tmp_path / "run",
                           module=reference, timeout_s=300)
    assert full.final_step == 4
    root = tmp_path / "run" / "checkpoints"
    assert len(list((root / "step_00000002").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    shutil.rmtree(root / "step_00000004")

    resumed = RegressionTask()
    ds_config = {**plan["ds_config"], "gradient_accumulation_steps": 2}
    result = train(resumed, RegressionData(256), TrainParams.from_params(plan["train"]),
                   ds_config)
    assert result.resumed_from == 2 and result.final_step == 4
    assert (root / "step_00000002" / "universal" / "zero").is_dir()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6,
                                   msg=name)
    # the resumed run's losses continue the uninterrupted run's (history rows 3 and 4)
    np.testing.assert_allclose(result.history["loss"], full.history["loss"], rtol=1e-5)
    # and it moved: the weights are not those of step 2
    assert not torch.allclose(reference.head.weight, RegressionTask().head.weight)


def _hash(ds=None, n_train=100, extra=None, **values):
    from tulip_pipelines.training.checkpoints import run_fingerprint

    params = TrainParams(**{**dict(run_name="r", run_dir="o", max_steps=10, batch_size=4,
                                   lr=1e-3), **values})
    return run_fingerprint(params, {**DS_FP32, **(ds or {})}, n_train,
                           {"model": "m"} if extra is None else extra)


# TrainParams fields that change the trained weights (each set away from its default) ...
WEIGHT_FIELDS = {"run_name": "other", "lr": 2e-3, "max_steps": 11, "schedule_steps": 20,
                 "decay_biases_and_norms": True, "weight_decay": 0.05, "betas": (0.9, 0.95),
                 "eps": 1e-8, "warmup_steps": 1, "min_lr_ratio": 0.1, "seed": 1,
                 "precision": "fp32", "epochs": 1.0, "schedule_epochs": 2.0, "tf32": True}
# ... and those that do not: where and how often things are written, and the layout (the micro
# batch; the global batch is compared on its own, so that a run resumes on another layout)
LAYOUT_FIELDS = {"run_dir": "elsewhere", "log_every": 3, "val_every": 5, "checkpoint_every": 2,
                 "keep_checkpoints": 5, "num_workers": 2, "resume": False,
                 "max_bad_fraction": 0.5, "stall_minutes": 1.0, "batch_size": 8}


def test_every_train_parameter_is_either_in_the_run_fingerprint_or_layout():
    import dataclasses

    assert {f.name for f in dataclasses.fields(TrainParams)} == set(WEIGHT_FIELDS) | set(
        LAYOUT_FIELDS)


@pytest.mark.parametrize("name", sorted(WEIGHT_FIELDS))
def test_a_parameter_that_changes_the_weights_changes_the_run_fingerprint(name):
    value = WEIGHT_FIELDS[name]
    if name == "epochs":
        assert _hash(max_steps=None, epochs=value) != _hash()
    elif name == "schedule_epochs":
        assert _hash(max_steps=None, epochs=1.0, schedule_epochs=value) != _hash(
            max_steps=None, epochs=1.0)
    else:
        assert _hash(**{name: value}) != _hash()


@pytest.mark.parametrize("name", sorted(LAYOUT_FIELDS))
def test_the_layout_and_housekeeping_leave_the_run_fingerprint_equal(name):
    assert _hash(**{name: LAYOUT_FIELDS[name]}) == _hash()


def test_the_deepspeed_config_counts_except_printing_and_layout():
    base = _hash()
    for key, value in {"steps_per_print": 7, "wall_clock_breakdown": True, "dump_state": True,
                       "flops_profiler": {"enabled": True}, "checkpoint": {"x": 1},
                       "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4,
                       "train_batch_size": 64}.items():
        assert _hash(ds={key: value}) == base, key
    for key, value in {"gradient_clipping": 0.5, "zero_optimization": {"stage": 1},
                       "bf16": {"enabled": True},
                       "data_types": {"grad_accum_dtype": "fp32"}}.items():
        assert _hash(ds={key: value}) != base, key


def test_the_training_set_size_and_the_jobs_fingerprint_count():
    assert _hash(n_train=101) != _hash()
    assert _hash(extra={"model": "other"}) != _hash()
    assert _hash(extra={"model": "m", "more": 1}) != _hash()
