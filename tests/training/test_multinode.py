"""Several nodes (training/multinode.py) without a scheduler: how a stage's nodes start
(parameters, then SLURM's environment), the bad inputs that stop before any work (srun outside
an allocation, more nodes than the allocation holds, nothing to start the other nodes), the
commands of an srun step and of a torchrun c10d node, one srun task's checks (a plan that is not
on a shared filesystem, its node rank), a master that never answers and a port in use. The real
srun step: tests/test_slurm.py (the ``slurm`` fixture)."""

import socket
import time

import pytest

from tulip_pipelines.training import multinode, processes
from tulip_pipelines.training.deepspeed_setup import free_port, join_group
from tulip_pipelines.training.multinode import Cluster, NodeError, node_command
from tulip_pipelines.training.processes import check_port, run_distributed

HOST = socket.gethostname()
JOB = {"SLURM_JOB_ID": "42", "SLURM_NNODES": "4", "MASTER_ADDR": "node-a",
       "MASTER_PORT": "29555"}


def test_parameters_come_first_then_the_schedulers_environment():
    assert Cluster.resolve(environ={}) == Cluster(1, "127.0.0.1", None, None, "deepspeed")
    # inside an allocation of 4 nodes: 4 nodes through srun, node 0's address from the job
    assert Cluster.resolve(environ=JOB) == Cluster(4, "node-a", 29555, None, "srun")
    assert Cluster.resolve(2, "10.0.0.1", None, environ=JOB) == Cluster(2, "10.0.0.1", 29555,
                                                                       None, "srun")
    # one node in an allocation: this process starts its ranks itself
    assert Cluster.resolve(1, environ=JOB).launcher == "deepspeed"
    # several nodes by hand: node 0 is this host unless told
    hand = Cluster.resolve(2, launcher="torchrun", environ={})
    assert (hand.master_addr, hand.master_port, hand.launcher) == (HOST, None, "torchrun")
    assert Cluster.resolve(hostfile="hosts", environ={}).hostfile == "hosts"
    # the hostfile lists the nodes, also inside an allocation
    assert Cluster.resolve(hostfile="hosts", environ=JOB) == Cluster(1, "node-a", 29555, "hosts",
                                                                     "deepspeed")


@pytest.mark.parametrize("kwargs, environ, message", [
    (dict(num_nodes=2, launcher="srun"), {}, r"distill.launcher is srun, but this is not inside "
                                             r"a SLURM allocation \(SLURM_JOB_ID is not set\)"),
    (dict(num_nodes=5), JOB, r"distill.num_nodes=5, but the allocation \(job 42\) holds 4 "
                             r"node\(s\): ask sbatch/salloc for --nodes=5"),
    (dict(num_nodes=3), {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_NTASKS": "2"},
     r"holds 1 node"),
    (dict(num_nodes=2), {}, r"distill.num_nodes=2: nothing starts the other nodes"),
    (dict(num_nodes=0), {}, r"distill.num_nodes must be an integer >= 1"),
    (dict(num_nodes=2, hostfile="hosts"), {}, "hostfile is DeepSpeed's ssh mode"),
    (dict(hostfile="hosts", launcher="torchrun"), {}, "hostfile is DeepSpeed's ssh mode"),
    (dict(), {"SLURM_NNODES": "two"}, r"SLURM_NNODES='two' is not a number"),
])
def test_bad_node_parameters_stop_before_any_work(kwargs, environ, message):
    with pytest.raises(NodeError, match=message):
        Cluster.resolve(**kwargs, where="distill", environ=environ)


def test_two_tasks_on_one_node_stand_for_two_nodes():
    """An allocation of 1 node and 2 tasks (sbatch -n2) runs a 2-node stage as 2 tasks there."""
    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_NTASKS": "2"}
    assert Cluster.resolve(2, environ=env).launcher == "srun"


def test_the_srun_step_and_the_torchrun_node(tmp_path, monkeypatch):
    plan, out = tmp_path / "launch" / "plan.json", tmp_path / "launch" / "result"
    cluster = Cluster(2, "node-a", 29400, None, "srun")
    monkeypatch.setenv("SLURM_NNODES", "2")
    cmd = node_command(cluster, 4, plan, out, "distill", 120)
    assert cmd[:9] == ["srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1",
                       "--kill-on-bad-exit=1", "--label"]
    assert cmd[cmd.index("-m") + 1] == "tulip_pipelines.training.multinode"
    assert cmd[cmd.index("--plan") + 1] == str(plan)
    assert cmd[cmd.index("--master-addr") + 1] == "node-a"
    assert cmd[cmd.index("--master-port") + 1] == "29400"
    monkeypatch.setenv("SLURM_NNODES", "1")  # 2 tasks sharing the allocation's one node
    cmd = node_command(cluster, 4, plan, out, "distill", 120)
    assert cmd[:5] == ["srun", "--nodes", "1", "--ntasks", "2"] and "--ntasks-per-node" not in cmd
    cmd = node_command(Cluster(2, "node-a", 29400, None, "torchrun"), 4, plan, out, "distill",
                       120)
    for flag, value in (("--nnodes", "2"), ("--nproc_per_node", "4"), ("--rdzv-backend", "c10d"),
                        ("--rdzv-endpoint", "node-a:29400"), ("--rdzv-id", "distill"),
                        ("--rdzv-conf", "join_timeout=120")):
        assert cmd[cmd.index(flag) + 1] == value, flag


def _task(monkeypatch, tmp_path, **slurm) -> list[str]:
    """multinode.main as one srun task would run it; returns the command it would exec."""
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    started = []
    monkeypatch.setattr(multinode.os, "execv", lambda path, cmd: started.append(cmd))
    multinode.main(["--plan", str(tmp_path / "launch" / "plan.json"), "--result-dir", "out",
                    "--master-addr", "node-a", "--master-port", "29400", "--wait-s", "1"])
    return started[0]


def test_a_task_takes_its_node_rank_from_slurm(tmp_path, monkeypatch):
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "plan.json").write_text("{}")
    # one task a node: SLURM_NODEID; tasks sharing a node: SLURM_PROCID
    cmd = _task(monkeypatch, tmp_path, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="2",
                SLURM_NODEID="1", SLURM_PROCID="0")
    assert cmd[cmd.index("--node_rank") + 1] == "1" and "--no_ssh" in cmd
    assert cmd[cmd.index("--hostfile") + 1] == str(tmp_path / "launch" / "hostfile")
    cmd = _task(monkeypatch, tmp_path, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="1",
                SLURM_NODEID="0", SLURM_PROCID="1")
    assert cmd[cmd.index("--node_rank") + 1] == "1"


