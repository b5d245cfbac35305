"""Starting training processes on this node (training/processes.py): two CPU processes (gloo on
127.0.0.1) through DeepSpeed's launcher and torchrun, their output streamed to the launch log
while they run, rank 0's metrics logged to MLflow as they come, the launcher command lines for
one node and for DeepSpeed's ssh mode (several nodes through srun or torchrun's c10d
rendezvous: test_multinode.py)."""

import re
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from tests.conftest import mlflow_store
from tests.training.toy_tasks import RegressionTask
from tulip_pipelines.training.checkpoints import COMPLETE_MARKER, complete_checkpoints
from tulip_pipelines.training.deepspeed_setup import free_port
from tulip_pipelines.training.multinode import Cluster
from tulip_pipelines.training.processes import launcher_command, log_path, run_distributed


def _plan(run_dir: Path, delay_s: float = 0.0) -> dict:
    return {
        "builder": "tests.training.toy_tasks:build_job",
        "n": 256,
        "delay_s": delay_s,
        "train": dict(run_name="zero2", run_dir=str(run_dir), max_steps=6, batch_size=8,
                      lr=0.05, log_every=1, checkpoint_every=3),
        "ds_config": {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0},
    }


def _watch(path: Path, run_id: str, stop: threading.Event, sizes: list[int],
           logged: list[int]) -> None:
    """The launch log's size and the number of loss values in MLflow, while the run goes."""
    client = mlflow.MlflowClient()
    while not stop.wait(0.1):
        size = path.stat().st_size if path.exists() else 0
        if not sizes or sizes[-1] != size:
            sizes.append(size)
        count = len(client.get_metric_history(run_id, "train/loss"))
        if not logged or logged[-1] != count:
            logged.append(count)


@pytest.mark.slow
def test_two_processes_train_with_zero2_stream_their_output_and_log_as_they_go(
        tmp_path, project_root, monkeypatch):
    """Trained through DeepSpeed's launcher (ZeRO-2 over both ranks; rank 0 logging to an MLflow
    run while it trains, the launch log growing meanwhile). (torchrun: the next test; resuming
    sharded checkpoints: tests/training/test_checkpoints.py and test_stage_run.py.)"""
    monkeypatch.setenv("PYTHONPATH", str(project_root))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_dir = tmp_path / "run"
    mlflow.set_tracking_uri(mlflow_store(tmp_path / "mlflow.db"))
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("launch")).info.run_id
    plan = {**_plan(run_dir, delay_s=0.4),
            "mlflow": {"tracking_uri": mlflow.get_tracking_uri(), "run_id": run_id,
                       "send_every_s": 0.5}}

    port = free_port()
    task, sizes, logged, stop = RegressionTask(), [], [], threading.Event()
    initial = task.head.weight.detach().clone()
    watcher = threading.Thread(target=_watch,
                               args=(log_path(run_dir), run_id, stop, sizes, logged))
    watcher.start()
    started = time.time()
    try:
        result = run_distributed(plan, nproc=2, launcher="deepspeed", run_dir=run_dir,
                                 module=task, timeout_s=300, cluster=Cluster(master_port=port))
    finally:
        stop.set()
        watcher.join()
    ended = time.time()

    assert result.final_step == 6
    assert result.history["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert not torch.equal(task.head.weight, initial)
    # the log grew in many steps while the ranks ran, every rank's lines prefixed
    assert len([s for s in sizes if s > 0]) >= 5, sizes
    text = log_path(run_dir).read_text()
    assert "[rank 0] " in text and "[rank 1] " in text and "zero2 step 6/6" in text
    # DeepSpeed's CPU shared-memory workspaces (64 MB a rank): each rank unlinked its name
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}\] .*released DeepSpeed's shared-memory allreduce "
                         rf"workspace name deepspeed_allreduce_buffer_\d+_\S+_{port}_{rank}\n",
                         text), text[-2000:]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    # the metrics reached MLflow while training went on (in batches every 0.5 s), not at the end
    assert any(0 < count < 6 for count in logged), logged
    # 6 steps, stamped when they were made: ~0.4 s or more apart
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4, 5, 6]
    stamps = sorted(m.timestamp / 1000 for m in history)
    assert stamps[-1] - stamps[0] >= 1.5, stamps
    assert started <= stamps[0] and stamps[-1] <= ended
    np_losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert np_losses == pytest.approx(result.history["loss"].tolist(), rel=1e-6)

    ckpt = Path(result.last_checkpoint)
    assert (ckpt / COMPLETE_MARKER).is_file()
    assert [s for s, _, _ in complete_checkpoints(ckpt.parent)] == [3, 6]
    assert sorted(p.name for p in ckpt.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True, map_location="cpu")
    assert state["dp_world_size"] == 2 and state["global_steps"] == 6
    for name, value in task.state_dict().items():  # 0-dim parameters are saved as shape [1]
        assert torch.equal(state["module"][name].reshape(value.shape), value), name


