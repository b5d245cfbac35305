"""DeepSpeed plumbing of the engine: the process group (joined within a bounded time), the config
DeepSpeed accepts, ``deepspeed.initialize`` with AdamW and the warmup/cosine schedule, and
getting float32 weights back out afterwards.

Only ZeRO stages 0-2 are supported: they keep full parameters on every rank, so the task's
modules hold the trained weights afterwards (float32, on the CPU).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tulip_pipelines.training.job import TrainParams

logger = logging.getLogger(__name__)

WHERE = "DeepSpeed config (params:deepspeed, conf/*/parameters_deepspeed.yml)"


def prepare_ds_config(ds_config: Mapping[str, Any], params: TrainParams,
                      world_size: int) -> dict[str, Any]:
    """Copy of the DeepSpeed config with the micro batch filled in from ``params``; refuses what
    the engine does not support and anything that disagrees with ``params``."""
    out = copy.deepcopy(dict(ds_config))
    for key in ("optimizer", "scheduler"):
        if key in out:
            raise ValueError(f"{WHERE}: remove '{key}'; the engine builds AdamW and the "
                             f"warmup/cosine schedule from the pipeline's parameters")
    if out.get("fp16", {}).get("enabled"):
        raise ValueError(f"{WHERE}: fp16 is not supported by the engine; use bf16 or fp32")
    if "torch_autocast" in out:
        raise ValueError(f"{WHERE}: remove 'torch_autocast'; mixed precision is the stage's "
                         f"train.precision: amp_bf16 (the engine's own autocast)")
    ds_bf16 = out.get("bf16", {}).get("enabled")
    if params.precision is not None and ds_bf16 is not None and ds_bf16 != (
            params.precision == "bf16"):
        raise ValueError(f"{WHERE}: bf16.enabled={ds_bf16} disagrees with the run's "
                         f"train.precision={params.precision!r}; leave bf16 out (the engine sets "
                         f"it from the precision)")
    if params.precision is not None:
        out["bf16"] = {**out.get("bf16", {}), "enabled": params.precision == "bf16"}
    if out.get("bf16", {}).get("enabled"):
        # DeepSpeed reduces gradients over the ranks in the weights' dtype unless told: with
        # bf16 weights, in bf16. Reduce them in float32 (what amp_bf16 and fp32 reduce in);
        # set communication_data_type: bf16 in params:deepspeed to halve that traffic instead.
        out.setdefault("communication_data_type", "fp32")
    stage = out.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"{WHERE}: zero_optimization.stage must be 0, 1 or 2, got {stage!r} "
                         f"(ZeRO-3 would shard the task's weights; not supported)")
    micro = out.setdefault("train_micro_batch_size_per_gpu", params.batch_size)
    if micro != params.batch_size:
        raise ValueError(
            f"{WHERE}: train_micro_batch_size_per_gpu={micro} disagrees with the "
            f"run's batch_size={params.batch_size}; leave it out (the engine fills it)"
        )
    gas = out.setdefault("gradient_accumulation_steps", 1)
    if not isinstance(gas, int) or gas < 1:
        raise ValueError(f"{WHERE}: gradient_accumulation_steps must be an integer >= 1, "
                         f"got {gas!r}")
    expected = params.batch_size * gas * world_size
    total = out.setdefault("train_batch_size", expected)
    if total != expected:
        raise ValueError(f"{WHERE}: train_batch_size={total} but batch_size x "
                         f"gradient_accumulation_steps x processes = {params.batch_size} x {gas} x "
                         f"{world_size} = {expected}; leave train_batch_size out")
    out.setdefault("steps_per_print", 10**9)
    return out


@dataclass
class TaskState:
    """What DeepSpeed changes on a task, kept so that :func:`export_fp32_weights` can undo it:
    the frozen parameters as they were (DeepSpeed casts them to bf16) and the shapes of 0-dim
    parameters (DeepSpeed 0.19.8's initial broadcast views every parameter as bytes, which fails
    for 0-dim tensors such as ``logit_scale``, so they train as shape ``[1]``)."""

    frozen: dict[str, torch.Tensor]
    zero_dim: set[str]


def initialize_engine(task: torch.nn.Module, params: TrainParams, ds_config: Mapping[str, Any]):
    """AdamW (open_clip's weight-decay rule) over the task's trainable parameters, the
    warmup/cosine LambdaLR, and ``deepspeed.initialize`` on a prepared config (see
    :func:`prepare_ds_config`; the process group must exist). Returns ``(engine, TaskState)``."""
    import deepspeed

    state = TaskState(
        frozen={n: p.data for n, p in task.named_parameters() if not p.requires_grad},
        zero_dim={n for n, p in task.named_parameters() if p.ndim == 0},
    )
    for name, param in task.named_parameters():
        if name in state.zero_dim:
            param.data = param.data.reshape(1)
    trainable = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"run {params.run_name!r}: the task has no parameter with "
                         f"requires_grad=True")
    groups = param_groups(trainable, params.weight_decay, params.decay_biases_and_norms)
    optimizer = torch.optim.AdamW(groups, lr=params.lr, betas=params.betas, eps=params.eps)
    scheduler = warmup_cosine(optimizer, params.warmup_steps,
                              params.schedule_steps or params.max_steps, params.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=dict(ds_config))
    return engine, state


def compute_dtype(engine) -> torch.dtype:
    """The dtype floating-point batch tensors are cast to for this engine."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def clamp_parameters(engine, bounds: Mapping[torch.nn.Parameter, tuple[float, float]]) -> None:
    """Clamp trained parameters in place after an optimizer step (open_clip's logit_scale rule),
    in the module and in the optimizer's float32 master copy, where DeepSpeed keeps one (ZeRO
    1-2, bf16): else the next step would start from the unclamped master. A collective under
    ZeRO: every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    masters = _fp16_optimizer_masters(engine.optimizer)
    for param, (low, high) in bounds.items():
        full = safe_get_full_fp32_param(param)
        if full is not None:
            safe_set_full_fp32_param(param, full.clamp(low, high))
        elif id(param) in masters:
            masters[id(param)].data.clamp_(low, high)
        with torch.no_grad():
            param.clamp_(low, high)


def export_fp32_weights(engine, task: torch.nn.Module, state: TaskState) -> None:
    """Leave the task's modules on the CPU in float32 and their original shapes: trainable
    parameters from the optimizer's fp32 master copy (a collective under ZeRO: every rank calls
    it), frozen ones as they were before DeepSpeed cast them; then release the engine."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = _fp16_optimizer_masters(engine.optimizer)
    for param in task.parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)
        full = masters.get(id(param)) if full is None else full
        if full is not None:
            param.data = full.detach().to("cpu", torch.float32).clone()
    task.to(device="cpu", dtype=torch.float32)
    for name, param in task.named_parameters():
        if name in state.frozen:
            param.data = state.frozen[name]
        elif name in state.zero_dim:
            param.data = param.data.reshape(())
    engine.destroy()


