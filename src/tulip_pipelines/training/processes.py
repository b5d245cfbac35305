"""Starting a stage's training processes on this node and waiting for them: DeepSpeed's launcher
(or torchrun) as a child process, its output streamed as it comes, a warning when the run stalls.

What the ranks print reaches ``<run_dir>/launch.log`` (every node's, through srun or torchrun),
every line prefixed with its rank (``[rank 1] ...``; :mod:`.launch` prefixes them; srun adds its
task number), and rank 0's lines also reach this process's log (the Kedro log). Rank 0 logs its
metrics to MLflow itself while it trains (the launch plan names the run); nothing is replayed
afterwards.

On a CPU-only machine set ``DS_ACCELERATOR=cpu``; the ranks then talk over gloo, and with
DeepSpeed's launcher ``LOCAL_SIZE`` gives the CPU accelerator's "device" count.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tulip_pipelines.training.deepspeed_setup import free_port
from tulip_pipelines.training.job import TrainResult
from tulip_pipelines.training.launch import RANK_PREFIX, read_result
from tulip_pipelines.training.multinode import LAUNCH_DIR, Cluster, node_command
from tulip_pipelines.training.run_dir import StallWatch, clear_heartbeats

logger = logging.getLogger(__name__)

# variables of an enclosing launch that must not leak into a fresh one
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE")
TAIL_LINES = 60  # of every rank's output, in the error when the launch fails


def launcher_command(launcher: str, nproc: int, plan_path: Path, result_dir: Path,
                     cluster: Cluster) -> list[str]:
    """The command line that runs :mod:`.launch` on ``nproc`` processes of this node (with
    ``cluster.hostfile``: DeepSpeed's own multi-node mode, which starts every host listed there
    over ssh)."""
    entry = ["tulip_pipelines.training.launch", "--plan", str(plan_path),
             "--result-dir", str(result_dir)]
    common = ["--master_addr", cluster.master_addr, "--master_port", str(cluster.master_port)]
    if launcher == "deepspeed":
        runner = [sys.executable, "-m", "deepspeed.launcher.runner"]
        if cluster.hostfile:
            return [*runner, "--hostfile", cluster.hostfile, "--num_gpus", str(nproc), *common,
                    "--module", *entry]
        return [*runner, "--num_gpus", str(nproc), *common, "--module", *entry]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--node_rank", "0", "--nproc_per_node", str(nproc), *common, "-m", *entry]
    raise ValueError(f"launcher on one node must be deepspeed or torchrun, got {launcher!r}")


def log_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "launch.log"


def check_port(cluster: Cluster) -> None:
    """Node 0's rendezvous port must be free on this machine when node 0 is this machine."""
    if cluster.several and cluster.master_addr not in ("127.0.0.1", "localhost",
                                                       socket.gethostname()):
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", cluster.master_port))
        except OSError as err:
            raise RuntimeError(
                f"master_port {cluster.master_port} on {socket.gethostname()} is in use "
                f"({err.strerror}; another run on this machine?): leave master_port unset to "
                f"take a free port, or give another") from None


