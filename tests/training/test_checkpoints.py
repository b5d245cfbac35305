"""Training state on disk (training/checkpoints.py) as the engine uses it: a rerun resumes from the
newest complete checkpoint whose fingerprint matches (after a hard kill too, with the same loss
curve), a finished run returns at once, a changed run starts fresh and keeps the old checkpoints
aside, an incomplete checkpoint is ignored."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import DS_FP32, small_train_params
from tests.training.toy_tasks import RegressionData, RegressionTask
from tulip_pipelines.training.checkpoints import COMPLETE_MARKER, complete_checkpoints
from tulip_pipelines.training.engine import train
from tulip_pipelines.training.train_params import TrainParams

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
