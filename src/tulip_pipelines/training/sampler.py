"""The data order of a training run: a shuffled, rank-sharded order per epoch, the position in it
that a checkpoint records, and per-sample randomness keyed by (seed, epoch, index), so that a
resumed run reads exactly what the uninterrupted run would, whatever the number of loader
workers."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


@dataclass
class DataPosition:
    """Where the data order stands: epoch and micro batches already consumed in it."""

    epoch: int = 0
    offset: int = 0


class ResumableSampler(Sampler[tuple[int, int]]):
    """DistributedSampler (epoch-seeded shuffle, drop_last) that can skip a consumed prefix and
    yields only whole optimizer steps (``accumulation`` micro batches of ``batch_size``). It
    yields ``(index, epoch)`` keys for :class:`SeededSamples`.

    One shuffled permutation per epoch, dealt round-robin to the ranks: optimizer step ``s`` of
    an epoch reads positions ``[s*G, (s+1)*G)`` of the permutation (G = batch x accumulation x
    processes), whatever the number of processes. A run can therefore continue on another
    number of processes with the same global batch and read the same samples in every step."""

    def __init__(self, dataset: Dataset, world_size: int, rank: int, seed: int, batch_size: int,
                 accumulation: int = 1):
        self.base = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        per_step = batch_size * accumulation
        self.usable = len(self.base) // per_step * per_step  # whole steps of this rank
        self.epoch, self.skip_batches = 0, 0

    def start(self, position: DataPosition) -> None:
        self.base.set_epoch(position.epoch)
        self.epoch = position.epoch
        self.skip_batches = position.offset

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch  # this iteration's epoch, even if start() is called meanwhile
        order = itertools.islice(iter(self.base), self.skip_batches * self.batch_size,
                                 self.usable)
        return ((index, epoch) for index in order)

    def __len__(self) -> int:
        return max(0, self.usable - self.skip_batches * self.batch_size)


class SeededSamples(Dataset):
    """A training dataset read by ``(index, epoch)`` keys. Each sample is read with torch's RNG
    seeded from ``(seed, epoch, index)`` (and restored afterwards), so its random draws (the
    demo's caption variants, an augmentation) depend on nothing else: not on the loader worker
    that reads it, nor on where a resumed run started."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (what fork_rng restores): torch.manual_seed would also queue
            # a seed for every accelerator backend, formatting a stack trace each time (~2 ms)
            torch.default_generator.manual_seed(hash((self.seed, epoch, index)) & 0xFFFF_FFFF_FFFF)
            return self.dataset[index]