@pytest.mark.parametrize("made", ["", "launch"])
def test_a_task_that_cannot_see_the_plan_names_its_node_and_the_path(tmp_path, monkeypatch,
                                                                     made):
    """The run dir (or its plan) is not on a filesystem this node shares: the task stops
    within its wait, naming the node and what it did not find."""
    run_dir = tmp_path / "run"
    if made:
        (run_dir / made).mkdir(parents=True)
    started = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        _task(monkeypatch, run_dir, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="2",
              SLURM_NODEID="1", SLURM_PROCID="1")
    missing = run_dir / "launch" / "plan.json" if made else run_dir
    assert str(stop.value) == (f"node 1 ({HOST}): {missing} is not there after 1 s: is the run "
                               f"dir on a filesystem this node shares with the node running "
                               f"kedro?")
    assert time.monotonic() - started < 5


def test_a_master_that_never_answers_is_named(monkeypatch):
    port = free_port()
    for key, value in dict(RANK="3", WORLD_SIZE="4", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"rank 3 on .*: no rendezvous on the master "
                                           rf"127.0.0.1:{port} within 2 s .*is node 0 running"):
        join_group("gloo", 2.0)
    assert time.monotonic() - started < 10


def test_node_counts_at_both_ends():
    """num_nodes from 1 (a parameter or SLURM_NNODES); 0 and -1 stop with the parameter named."""
    assert Cluster.resolve(1, environ={}).num_nodes == 1
    assert Cluster.resolve(2, "h", launcher="torchrun", environ={}).num_nodes == 2
    for nodes in (0, -1):
        with pytest.raises(NodeError, match=rf"stage.num_nodes must be an integer >= 1, "
                                            rf"got {nodes}"):
            Cluster.resolve(nodes, environ={})
    with pytest.raises(NodeError, match="num_nodes must be an integer >= 1, got 0"):
        Cluster.resolve(environ={"SLURM_NNODES": "0"})


def test_a_port_in_use_is_named_and_an_unset_port_is_a_free_one(tmp_path, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"master_port {port} on {HOST} is in use"):
            check_port(Cluster(master_port=port))
        for key, value in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(port)).items():
            monkeypatch.setenv(key, value)
        with pytest.raises(RuntimeError, match=rf"rank 0 on .*: port {port} is in use"):
            join_group("gloo", 2.0)
    check_port(Cluster(master_port=port))  # free again
    # master_port unset: each run takes a free port of its own (two runs on one machine)
    seen = []

    def fake_run(cmd, env, log_file, timeout_s, rank0):
        seen.append(int(cmd[cmd.index("--master_port") + 1]))
        with socket.socket() as held:  # the first run's port stays taken during the second
            held.bind(("", seen[-1]))
            held.listen()
            if len(seen) == 1:
                with pytest.raises(RuntimeError, match="exited with 1"):
                    run_distributed({}, 2, "torchrun", run_dir=tmp_path / "b")
        return 1, []

    monkeypatch.setattr(processes, "_run_streaming", fake_run)
    with pytest.raises(RuntimeError, match="training: torchrun exited with 1"):
        run_distributed({}, 2, "torchrun", run_dir=tmp_path / "a")
    assert len(seen) == 2 and seen[0] != seen[1]


def test_srun_ending_the_step_is_told_in_words():
    tail = ["1: [rank 1] step 3\n", "srun: error: vm: task 1: Killed\n",
            "srun: Job step aborted: Waiting up to 32 seconds for job step to finish.\n"]
    assert processes._hint(tail) == (" (task 1 on vm: Killed; srun ended the step on every "
                                     "node)")
