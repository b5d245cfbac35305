"""Shared by the bench scripts: a DeepSpeed engine set up as the pipelines set it up, and the time
of optimizer steps split into data, forward, backward and optimizer phases (the device
synchronised around each phase on a GPU, so that each phase's time is its own)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from tulip_pipelines.training.datasets import to_device
from tulip_pipelines.training.deepspeed_setup import (
    compute_dtype,
    init_distributed,
    initialize_engine,
    prepare_ds_config,
)
from tulip_pipelines.training.job import TrainParams

PHASES = ("data", "forward", "backward", "optimizer")


def make_engine(task: torch.nn.Module, batch_size: int, steps: int, ds_config: dict[str, Any],
                run_dir: str):
    """``initialize_engine`` as the engine calls it: AdamW, warmup/cosine, the DeepSpeed config."""
    params = TrainParams(run_name="bench", run_dir=run_dir, max_steps=steps,
                         batch_size=batch_size, lr=1e-4)
    _, world_size = init_distributed()
    engine, _ = initialize_engine(task, params, prepare_ds_config(ds_config, params, world_size))
    return engine


def time_phases(engine, next_batch: Callable[[], Any], steps: int,
                warmup: int) -> dict[str, float]:
    """Median seconds per phase over ``steps`` optimizer steps (one micro batch each) after
    ``warmup`` untimed ones."""
    dtype = compute_dtype(engine)
    cuda = engine.device.type == "cuda"

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    phases: dict[str, list[float]] = {k: [] for k in PHASES}
    for i in range(steps + warmup):
        t0 = now()
        batch = to_device(next_batch(), engine.device, dtype)
        t1 = now()
        loss = engine(batch)["loss"]
        t2 = now()
        engine.backward(loss)
        t3 = now()
        engine.step()
        t4 = now()
        if i >= warmup:
            for key, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[key].append(seconds)
    return {k: statistics.median(v) for k, v in phases.items()}


def cycle(loader) -> Callable[[], Any]:
    """``next_batch`` over a DataLoader, starting again at its end."""
    iterator = iter(loader)

    def next_batch():
        nonlocal iterator
        try:
            return next(iterator)
        except StopIteration:
            iterator = iter(loader)
            return next(iterator)

    return next_batch
