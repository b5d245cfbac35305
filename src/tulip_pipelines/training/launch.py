"""Multi-process training: the per-rank entry point for DeepSpeed's launcher (or torchrun), and
``run_distributed`` that starts it from a parent process (a Kedro node) and reads the result back.

A *launch plan* is a JSON-able dict with ``"builder": "package.module:function"`` and
``"ds_config"`` (DeepSpeed's config); the builder gets the whole plan and returns a
:class:`~tulip_pipelines.training.job.TrainJob` (every rank builds the same job; relative paths
resolve against the working directory, which the ranks inherit from the caller). Run it by hand
with::

    deepspeed --num_gpus 4 --module tulip_pipelines.training.launch --plan p.json --result-dir out
    # several nodes: add --hostfile hosts (passwordless ssh; run_dir on a shared filesystem,
    # since rank 0 marks a checkpoint complete only after every rank wrote its shards there)
    torchrun --nproc_per_node 2 -m tulip_pipelines.training.launch --plan plan.json --result-dir out

Rank 0 writes into ``--result-dir``: ``history.parquet``, ``result.json`` (final step, resumed
from, checkpoint dir, wall time, final metrics) and ``model.safetensors`` (the task's trained
float32 state, loadable with ``safetensors.torch.load_model``).

On a CPU-only machine set ``DS_ACCELERATOR=cpu``; ``run_distributed`` then also sets
``LOCAL_SIZE`` (the CPU accelerator's "device" count) so that the deepspeed launcher starts
``nproc`` processes, which talk over gloo on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist

from tulip_pipelines.training.distributed import free_port
from tulip_pipelines.training.engine import LogFn, row_to_metrics, train
from tulip_pipelines.training.job import TrainJob
from tulip_pipelines.training.train_params import TrainResult

logger = logging.getLogger(__name__)

LAUNCHERS = ("deepspeed", "torchrun")
# variables of an enclosing launch that must not leak into a fresh one
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE")


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


def launcher_command(launcher: str, nproc: int, plan_path: Path, result_dir: Path,
                     port: int) -> list[str]:
    """The command line that runs this module on ``nproc`` local processes."""
    entry = ["tulip_pipelines.training.launch", "--plan", str(plan_path),
             "--result-dir", str(result_dir)]
    common = ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                *common, "--module", *entry]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                *common, "-m", *entry]
    raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")


def run_distributed(
    plan: Mapping[str, Any],
    nproc: int,
    launcher: str = "deepspeed",
    *,
    module: torch.nn.Module | None = None,
    log_fn: LogFn | None = None,
    result_dir: str | Path | None = None,
    timeout_s: float | None = None,
) -> TrainResult:
    """Train ``plan``'s job on ``nproc`` local processes through ``launcher`` and wait.

    ``module``: load the trained weights into it (the caller's own copy of the task).
    ``log_fn``: replay the logged history rows into it afterwards (the ranks do not log).
    ``result_dir``: keep rank 0's output there (default: a temporary directory).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    with tempfile.TemporaryDirectory(prefix="tulip-launch-") as tmp:
        out_dir = Path(result_dir) if result_dir is not None else Path(tmp) / "result"
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps(dict(plan)))
        cmd = launcher_command(launcher, nproc, plan_path, out_dir, free_port())
        env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
        if env.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
            env["LOCAL_SIZE"] = str(nproc)
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        logger.info("starting %d training processes: %s", nproc, " ".join(cmd))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"{launcher} exited with {proc.returncode}; its output ends with:\n"
                               f"{(proc.stdout + proc.stderr)[-4000:]}")
        logger.debug("%s output:\n%s", launcher, proc.stdout + proc.stderr)
        result = read_result(out_dir, module)
    if log_fn is not None:
        for row in result.history.to_dict("records"):
            log_fn(row_to_metrics(row), int(row["step"]))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Per-rank entry point: build the job from the launch plan, train, rank 0 writes the
    result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, type=Path, help="launch plan (JSON)")
    parser.add_argument("--result-dir", required=True, type=Path, help="where rank 0 writes")
    parser.add_argument("--local_rank", type=int, default=None, help="set by deepspeed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    plan = json.loads(args.plan.read_text())
    job = job_from_plan(plan)
    result = train(job.task, job.train_dataset, job.params, plan["ds_config"],
                   collate_fn=job.collate_fn, val_dataset=job.val_dataset,
                   fingerprint=job.fingerprint)
    if dist.get_rank() == 0:
        write_result(result, job.task, args.result_dir)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
