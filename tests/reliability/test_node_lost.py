"""A node lost mid-run: two nodes of one process each (127.0.0.1), node 1's rank killed with
SIGKILL after the step-2 checkpoint. Both nodes stop within a bounded time with a message naming
the node; the checkpoint stays; the run continues from it on one process with accumulation 2
(the same global batch)."""

import json
import os
import signal
import threading
import time

import pytest

from tests.training.toy_tasks import RegressionData, RegressionTask
from tulip_pipelines.training.checkpoints import complete_checkpoints
from tulip_pipelines.training.distributed import free_port
from tulip_pipelines.training.engine import train
from tulip_pipelines.training.heartbeat import heartbeat_dir
from tulip_pipelines.training.multinode import Cluster
from tulip_pipelines.training.processes import run_distributed
from tulip_pipelines.training.train_params import TrainParams

pytestmark = pytest.mark.slow


def _plan(run_dir) -> dict:
    return {
        "builder": "tests.training.toy_tasks:build_job",
        "n": 256,
        "delay_s": 0.3,
        "node_timeout_s": 60,
        "train": dict(run_name="lost", run_dir=str(run_dir), max_steps=12, batch_size=8,
                      lr=0.05, log_every=1, checkpoint_every=2, keep_checkpoints=3),
        "ds_config": {"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0},
    }


def test_a_lost_node_stops_the_job_and_the_run_resumes_on_one_node(tmp_path, project_root,
                                                                    monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(project_root))
    run_dir = tmp_path / "run"
    port, errors = free_port(), {}

    def node(rank: int) -> None:
        cluster = Cluster(num_nodes=2, node_rank=rank, master_port=port)
        try:
            run_distributed(_plan(run_dir), 1, "torchrun", run_dir=run_dir, cluster=cluster,
                            timeout_s=150)
        except RuntimeError as err:
            errors[rank] = str(err)

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    rank1 = heartbeat_dir(run_dir) / "rank1.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # node 1's rank, once it is past the step-2 checkpoint
        record = json.loads(rank1.read_text()) if rank1.exists() else {}
        if record.get("step", 0) >= 3:
            break
        time.sleep(0.05)
    else:
        pytest.fail("node 1 never reached step 3")
    killed_at = time.monotonic()
    os.kill(record["pid"], signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a node did not stop after its peer died"
    assert time.monotonic() - killed_at < 120
    assert "node 1's torchrun exited with" in errors[1]
    assert "node 0's torchrun exited with" in errors[0]
    steps = [s for s, _, _ in complete_checkpoints(run_dir / "checkpoints")]
    assert steps and 2 <= steps[-1] < 12  # what was checkpointed stays

    # the same run continues from there on what is left: one process, accumulation 2 (the same
    # global batch; the ZeRO-1 state through DeepSpeed's universal checkpoint)
    plan = _plan(run_dir)
    result = train(RegressionTask(), RegressionData(plan["n"]),
                   TrainParams.from_params(plan["train"]),
                   {**plan["ds_config"], "gradient_accumulation_steps": 2})
    assert result.resumed_from == steps[-1] and result.final_step == 12