def test_a_failed_launch_names_the_node_and_shows_every_rank(tmp_path, project_root, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(project_root))
    plan = {**_plan(tmp_path / "run"), "builder": "tests.training.toy_tasks:nothing_here"}
    with pytest.raises(RuntimeError, match=r"training: torchrun exited with 1") as err:
        run_distributed(plan, nproc=2, launcher="torchrun", run_dir=tmp_path / "run",
                        timeout_s=300)
    assert "[rank 1] " in str(err.value) and "nothing_here" in str(err.value)


def test_launcher_commands_for_one_node_and_for_the_ssh_mode(tmp_path):
    one = Cluster(master_port=29500)
    for launcher, flag in [("deepspeed", "--num_gpus"), ("torchrun", "--nproc_per_node")]:
        cmd = launcher_command(launcher, 3, tmp_path / "s.json", tmp_path / "r", one)
        assert cmd[cmd.index(flag) + 1] == "3"
        assert "tulip_pipelines.training.launch" in cmd and "127.0.0.1" in cmd
    ssh = Cluster(master_addr="10.0.0.5", master_port=29400, hostfile="hosts")
    cmd = launcher_command("deepspeed", 8, tmp_path / "s.json", tmp_path / "r", ssh)
    assert cmd[cmd.index("--hostfile") + 1] == "hosts" and "--no_ssh" not in cmd
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.5"
    with pytest.raises(ValueError, match="launcher"):
        launcher_command("mpirun", 2, tmp_path / "s.json", tmp_path / "r", one)


RANK_OUTPUT = r"""
import sys
lines = ["[rank 0] [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Read "
         "error [127.0.0.1]:29500: Connection reset by peer",
         "[rank 0] closing tag [/x] and [bold]bold[/bold] and [/data/runs/expand]",
         "[rank 1] [/x] [bold] on another rank"]
lines += [f"[rank {int(i % 50 > 0)}] line {i} [/x] " + "[bold]" * 250 for i in range(1000)]  # 1 MB
for line in lines:
    print(line)
print("[rank 0] done")
"""


def test_the_output_pump_outlives_lines_that_look_like_markup(tmp_path):
    """Kedro's rich handler reads markup: ``[/...]`` from a gloo warning raised MarkupError in
    the launch-output thread, which ended; the ranks then blocked on the full pipe (a hang with
    no error). A rank printing bracketed paths, ``[/x]``, ``[bold]`` and 1 MB finishes, every
    line in launch.log, rank 0's in the log as plain text."""
    import io
    import logging
    import subprocess
    import sys

    from rich.console import Console
    from rich.logging import RichHandler

    from tulip_pipelines.training import processes

    console = io.StringIO()
    handler = RichHandler(console=Console(file=console, width=10_000), markup=True)  # Kedro's
    pump_logger = logging.getLogger(processes.__name__)
    pump_logger.addHandler(handler)
    old_level = pump_logger.level
    pump_logger.setLevel(logging.INFO)
    log_file = tmp_path / "launch.log"
    script = tmp_path / "rank.py"
    script.write_text(RANK_OUTPUT)
    try:
        code, tail = processes._run_streaming([sys.executable, str(script)],
                                              {"PATH": "/usr/bin:/bin"}, log_file, timeout_s=120,
                                              rank0="[rank 0]")
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks blocked: the output pump stopped reading")
    finally:
        pump_logger.removeHandler(handler)
        pump_logger.setLevel(old_level)
    assert code == 0
    written = log_file.read_text().splitlines()[1:]  # after the command line
    expected = subprocess.run([sys.executable, str(script)], capture_output=True,
                              text=True, check=True).stdout.splitlines()
    assert written == expected and len(expected) == 1004
    assert sum(len(line) + 1 for line in expected) > 1_000_000
    shown = console.getvalue()
    assert "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561]" in shown
    assert "[bold]bold[/bold]" in shown and "done" in shown
