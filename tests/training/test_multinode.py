"""Several nodes (training/multinode.py): where a node stands (parameters, then SLURM's
environment), and the file protocol through the shared run dir with its bounded failures: a
node that never answers, a run dir that is not shared, other parameters on another node, a node
0 that dies, a master that never answers."""

import threading
import time

import pytest

from tulip_pipelines.training.distributed import free_port, join_group
from tulip_pipelines.training.multinode import Cluster, NodeError, NodeZero, OtherNode


def test_parameters_come_first_then_the_schedulers_environment():
    slurm = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "MASTER_ADDR": "node-a",
             "MASTER_PORT": "29555"}
    assert Cluster.resolve(environ={}) == Cluster(1, 0, "127.0.0.1", 29500)
    assert Cluster.resolve(environ=slurm) == Cluster(4, 2, "node-a", 29555)
    assert Cluster.resolve(2, 1, "10.0.0.1", None, environ=slurm) == Cluster(2, 1, "10.0.0.1",
                                                                            29555)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_nodes=2, node_rank=2, master_addr="h"), r"node 2: distill.node_rank=2 is out of "
                                                      r"range for num_nodes=2 \(0 to 1\)"),
    (dict(num_nodes=2, node_rank=-1, master_addr="h"), "out of range"),
    (dict(num_nodes=3, node_rank=1), r"node 1: distill.master_addr is not set"),
    (dict(num_nodes=0), r"distill.num_nodes must be an integer >= 1"),
    (dict(num_nodes=2, master_addr="h", hostfile="hosts"), "either hostfile"),
])
def test_bad_node_settings_name_the_node_and_the_cause(kwargs, message):
    with pytest.raises(NodeError, match=message):
        Cluster.resolve(**kwargs, where="distill", environ={})


def _two(tmp_path, timeout_s=5.0):
    cluster = Cluster(num_nodes=2, node_rank=0, master_addr="127.0.0.1")
    other = Cluster(num_nodes=2, node_rank=1, master_addr="127.0.0.1")
    return (NodeZero(tmp_path, cluster, timeout_s),
            OtherNode(tmp_path, other, timeout_s))


def _in_thread(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except Exception as err:  # noqa: BLE001 - handed back to the test
            box["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def test_nodes_agree_and_the_other_node_gets_the_plan(tmp_path):
    zero, other = _two(tmp_path)
    zero.open()
    thread, box = _in_thread(lambda: (other.join("fp-1"), other.poll_plan()))
    zero.gather("fp-1")
    thread.join()
    assert box == {"value": (None, None)}  # joined; no plan yet
    zero.publish({"stage": "distill"})
    assert other.poll_plan() == {"stage": "distill"}
    zero.close()
    with pytest.raises(NodeError, match="node 1: no live node 0"):
        OtherNode(tmp_path, other.cluster, 1.5).join("fp-1")  # an ended session is not live


def test_other_parameters_on_another_node_stop_both(tmp_path):
    zero, other = _two(tmp_path)
    zero.open()
    thread, box = _in_thread(lambda: other.join("fp-2"))
    with pytest.raises(NodeError, match=r"node 0: node 1 \(.*\) runs other parameters"):
        zero.gather("fp-1")
    thread.join()
    assert "node 1: node 0 stopped the job: node 1" in str(box["error"])


def test_a_node_that_never_answers_stops_node_0_in_bounded_time(tmp_path):
    zero, _ = _two(tmp_path, timeout_s=1.0)
    zero.open()
    started = time.monotonic()
    with pytest.raises(NodeError, match=r"node\(s\) \[1\] did not answer within 1 s: not "
                                        r"started, or .* is not on a filesystem"):
        zero.gather("fp")
    assert time.monotonic() - started < 5


def test_a_run_dir_that_is_not_shared_stops_the_other_node(tmp_path):
    """Node 1 looks at its own copy of the run dir: node 0's session never appears there."""
    zero = NodeZero(tmp_path / "node0_disk", Cluster(2, 0, "127.0.0.1"), 1.0).open()
    other = OtherNode(tmp_path / "node1_disk", Cluster(2, 1, "127.0.0.1"), 1.0)
    with pytest.raises(NodeError, match=r"node 1: no live node 0 in .* within 1 s: node 0 did "
                                        r"not start, or the run dir is not on a filesystem"):
        other.join("fp")
    zero.close()


def test_a_node_0_that_dies_stops_the_waiting_node(tmp_path):
    zero, other = _two(tmp_path, timeout_s=2.0)
    zero.open()
    thread, _ = _in_thread(lambda: other.join("fp"))
    zero.gather("fp")
    thread.join()
    zero._stop.set()  # its counter stops as if the process were killed (no "ended" written)
    zero._beat.join()
    started = time.monotonic()
    with pytest.raises(NodeError, match="node 1: node 0 stopped answering"):
        while other.poll_plan() is None:
            time.sleep(0.1)
    assert time.monotonic() - started < 6


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


def test_node_counts_and_ranks_at_both_ends():
    """num_nodes from 1; node_rank from 0 to num_nodes - 1 (parameters and SLURM's variables)."""
    assert Cluster.resolve(1, 0, environ={}).num_nodes == 1
    assert Cluster.resolve(3, 2, "h", environ={}).node_rank == 2
    assert Cluster.resolve(3, 0, "h", environ={}).node_rank == 0
    for nodes, rank in ((0, 0), (3, 3), (3, -1)):
        with pytest.raises(NodeError, match="num_nodes must be an integer >= 1" if nodes < 1
                           else "node_rank=.* is out of range"):
            Cluster.resolve(nodes, rank, "h", environ={})
    slurm = {"SLURM_NNODES": "3", "SLURM_NODEID": "3", "MASTER_ADDR": "h"}
    with pytest.raises(NodeError, match="out of range"):
        Cluster.resolve(environ=slurm)
    assert Cluster.resolve(environ={**slurm, "SLURM_NODEID": "2"}).node_rank == 2
