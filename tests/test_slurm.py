"""``kedro run --pipelines distill`` under SLURM, as users run it on several nodes: an ``sbatch``
job whose distill stage is an ``srun`` step of 2 tasks (they stand for 2 nodes on this one-node
SLURM, ``.ci/slurm-up``), against the same plan trained by one process with the same global batch.

The project (the module fixture ``distill_project``) holds what distill reads: the demo's
captions ingested, split and prepared as shards by ``kedro run`` (a smaller demo than the
default's), and a TULIP-Tiny teacher with random weights saved through the catalog: the test is
about how the ranks start, fail and resume, not about what they learn.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from tests.conftest import copy_project
from tulip_pipelines.training.checkpoints import complete_checkpoints
from tulip_pipelines.training.stages.base import build_job

pytestmark = pytest.mark.slow

# a smaller demo than the default's 750 groups of 4: the split keeps 40 rows for validation
DEMO = {"demo_data": {"n_groups": 60, "n_benchmark_groups": 5, "n_short_benchmark_images": 10,
                      "n_class_images": 1},
        "split": {"val_size": 40}}


@pytest.fixture(scope="module")
def distill_project(project_root, tmp_path_factory):
    """A copy of the project with distill's inputs on disk (see the module docstring)."""
    from tulip_pipelines.models import create_teacher

    project = copy_project(project_root, tmp_path_factory.mktemp("slurm") / "project")
    mp = pytest.MonkeyPatch()
    mp.chdir(project)
    mp.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project, runtime_params=DEMO) as session:
            session.run(pipeline_names=["demo_data", "ingest", "split", "prepare_images"])
            torch.manual_seed(0)
            session.load_context().catalog.save("teacher_model", create_teacher("TULIP-Tiny"))
        yield project
    finally:
        mp.undo()


class _BatchJob:
    """A submitted batch job, waited for like a process: ``poll()`` (None while it runs, else its
    exit code) and ``wait(timeout)``. Read from ``scontrol show job`` every half second, where
    ``sbatch --wait`` sleeps 2, 8, then 32 s between its looks: up to half a minute idle after
    every job."""

    DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}

    def __init__(self, job_id: str):
        self.job_id, self.returncode, self._looked = job_id, None, 0.0

    def poll(self) -> int | None:
        if self.returncode is None and time.monotonic() - self._looked >= 0.5:
            self._looked = time.monotonic()
            shown = subprocess.run(["scontrol", "show", "job", "-o", self.job_id],
                                   capture_output=True, text=True, timeout=30).stdout
            fields = dict(f.split("=", 1) for f in shown.split() if "=" in f)
            if fields.get("JobState") in self.DONE:
                code, sig = (int(x) for x in fields["ExitCode"].split(":"))
                self.returncode = code or (128 + sig if sig else 0)
                if fields["JobState"] != "COMPLETED" and not self.returncode:
                    self.returncode = 1  # ended by SLURM (cancelled, timed out, ...)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                subprocess.run(["scancel", self.job_id], timeout=30)
                pytest.fail(f"batch job {self.job_id} still running after {timeout:.0f} s")
            time.sleep(0.5)
        return self.returncode


def _sbatch(project, params: dict, log: Path, env: dict) -> _BatchJob:
    """``kedro run --pipelines distill --params ...`` as a batch job of one node and 2 tasks
    (they stand for 2 nodes), submitted with ``sbatch``; its exit code is the job's."""
    flat = ",".join(f"{k}={v}" for k, v in params.items())
    script = log.with_suffix(".sh")
    script.write_text(f"#!/bin/bash\nexec {sys.executable} -m kedro run --pipelines distill "
                      f"--params {flat}\n")
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks=2",
                                "--job-name=tulip-e2e", f"--chdir={project}", f"--output={log}",
                                str(script)], env=env, capture_output=True, text=True,
                               timeout=60, check=True)
    return _BatchJob(submitted.stdout.strip().split(";")[0])


