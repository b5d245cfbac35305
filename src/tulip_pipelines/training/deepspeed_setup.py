"""DeepSpeed plumbing of the engine: the config it accepts, ``deepspeed.initialize`` with AdamW
and the warmup/cosine schedule, and getting float32 weights back out afterwards.

Only ZeRO stages 0-2 are supported: they keep full parameters on every rank, so the task's
modules hold the trained weights afterwards (float32, on the CPU).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tulip_pipelines.training.schedule import warmup_cosine
from tulip_pipelines.training.train_params import TrainParams

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
