"""Resume after a hard kill: a training subprocess is SIGKILLed once a checkpoint is complete;
the rerun continues from that checkpoint and its loss curve is the uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DS_FP32
from tests.training.toy_tasks import RegressionData, RegressionTask
from tulip_pipelines.training.checkpoints import complete_checkpoints
from tulip_pipelines.training.engine import train
from tulip_pipelines.training.train_params import TrainParams

CHILD = """
import json, sys
from tests.training.toy_tasks import RegressionData, RegressionTask
from tulip_pipelines.training.engine import TrainParams, train
cfg = TrainParams(**json.loads(sys.argv[1]))
train(RegressionTask(delay_s=0.1), RegressionData(256), cfg, json.loads(sys.argv[2]))
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
