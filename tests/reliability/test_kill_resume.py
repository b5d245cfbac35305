"""Kill anywhere, resume exactly: a training process SIGKILLed at a random step, or inside a
checkpoint write, and rerun ends with the same weights, bit for bit, as an uninterrupted run
(CPU, fp32, one process), with per-sample randomness (fresh input noise at every read, like the
demo's caption variants), dropout and two loader workers."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import DS_FP32
from tests.training.toy_tasks import NoisyRegressionData, RegressionTask
from tulip_pipelines.training.checkpoints import COMPLETE_MARKER, complete_checkpoints
from tulip_pipelines.training.engine import train
from tulip_pipelines.training.job import TrainParams

pytestmark = pytest.mark.slow

STEPS = 24
CHILD = """
import json, sys, time
from pathlib import Path
from tests.training.toy_tasks import NoisyRegressionData, RegressionTask
import tulip_pipelines.training.checkpoints as checkpoints
from tulip_pipelines.training.job import TrainParams
from tulip_pipelines.training.engine import train

params, ds_config, hang_at = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
if hang_at:  # hang inside the save of that step, after DeepSpeed wrote it, before COMPLETE
    real = checkpoints.atomic.write_text
    def slow_write(path, text):
        if path.name == checkpoints.COMPLETE_MARKER and json.loads(text)["step"] == hang_at:
            Path(params["run_dir"], "in_save").write_text("1")
            time.sleep(600)
        real(path, text)
    checkpoints.atomic.write_text = slow_write
train(RegressionTask(delay_s=0.05, dropout=0.2), NoisyRegressionData(256), TrainParams(**params),
      ds_config)
"""


def _params(run_dir: Path) -> dict:
    return dict(run_name="kill", run_dir=str(run_dir), max_steps=STEPS, batch_size=16, lr=0.05,
                warmup_steps=3, log_every=1, checkpoint_every=4, keep_checkpoints=3,
                num_workers=2)


def _train_to_the_end(run_dir: Path):
    task = RegressionTask(dropout=0.2)
    result = train(task, NoisyRegressionData(256), TrainParams(**_params(run_dir)), DS_FP32)
    return result, task.state_dict()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _train_to_the_end(tmp_path_factory.mktemp("straight") / "run")


def _child(run_dir: Path, project_root: Path, hang_at: int = 0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(project_root), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(_params(run_dir)), json.dumps(DS_FP32),
         str(hang_at)], cwd=project_root, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)


def _wait_for(condition, child: subprocess.Popen, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert child.poll() is None, f"the child ended before {what}: {child.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(0.01)


def _assert_bitwise_equal(resumed, reference) -> None:
    (result, weights), (ref_result, ref_weights) = resumed, reference
    assert result.final_step == STEPS
    assert result.history["loss"].tolist() == ref_result.history["loss"].tolist()
    for key, value in ref_weights.items():
        assert torch.equal(weights[key], value), key


def test_sigkill_at_a_random_step_then_rerun_gives_the_same_weights(uninterrupted, tmp_path,
                                                                    project_root):
    run_dir = tmp_path / "killed"
    kill_after = random.Random(os.getpid()).randrange(5, STEPS - 2)  # a random step past the 1st
    child = _child(run_dir, project_root)

    target = kill_after - kill_after % 4  # the last checkpoint before that step

    def reached() -> bool:
        done = complete_checkpoints(run_dir / "checkpoints")
        return bool(done) and done[-1][0] >= target

    _wait_for(reached, child, f"the checkpoint of step {target}")
    time.sleep(random.Random(kill_after).uniform(0.0, 0.15))  # land anywhere in the next steps
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = complete_checkpoints(run_dir / "checkpoints")[-1][0]
    assert killed_at < STEPS, "the child finished before the kill"
    resumed = _train_to_the_end(run_dir)
    assert resumed[0].resumed_from == killed_at
    _assert_bitwise_equal(resumed, uninterrupted)


def test_sigkill_inside_a_checkpoint_save_keeps_the_previous_one(uninterrupted, tmp_path,
                                                                 project_root):
    run_dir = tmp_path / "in_save"
    child = _child(run_dir, project_root, hang_at=8)
    _wait_for(lambda: (run_dir / "in_save").exists(), child, "the save of step 8")
    child.send_signal(signal.SIGKILL)
    child.wait()
    half_written = run_dir / "checkpoints" / "step_00000008"
    assert half_written.is_dir() and not (half_written / COMPLETE_MARKER).exists()
    assert [step for step, _, _ in complete_checkpoints(run_dir / "checkpoints")] == [4]
    resumed = _train_to_the_end(run_dir)
    assert resumed[0].resumed_from == 4
    _assert_bitwise_equal(resumed, uninterrupted)