def _fp16_optimizer_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """fp32 master weights by ``id(param)`` of DeepSpeed's FP16 optimizers (used for bf16 at
    ZeRO 0), whose params lack the ``_hp_mapping`` of ``safe_get_full_fp32_param``."""
    from torch._utils import _unflatten_dense_tensors

    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None:
        return {}
    if hasattr(optimizer, "fp32_groups_flat"):  # FP16_Optimizer (fused)
        fp32 = [_unflatten_dense_tensors(f, g) for f, g in zip(optimizer.fp32_groups_flat, groups)]
    else:  # FP16_UnfusedOptimizer
        fp32 = optimizer.fp32_groups
    return {id(p): m for group, masters in zip(groups, fp32) for p, m in zip(group, masters)}


def param_groups(named: Sequence[tuple[str, torch.nn.Parameter]], weight_decay: float,
                 decay_all: bool = False) -> list[dict[str, Any]]:
    """open_clip's rule: no weight decay on biases, norms and logit_scale (ndim < 2); with
    ``decay_all`` one group that decays everything (Long-CLIP)."""
    if decay_all:
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    no_decay = [p for n, p in named if p.ndim < 2 or "logit_scale" in n]
    decay = [p for n, p in named if not (p.ndim < 2 or "logit_scale" in n)]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