def run_distributed(
    plan: Mapping[str, Any],
    nproc: int,
    launcher: str = "deepspeed",
    *,
    run_dir: str | Path,
    run_name: str = "training",
    stall_minutes: float = 30.0,
    cluster: Cluster | None = None,
    module: torch.nn.Module | None = None,
    result_dir: str | Path | None = None,
    timeout_s: float | None = None,
) -> TrainResult:
    """Train ``plan``'s job on ``nproc`` processes of each of ``cluster``'s nodes (default: this
    one) through ``launcher`` (over several nodes or with srun: ``cluster.launcher``, see
    :mod:`.multinode`), and wait. ``run_dir``: the run's folder (launch log, heartbeats; the
    launch plan of a multi-node stage), ``stall_minutes``: see :class:`~.run_dir.StallWatch`.

    Returns rank 0's result (``module``: load the trained weights into it). The output goes to
    the run dir's launch log (see the module docstring); a failed launch raises with the last
    lines of every rank.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    cluster = cluster or Cluster()
    if cluster.master_port is None:  # as torchrun's --standalone: a free port on this machine
        cluster = dataclasses.replace(cluster, master_port=free_port())
    else:
        check_port(cluster)
    run_dir = Path(run_dir)
    stepped = cluster.several or cluster.launcher == "srun"  # a plan the nodes share
    launcher = cluster.launcher if stepped else launcher
    with tempfile.TemporaryDirectory(prefix="tulip-launch-") as tmp:
        folder = run_dir / LAUNCH_DIR if stepped else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        out_dir = Path(result_dir) if result_dir is not None else folder / "result"
        shutil.rmtree(out_dir, ignore_errors=True)  # never read a previous run's result
        plan_path = folder / "plan.json"
        plan_path.write_text(json.dumps(dict(plan)))
        rank0 = RANK_PREFIX.format(rank=0)
        if stepped:
            (folder / "hostfile").write_text(
                "".join(f"node-{i} slots={nproc}\n" for i in range(cluster.num_nodes)))
            cmd = node_command(cluster, nproc, plan_path, out_dir, run_name,
                               float(plan.get("node_timeout_s") or 300))
            if launcher == "srun":  # --label: "0: [rank 0] ..." (task numbers padded alike)
                rank0 = f"{0:>{len(str(cluster.num_nodes - 1))}}: {rank0}"
            else:
                logger.info("%s: start the other %d node(s) by hand, each with: %s", run_name,
                            cluster.num_nodes - 1, " ".join(["torchrun", *cmd[3:]]))
        else:
            cmd = launcher_command(launcher, nproc, plan_path, out_dir, cluster)
        env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        if env.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
            env["LOCAL_SIZE"] = str(nproc)
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        clear_heartbeats(run_dir)
        log_file = log_path(run_dir)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logger.info("%s: starting %d node(s) x %d training processes (output: %s): %s",
                    run_name, cluster.num_nodes, nproc, log_file, " ".join(cmd))
        with StallWatch(run_dir, run_name, stall_minutes):
            returncode, tail = _run_streaming(cmd, env, log_file, timeout_s, rank0)
        if returncode != 0:
            raise RuntimeError(
                f"{run_name}: {launcher} exited with {returncode}{_hint(tail)}; the last lines "
                f"of its ranks ({log_file}):\n" + "".join(tail))
        return read_result(out_dir, module)


def _run_streaming(cmd: list[str], env: dict[str, str], log_file: Path,
                   timeout_s: float | None, rank0: str) -> tuple[int, list[str]]:
    """Run ``cmd`` in its own process group; every output line goes to ``log_file`` (flushed
    line by line) and rank 0's to this process's log. Returns the exit code and the last lines.
    A timeout or an interrupt ends the whole group."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    with open(log_file, "a", buffering=1) as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)

        def pump() -> None:
            for line in proc.stdout:
                _pass_on(line, log, tail, rank0)

        reader = threading.Thread(target=pump, name="launch-output", daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout_s)
        except BaseException:  # a timeout, Ctrl-C or an error in this process: end the ranks
            _kill_group(proc)
            raise
        finally:
            reader.join(timeout=10)
    return proc.returncode, list(tail)


def _pass_on(line: str, log, tail: collections.deque, rank0: str) -> None:
    """One line of the ranks' output: into the launch log, the tail, and (rank 0's) this
    process's log, as plain text (``markup: False``: Kedro's rich handler would read
    ``[/path/...]`` or ``[bold]`` as markup and raise). Whatever one line does, the pump goes
    on reading: a pump that stops leaves the ranks blocked on a full pipe, a hang without an
    error."""
    try:
        log.write(line)
    except (OSError, ValueError) as err:  # a full disk: keep the ranks' pipe flowing
        logger.warning("launch log: could not write a line (%s)", err)
    tail.append(line)
    if line.startswith(rank0):
        try:
            logger.info("%s", line[len(rank0):].rstrip(), extra={"markup": False})
        except Exception:  # noqa: BLE001 - a handler's error must not end the pump
            logger.debug("could not log a rank 0 line", exc_info=True)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def _hint(tail: list[str]) -> str:
    """A cause in words for the usual multi-node failures, read from the ranks' last lines."""
    killed = re.search(r"srun: error: (\S+): tasks? ([\d,-]+): (.+)", "".join(tail))
    if killed:  # srun ended the step on every node (--kill-on-bad-exit)
        host, task, cause = killed.groups()
        return f" (task {task} on {host}: {cause.strip()}; srun ended the step on every node)"
    text = "".join(tail).lower()
    if "timed out" in text or ("timeout" in text and ("store" in text or "connect" in text)):
        return (" (the rendezvous timed out: the master address did not answer, or another "
                "node did not join)")
    if "connection reset" in text or "connection closed" in text or "broken pipe" in text:
        return " (a peer went away: another node or rank died)"
    return ""
