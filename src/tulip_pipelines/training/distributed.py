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
            if timeout_s is not None:  # the group first, its rendezvous bounded
                join_group(backend, timeout_s)
            deepspeed.init_distributed(dist_backend=backend)  # adopts an existing group
        else:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeedEngine reads it
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                       init_method=f"tcp://127.0.0.1:{free_port()}",
                                       rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def join_group(backend: str, timeout_s: float) -> None:
    """torch's process group from the launcher's variables, through a rendezvous store whose
    connection waits at most ``timeout_s``: a rank whose master never answers, or a rank 0 whose
    peers never all connect, stops with a message naming the address (collectives keep torch's
    default timeout)."""
    from datetime import timedelta

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        store = dist.TCPStore(addr, port, world_size=world, is_master=rank == 0,
                              timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, OSError) as err:  # DistStoreError: the rendezvous timed out
        if rank == 0 and "EADDRINUSE" in str(err):
            raise RuntimeError(f"rank 0 on {socket.gethostname()}: port {port} is in use (another "
                               f"run on this machine?): leave master_port unset") from None
        who = ("the other ranks did not all connect to it" if rank == 0 else
               "is node 0 running, and is master_addr its address as this node reaches it?")
        raise RuntimeError(
            f"rank {rank} on {socket.gethostname()}: no rendezvous on the master {addr}:{port} "
            f"within {timeout_s:.0f} s ({type(err).__name__}): {who}"
        ) from None
    extra = {}
    if backend == "nccl":  # bind the device now, as DeepSpeed does (eager NCCL init)
        extra["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, **extra)


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
