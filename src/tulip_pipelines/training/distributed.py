"""Joining the process group: the launcher's (``deepspeed``/``torchrun``), or a group of one.

Several processes are always started by DeepSpeed's launcher (or torchrun, see ``launch.py``),
which sets ``RANK``/``WORLD_SIZE``/``MASTER_*``; this module only joins that group. A process
started without a launcher (``kedro run`` with ``num_processes: 1``, tests) makes a group of one
on 127.0.0.1 so that the same code path runs everywhere.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """Join the launcher's process group, or start a one-process group; ``(rank, world_size)``.

    The one-process group is set up through a tcp:// address rather than MASTER_* variables, so
    that nothing this process starts later (a launcher, a child run) inherits a stale rendezvous.
    """
    if not dist.is_initialized():
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        backend = "nccl" if get_accelerator().device_name() == "cuda" else "gloo"
        if "RANK" in os.environ:  # started by deepspeed/torchrun: env:// rendezvous
            deepspeed.init_distributed(dist_backend=backend)
        else:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeedEngine reads it
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                       init_method=f"tcp://127.0.0.1:{free_port()}",
                                       rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every rank concatenated along dim 0, rank after rank, with the gradient
    flowing back to each rank's part (``torch.distributed.nn``); itself in a group of one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)