def _kill_rank1_after_step(run_dir: Path, step: int, proc: _BatchJob) -> None:
    """SIGKILL rank 1 once it is back to training after the step-``step`` checkpoint."""
    rank1 = run_dir / "heartbeat" / "rank1.json"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            record = json.loads(rank1.read_text())
        except (OSError, ValueError):
            record = {}
        if record.get("step", 0) >= step and record.get("phase") == "train":
            os.kill(record["pid"], signal.SIGKILL)
            return
        time.sleep(0.02)
    pytest.fail(f"rank 1 never got past step {step} (job ended: {proc.poll()})")


def test_a_kedro_run_under_sbatch_trains_distill_as_an_srun_step_like_one_process(
        distill_project, slurm, tmp_path):
    """``kedro run --pipelines distill`` once, in a batch job, with distill on ``launcher:
    srun`` as 2 tasks x 1 process (two tasks on this one node stand for two nodes). Rank 1 is
    killed after the step-2 checkpoint: srun ends the step on both tasks, the run fails naming
    the task and its node, the checkpoint stays. The rerun resumes from it; its weights equal
    those of one process trained from scratch on the same launch plan with the same global batch
    (2 x 8). Rank 0's lines reach the Kedro log, every rank's the launch log, rank 0's metrics
    the stage's MLflow run."""
    project = distill_project
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "DS_ACCELERATOR": "cpu",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "COLUMNS": "300"}
    run_dir = project / "data/06_models/runs/distill_srun"
    params = {"distill.run_dir": "data/06_models/runs/distill_srun", "distill.num_nodes": 2,
              "distill.launcher": "srun", "distill.train.max_steps": 8,
              "distill.train.batch_size": 8, "distill.train.log_every": 1,
              "distill.train.val_every": 0,
              "distill.train.checkpoint_every": 2, "distill.train.warmup_steps": 2}
    first = _sbatch(project, params, tmp_path / "first.log", env)
    _kill_rank1_after_step(run_dir, 2, first)
    assert first.wait(timeout=300) != 0
    log = (tmp_path / "first.log").read_text()
    assert re.search(rf"distill: srun exited with \d+ \(task 1 on {slurm}: .*srun ended the "
                     rf"step on every node\)", log), log[-3000:]
    steps = [s for s, _, _ in complete_checkpoints(run_dir / "checkpoints")]
    assert steps and 2 <= steps[-1] < 8  # what was checkpointed stays

    second = _sbatch(project, params, tmp_path / "second.log", env)
    code, log = second.wait(timeout=600), (tmp_path / "second.log").read_text()
    assert code == 0, log[-3000:]
    assert f"resumed from step_{steps[-1]:08d}" in log  # rank 0's lines in the Kedro log
    assert "distill step 8/8" in log
    launch_log = (run_dir / "launch.log").read_text()
    assert "0: [rank 0] " in launch_log and "1: [rank 1] " in launch_log
    card = json.loads((project / "data/06_models/distilled_model/config.json").read_text())
    assert card["extra"]["training"]["resumed_from"] == steps[-1]
    # rank 0, in the srun step, logged its steps to the stage's MLflow run
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(card["extra"]["mlflow_run_id"])
    loss = f"train/loss_{run.data.tags['tulip.loss']}"  # the loss named by its kind
    history = client.get_metric_history(run.info.run_id, loss)
    assert sorted(m.step for m in history) == list(range(steps[-1] + 1, 9))

    # the same launch plan trained from scratch by one process with the global batch (2 x 8), in
    # this process: the data order and the schedule count global batches, whatever the layout
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(project)  # the plan's relative paths
    try:
        plan = json.loads((run_dir / "launch" / "plan.json").read_text())
        plan["params"].update(run_dir=str(tmp_path / "one_process"), num_nodes=1, launcher=None,
                              num_processes=1)
        plan["params"]["train"]["batch_size"] *= 2
        job = build_job(plan)
        job.train(plan["ds_config"])
    finally:
        monkeypatch.undo()
    one_process = job.exported_model().model.state_dict()
    two_tasks = _weights(project, "distilled")
    assert two_tasks.keys() == one_process.keys()
    for name, value in one_process.items():
        torch.testing.assert_close(two_tasks[name], value, rtol=1e-5, atol=1e-6, msg=name)


def _weights(project, stage):
    from safetensors.torch import load_file

    return load_file(project / f"data/06_models/{stage}_model/model.safetensors")
