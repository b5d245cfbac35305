"""Multi-process training: the per-rank entry point for DeepSpeed's launcher (or torchrun), the
launch plan it reads and the result rank 0 writes (:mod:`.processes` starts it from a Kedro node
and reads the result back).

A *launch plan* is a JSON-able dict with ``"builder": "package.module:function"`` and
``"ds_config"`` (DeepSpeed's config); the builder gets the whole plan and returns a
:class:`~tulip_pipelines.training.job.TrainJob` (every rank builds the same job; relative paths
resolve against the working directory, which the ranks inherit from the caller). Run it by hand
with::

    deepspeed --num_gpus 4 --module tulip_pipelines.training.launch --plan p.json --result-dir out
    # several nodes: add --hostfile hosts (passwordless ssh; run_dir on a shared filesystem,
    # since rank 0 marks a checkpoint complete only after every rank wrote its shards there);
    # srun and torchrun's c10d rendezvous: see multinode.py
    torchrun --nproc_per_node 2 -m tulip_pipelines.training.launch --plan plan.json --result-dir out

Rank 0 writes into ``--result-dir``: ``history.parquet``, ``result.json`` (final step, resumed
from, checkpoint dir, wall time, final metrics) and ``model.safetensors`` (the task's trained
float32 state, loadable with ``safetensors.torch.load_model``).

Optional plan keys: ``"mlflow"`` (``{"tracking_uri", "run_id", "send_every_s"}``: rank 0 logs its
metrics to that run as it trains) and ``"node_timeout_s"`` (how long the ranks wait for each
other to join).
Every line a rank prints is prefixed with ``[rank R]`` (:data:`RANK_PREFIX`).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tulip_pipelines.training.job import TrainJob, TrainResult

logger = logging.getLogger(__name__)

RANK_PREFIX = "[rank {rank}] "


def job_from_plan(plan: Mapping[str, Any]) -> TrainJob:
    """Import the plan's ``builder`` (``"module:function"``) and call it with the plan."""
    ref = plan.get("builder")
    if not isinstance(ref, str) or ":" not in ref:
        raise ValueError(f"launch plan: 'builder' must be 'package.module:function', got {ref!r}")
    module_name, func_name = ref.split(":", 1)
    builder = getattr(importlib.import_module(module_name), func_name, None)
    if builder is None:
        raise ValueError(f"launch plan: {module_name!r} has no function {func_name!r}")
    job = builder(dict(plan))
    if not isinstance(job, TrainJob):
        raise TypeError(f"launch plan: {ref} returned {type(job).__name__}, not a TrainJob")
    return job


def write_result(result: TrainResult, task: torch.nn.Module, result_dir: Path) -> None:
    """Rank 0's output of a launched run (see the module docstring)."""
    from safetensors.torch import save_model

    result_dir.mkdir(parents=True, exist_ok=True)
    result.history.to_parquet(result_dir / "history.parquet", index=False)
    result.skipped.to_parquet(result_dir / "skipped.parquet", index=False)
    summary = {k: getattr(result, k) for k in
               ("final_step", "resumed_from", "last_checkpoint", "wall_time_s", "final_metrics")}
    (result_dir / "result.json").write_text(json.dumps(summary, indent=2))
    save_model(task, str(result_dir / "model.safetensors"))


def read_result(result_dir: Path, module: torch.nn.Module | None = None) -> TrainResult:
    """Read what ``write_result`` wrote; load the trained weights into ``module`` if given."""
    summary_path = result_dir / "result.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the launched training wrote no result into {result_dir}")
    summary = json.loads(summary_path.read_text())
    if module is not None:
        from safetensors.torch import load_model

        load_model(module, str(result_dir / "model.safetensors"))
    return TrainResult(history=pd.read_parquet(result_dir / "history.parquet"),
                       skipped=pd.read_parquet(result_dir / "skipped.parquet"), **summary)


class _Prefixed(io.TextIOBase):
    """A text stream that writes whole lines to ``stream``, each after ``prefix``."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self._partial = stream, prefix, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self.stream.write(f"{self.prefix}{line}\n")
        if lines:
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def prefix_output(rank: int) -> None:
    """Prefix every line this process writes through ``sys.stdout``/``sys.stderr`` (prints,
    logging, tracebacks) with its rank. Call before DeepSpeed is imported: its logger keeps the
    stream it finds then."""
    prefix = RANK_PREFIX.format(rank=rank)
    sys.stdout = _Prefixed(sys.__stdout__, prefix)
    sys.stderr = _Prefixed(sys.__stderr__, prefix)


def rank_tracker(plan: Mapping[str, Any], rank: int):
    """Rank 0's :class:`~tulip_pipelines.tracking.stage_runs.StageTracker` of the plan's MLflow
    run."""
    target = plan.get("mlflow") or {}
    if rank != 0 or not target.get("run_id"):
        return None
    import mlflow

    from tulip_pipelines.tracking.stage_runs import SEND_EVERY_S, StageTracker

    mlflow.set_tracking_uri(target["tracking_uri"])
    return StageTracker(target["run_id"], send_every_s=target.get("send_every_s", SEND_EVERY_S),
                        loss_kind=target.get("loss_kind"))


def main(argv: Sequence[str] | None = None) -> None:
    """Per-rank entry point: build the job from the launch plan, train, rank 0 writes the
    result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, type=Path, help="launch plan (JSON)")
    parser.add_argument("--result-dir", required=True, type=Path, help="where rank 0 writes")
    parser.add_argument("--local_rank", type=int, default=None, help="set by deepspeed")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    prefix_output(rank)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    from tulip_pipelines.training.multinode import wait_for_plan

    wait_for_plan(args.plan, f"rank {rank} on {socket.gethostname()}", 60)  # shared run dir?
    plan = json.loads(args.plan.read_text())
    import torch.distributed as dist

    from tulip_pipelines.training.deepspeed_setup import init_distributed

    init_distributed(timeout_s=plan.get("node_timeout_s"))
    job = job_from_plan(plan)
    tracker = rank_tracker(plan, dist.get_rank())
    result = job.train(plan["ds_config"], log_fn=tracker.log if tracker else None)
    if tracker is not None:
        tracker.flush()
    if dist.get_rank() == 0:
        write_result(result, job.task, args.result_dir)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
