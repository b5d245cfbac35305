"""Where a model runs outside DeepSpeed (the evaluation's encoders, the teacher text embeddings):
``device: auto`` is the accelerator when one is present (this process's local GPU under a
launcher), else the CPU; inference on an accelerator runs under autocast (bfloat16 by default)
while what is computed from the features (similarities, recall, the stored embeddings) stays
float32."""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")
R = TypeVar("R")

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE_THREAD = threading.local()  # .active: this thread is one of map_on_devices' workers


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``; any other name as
    torch reads it (``cpu``, ``cuda``, ``cuda:1``, ``meta``). An accelerator asked for but absent
    is an error that says so."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no CUDA device; "
                         f"use device: auto or cpu")
    return device


def worker_devices(name: str = "auto", count: int | None = None) -> list[torch.device]:
    """One device per worker: every GPU of the node with ``auto`` on a GPU machine (``count`` of
    them, round robin, when given), else ``count`` (default 1) times the resolved device."""
    device = resolve_device(name)
    if name == "auto" and device.type == "cuda":
        gpus = torch.cuda.device_count()
        return [torch.device("cuda", i % gpus) for i in range(count or gpus)]
    return [device] * (count or 1)


def map_on_devices(work: Callable[[T, torch.device], R], items: Sequence[T],
                   devices: Sequence[torch.device]) -> list[R]:
    """``work(item, device)`` for every item, item i on ``devices[i % len(devices)]``: one thread
    per device when there are several, each doing its own items one after the other (so a
    device holds one model at a time; the GIL is released while the GPU computes), else all in
    this thread. Results in the items' order."""
    if len(devices) <= 1:
        return [work(item, devices[0]) for item in items]
    shares = [range(rank, len(items), len(devices)) for rank in range(len(devices))]

    def run(rank: int) -> list[R]:
        _DEVICE_THREAD.active = True  # DataLoaders started here must not fork (loader_context)
        try:
            return [work(items[i], devices[rank]) for i in shares[rank]]
        finally:
            _DEVICE_THREAD.active = False

    with ThreadPoolExecutor(len(devices)) as pool:
        done = list(pool.map(run, range(len(devices))))
    results: list[R] = [None] * len(items)  # type: ignore[list-item]
    for rank, share in enumerate(shares):
        for i, result in zip(share, done[rank]):
            results[i] = result
    return results


def loader_context(device: torch.device, num_workers: int):
    """The multiprocessing context for the workers of a DataLoader feeding ``device``:
    ``forkserver`` (workers forked from a fresh single-threaded server) inside
    :func:`map_on_devices`' threads or for a CUDA device, else None (the default ``fork``).
    Forking a process that runs several threads, or holds CUDA, copies locks that other threads
    held (CUDA's, the allocator's) into the child, where they are never released: a worker can
    deadlock. None without workers."""
    if num_workers == 0:
        return None
    if device.type == "cuda" or getattr(_DEVICE_THREAD, "active", False):
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() \
            else "spawn"
        return multiprocessing.get_context(method)
    return None


def check_placement(problems, device_field: str, device: str, autocast_field: str,
                    autocast: str | None) -> None:
    """Add to ``problems`` (:class:`tulip_pipelines.params.Problems`) what is wrong with a
    ``device`` / ``autocast`` pair of parameters, named by their fields."""
    problems.one_of(autocast_field, autocast, (None, *AUTOCAST_DTYPES))
    try:
        resolve_device(device)
    except (RuntimeError, ValueError) as err:
        problems.add(device_field, str(err))


def autocast_in_effect(device: torch.device, autocast: str | None) -> str | None:
    """The autocast dtype's name that :func:`inference_autocast` applies on ``device``."""
    return None if device.type in ("cpu", "meta") else autocast


def inference_autocast(device: torch.device, autocast: str | None):
    """Autocast in ``autocast``'s dtype (:data:`AUTOCAST_DTYPES`) on an accelerator; nothing on
    the CPU (the embedded default computes in float32 as before) or with ``None``."""
    dtype = autocast_in_effect(device, autocast)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[dtype])


@contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``model`` moved to ``device`` for the block, then back where it was (so that several
    large models take the accelerator in turn)."""
    home = next(model.parameters()).device
    if home == device:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
