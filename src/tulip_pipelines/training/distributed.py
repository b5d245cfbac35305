"""Joining the process group: the launcher's (``deepspeed``/``torchrun``), or a group of one.

Several processes are always started by DeepSpeed's launcher (or torchrun, see ``launch.py``),
which sets ``RANK``/``WORLD_SIZE``/``MASTER_*``; this module only joins that group. A process
started without a launcher (``kedro run`` with ``num_processes: 1``, tests) makes a group of one
on 127.0.0.1 so that the same code path runs everywhere.
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Join the launcher's process group, or start a one-process group; ``(rank, world_size)``.
    ``timeout_s``: how long a rank other than 0 waits for the master address to answer (then it
    stops, naming it); collectives keep torch's own timeout.

    The one-process group is set up through a tcp:// address rather than MASTER_* variables, so
    that nothing this process starts later (a launcher, a child run) inherits a stale rendezvous.
    """
    if not dist.is_initialized():
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        backend = "nccl" if get_accelerator().device_name() == "cuda" else "gloo"
        if "RANK" in os.environ:  # started by deepspeed/torchrun: env:// rendezvous
            if timeout_s is not None and int(os.environ["RANK"]) != 0:
                wait_for_master(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                timeout_s)
            deepspeed.init_distributed(dist_backend=backend)
        else:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeedEngine reads it
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                       init_method=f"tcp://127.0.0.1:{free_port()}",
                                       rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def wait_for_master(addr: str, port: int, timeout_s: float) -> None:
    """Wait until something listens on ``addr:port`` (rank 0's rendezvous store); a clear error
    after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((addr, port), timeout=5):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"rank {os.environ.get('RANK')} on {socket.gethostname()}: the master "
                    f"{addr}:{port} did not answer within {timeout_s:.0f} s ({err}); is node 0 "
                    f"running, and is master_addr its address reachable from this node?"
                ) from None
            time.sleep(0.5)


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
