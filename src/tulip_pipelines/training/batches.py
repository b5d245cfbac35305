"""Helpers on batches as the collate functions build them (tensors in dicts, lists, tuples)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def to_device(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move tensors (in dicts/lists/tuples) to ``device``; floating ones to the compute dtype."""
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, dtype) for v in batch)
    return batch


def scalar(value: Any) -> float:
    return float(torch.as_tensor(value).detach().float())


def count_samples(batch: Any) -> int:
    """Length of the first tensor found in the batch."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, (torch.Tensor, Mapping, list, tuple)):
            return count_samples(value)
    raise TypeError("cannot find a tensor in the batch to count its samples")