# Precision on the accelerator: bf16 autocast inside the task's forward, TF32, bf16 support


@contextmanager
def autocast_inside(task: torch.nn.Module, device_type: str, enabled: bool) -> Iterator[None]:
    """While the block runs, ``task.forward`` (and ``task.features``, the cache pass of a
    global-batch step) enter bfloat16 autocast on ``device_type`` themselves: inside DeepSpeed's
    ``engine(batch)``, whose ``autocast_if_enabled`` would switch an outer autocast off on a GPU.
    One place for every forward; the task's methods are put back afterwards."""
    names = [n for n in ("forward", "features") if enabled and callable(getattr(task, n, None))]
    for name in names:
        setattr(task, name, _under_autocast(getattr(task, name), device_type))
    try:
        yield
    finally:
        for name in names:
            delattr(task, name)  # the instance attribute: the class's method shows again


def _under_autocast(method: Callable, device_type: str) -> Callable:
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return method(*args, **kwargs)
    return wrapped


def warn_if_bf16_emulated(precision: str | None, device: torch.device) -> None:
    """A warning when bfloat16 (``amp_bf16``, ``bf16``) has no hardware support on this CUDA
    device (compute capability below 8.0: V100, T4): torch emulates it there, slower than
    float32, where the CPU and an A100/H100 run it natively."""
    if device.type != "cuda" or precision not in ("amp_bf16", "bf16"):
        return
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        logger.warning("train.precision=%s on %s (%s): no native bfloat16 below compute "
                       "capability 8.0, torch emulates it (slower than fp32); consider "
                       "precision: fp32", precision, device, torch.cuda.get_device_name(device))


def set_tf32(enabled: bool | None) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA (as TULIP's and open_clip's
    training scripts set it: ``allow_tf32 = True``); ``None`` leaves torch's settings. No effect
    on the CPU."""
    if enabled is None:
        return
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


# The learning-rate schedule: linear warmup, then cosine down to min_lr_ratio

def lr_lambda(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Warmup ramps linearly over ``warmup`` steps, reaching 1 at step ``warmup - 1`` (so the first
    step already learns: ``1 / warmup``). The cosine part then runs from 1 at step ``warmup`` down
    to ``min_ratio`` at step ``total`` and stays there afterwards.
    """
    if step < 0 or total <= 0 or warmup < 0 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(
            f"lr_lambda needs step >= 0, total > 0, warmup >= 0 and 0 <= min_ratio <= 1; "
            f"got step={step}, total={total}, warmup={warmup}, min_ratio={min_ratio}"
        )
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``lr_lambda``; its state dict holds only plain numbers (checkpoint-safe)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_lambda, warmup=warmup, total=total, min_ratio=min_ratio)
    )


# The process group: joining it (bounded), free ports, all-gather with gradient

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
        if backend == "gloo":  # the CPU accelerator's workspace (see below)
            release_shm_workspace()
    return dist.get_rank(), dist.get_world_size()


SHM_DIR = "/dev/shm"


def release_shm_workspace() -> bool:
    """Unlink this rank's name of DeepSpeed's shared-memory allreduce workspace; True when there
    was one.

    On the CPU accelerator, when every rank is on this node (``LOCAL_SIZE`` equals the world
    size), DeepSpeed maps a 64 MB workspace per rank (``shm_comm``, for its inference
    all-reduce) and never unlinks its name: every run left 64 MB a rank in ``/dev/shm``, which
    is memory, until the machine ran out of it. Once every rank has mapped its peers' workspaces
    (DeepSpeed's init returns after that; the barrier waits for every rank's return), the names
    can go: the memory stays mapped while the ranks live and is freed when the last one exits,
    however it exits. DeepSpeed's CUDA accelerator makes no such workspace (no ``shm_comm``).
    Call on every rank right after DeepSpeed's init (the barrier)."""
    world = dist.get_world_size()
    if os.environ.get("LOCAL_SIZE") != str(world):
        return False  # DeepSpeed made none (its condition, shm_interface.cpp)
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        return False
    logger.info("released DeepSpeed's shared-memory allreduce workspace name %s", name)
    return True


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
