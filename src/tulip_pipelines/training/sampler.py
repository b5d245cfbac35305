"""The data order of a training run: a shuffled, rank-sharded order per epoch, and the position
in it that a checkpoint records, so that a resumed run reads exactly what the uninterrupted run
would."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from torch.utils.data import Dataset, DistributedSampler, Sampler


@dataclass
class DataPosition:
    """Where the data order stands: epoch and micro batches already consumed in it."""

    epoch: int = 0
    offset: int = 0


class ResumableSampler(Sampler[int]):
    """DistributedSampler (epoch-seeded shuffle, drop_last) that can skip a consumed prefix."""

    def __init__(self, dataset: Dataset, world_size: int, rank: int, seed: int, batch_size: int):
        self.base = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.skip_batches = 0

    def start(self, position: DataPosition) -> None:
        self.base.set_epoch(position.epoch)
        self.skip_batches = position.offset

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip_batches * self.batch_size, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip_batches * self.batch_size)
