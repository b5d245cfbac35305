"""Several nodes through the scheduler's own launcher. One ``kedro run`` orchestrates; a stage
with ``num_nodes > 1`` writes its launch plan (and a hostfile) into ``<run_dir>/launch/`` on the
filesystem the nodes share and starts its ranks with the stage's ``launcher``
(:func:`node_command`):

- ``srun`` (inside a SLURM allocation; there the default when ``num_nodes > 1``): one job step of
  ``num_nodes`` tasks, one a node (``--kill-on-bad-exit=1 --label``); each task (:func:`main`)
  checks that the plan and the run dir are there, then starts its node's ``num_processes`` ranks
  through DeepSpeed's launcher (``--no_ssh --node_rank R``, R from ``SLURM_NODEID``, or from
  ``SLURM_PROCID`` when more tasks than nodes share a machine).
- ``deepspeed`` with a ``hostfile``: DeepSpeed starts every node over ssh from this one.
- ``torchrun``: this node's torchrun agent on a c10d rendezvous (id: the stage name, bounded by
  ``node_timeout_s``); the other nodes are started by hand with the command this node logs.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tulip_pipelines.training.job import Cluster, NodeError

LAUNCH_DIR = "launch"
ENTRY = "tulip_pipelines.training.launch"


def node_command(cluster: Cluster, nproc: int, plan: Path, result_dir: Path, run_name: str,
                 timeout_s: float) -> list[str]:
    """The command that starts a multi-node stage's ranks from this node (``plan`` lies in the
    shared run dir's launch folder, with a hostfile of ``num_nodes`` placeholder hosts)."""
    entry = ["--plan", str(plan), "--result-dir", str(result_dir)]
    if cluster.launcher == "srun":
        nodes = min(cluster.num_nodes, int(os.environ.get("SLURM_NNODES") or 1))
        per_node = ["--ntasks-per-node", "1"] if nodes == cluster.num_nodes else []
        return ["srun", "--nodes", str(nodes), "--ntasks", str(cluster.num_nodes), *per_node,
                "--kill-on-bad-exit=1", "--label", sys.executable, "-m", __name__, *entry,
                "--master-addr", cluster.master_addr, "--master-port", str(cluster.master_port),
                "--wait-s", str(timeout_s)]
    if cluster.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(cluster.num_nodes),
                "--nproc_per_node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                f"{cluster.master_addr}:{cluster.master_port}", "--rdzv-id", run_name,
                "--rdzv-conf", f"join_timeout={int(timeout_s)}", "-m", ENTRY, *entry]
    raise NodeError(f"no multi-node command for launcher {cluster.launcher!r}")


def wait_for_plan(plan: Path, where: str, wait_s: float) -> None:
    """The plan (in ``<run_dir>/launch/``) must be visible here within ``wait_s``: else the run
    dir is not on a filesystem this node shares with the orchestrating node."""
    deadline = time.monotonic() + wait_s
    while not plan.is_file():
        if time.monotonic() > deadline:
            missing = plan if plan.parent.parent.is_dir() else plan.parent.parent
            raise NodeError(f"{where}: {missing} is not there after {wait_s:.0f} s: is the run "
                            f"dir on a filesystem this node shares with the node running kedro?")
        time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> None:
    """One srun task: this node's ranks through DeepSpeed's launcher in its no-ssh mode."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    for flag in ("--plan", "--result-dir", "--master-addr", "--master-port"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--wait-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    env = os.environ
    shared = env.get("SLURM_STEP_NUM_TASKS") == env.get("SLURM_STEP_NUM_NODES")
    rank = int(env.get("SLURM_NODEID" if shared else "SLURM_PROCID") or 0)
    where = f"node {rank} ({socket.gethostname()})"
    try:
        wait_for_plan(Path(args.plan), where, args.wait_s)
    except NodeError as err:
        sys.exit(str(err))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile",
           str(Path(args.plan).with_name("hostfile")), "--no_ssh", "--node_rank", str(rank),
           "--master_addr", args.master_addr, "--master_port", args.master_port,
           "--module", ENTRY, "--plan", args.plan, "--result-dir", args.result_dir]
    sys.stderr.write(f"{where}: starting its ranks: {' '.join(cmd)}\n")
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
