"""Learning-rate schedule: linear warmup, then cosine decay to a floor (like open_clip's)."""

from __future__ import annotations

import functools
import math

import torch


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
