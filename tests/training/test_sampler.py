"""The data order (training/sampler.py): a new shuffle every epoch, every sample once per epoch,
per-sample random draws that change from one epoch to the next but not with the reader, and the
engine moving to the next epoch's order when one ends."""


import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tests.conftest import DS_FP32
from tests.image_helpers import decode_index
from tests.training.conftest import N_TRAIN, N_VAL
from tests.training.toy_tasks import RegressionTask
from tulip_pipelines.training.datasets import (
    CaptionImageDataset,
    DataPosition,
    ResumableSampler,
    SeededSamples,
)
from tulip_pipelines.training.engine import train
from tulip_pipelines.training.job import TrainParams


def _order(sampler: ResumableSampler, epoch: int, offset: int = 0) -> list[int]:
    sampler.start(DataPosition(epoch, offset))
    keys = list(sampler)
    assert {e for _, e in keys} == {epoch}
    return [index for index, _ in keys]


def test_each_epoch_has_its_own_shuffle_of_every_sample():
    sampler = ResumableSampler(range(40), world_size=1, rank=0, seed=3, batch_size=4)
    epochs = [_order(sampler, epoch) for epoch in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(40))
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    # and the same epoch is the same order again (what a resumed run relies on)
    assert _order(sampler, 1) == epochs[1]
    assert _order(sampler, 1, offset=2) == epochs[1][8:]


def test_a_sample_draws_anew_each_epoch_and_the_same_within_one():
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(30)], "image": ["x.png"] * 30,
                          "caption": ["original"] * 30})
    variants = {f"r{i}": [f"variant {v} of {i}" for v in range(8)] for i in range(30)}
    dataset = SeededSamples(CaptionImageDataset(frame, ".", None, variants), seed=0)
    epoch0 = [dataset[(i, 0)]["long"] for i in range(30)]
    epoch1 = [dataset[(i, 1)]["long"] for i in range(30)]
    assert epoch0 == [dataset[(i, 0)]["long"] for i in range(30)]  # reproducible
    changed = sum(a != b for a, b in zip(epoch0, epoch1))
    assert changed >= 20  # 8 variants: a repeat has probability 1/8 per sample


class Indexed(Dataset):
    """Regression samples that also say which record they are."""

    def __init__(self, n: int):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = self.x.sum(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "index": i}


class Recording(RegressionTask):
    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def forward(self, batch):
        self.seen += batch.pop("index").tolist()
        return super().forward(batch)


def test_the_engine_reads_epoch_two_in_a_new_order(tmp_path):
    task = Recording()
    params = TrainParams(run_name="epochs", run_dir=str(tmp_path / "run"), batch_size=4, lr=1e-3,
                         max_steps=10, log_every=10)  # 16 samples: 4 steps an epoch
    train(task, Indexed(16), params, DS_FP32)
    sampler = ResumableSampler(range(16), world_size=1, rank=0, seed=params.seed, batch_size=4)
    expected = [_order(sampler, epoch) for epoch in range(3)]
    assert expected[0] != expected[1] != expected[2]
    assert task.seen == expected[0] + expected[1] + expected[2][:8]  # 10 steps of 4


def as_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


def record_numbers(samples) -> list[int]:
    return [decode_index(s["image"]) for s in samples]


def rank_order(dataset, rank: int, position: DataPosition) -> list[int]:
    """Record numbers rank ``rank`` of 2 reads from ``position`` to the end of that epoch, through
    two DataLoader workers (each opens the shards itself), as the engine reads them."""
    sampler = ResumableSampler(dataset, world_size=2, rank=rank, seed=3, batch_size=4)
    sampler.start(position)
    loader = DataLoader(SeededSamples(dataset, seed=3), batch_size=4, sampler=sampler,
                        drop_last=True, num_workers=2, collate_fn=record_numbers)
    return [number for batch in loader for number in batch]


def test_rank_order_on_prepared_data_has_no_duplicates_and_resumes_identically(prepared):
    dataset = CaptionImageDataset(prepared["train"], prepared["source"], as_tensor)
    for epoch in (0, 1):
        orders = [rank_order(dataset, rank, DataPosition(epoch, 0)) for rank in (0, 1)]
        assert len(orders[0]) == len(orders[1]) == N_TRAIN // 2
        # every training record once per epoch, split between the ranks
        assert sorted(orders[0] + orders[1]) == list(range(N_VAL, N_VAL + N_TRAIN))
        for rank in (0, 1):  # resumed after 3 micro batches: the rest of the same order
            assert rank_order(dataset, rank, DataPosition(epoch, 3)) == orders[rank][12:]
    # the prepared images are the records the sampler asked for, not merely a permutation
    expected = [N_VAL + i for i in ResumableSampler(dataset, 2, 0, 3, 4).base]
    assert rank_order(dataset, 0, DataPosition(0, 0)) == expected


def _step_sets(n: int, micro: int, accumulation: int, processes: int, epoch: int,
               skip_steps: int = 0) -> list[frozenset[int]]:
    """The samples of each optimizer step of ``epoch``, gathered over every rank's sampler as
    the engine reads them (``accumulation`` micro batches per rank make one step)."""
    per_rank = []
    for rank in range(processes):
        sampler = ResumableSampler(range(n), processes, rank, seed=5, batch_size=micro,
                                   accumulation=accumulation)
        per_rank.append(_order(sampler, epoch, offset=skip_steps * accumulation))
    step_size = micro * accumulation
    n_steps = {len(order) // step_size for order in per_rank}
    assert len(n_steps) == 1 and all(len(o) % step_size == 0 for o in per_rank)
    return [frozenset(i for order in per_rank for i in order[s * step_size:(s + 1) * step_size])
            for s in range(n_steps.pop())]


def test_each_step_reads_the_same_samples_whatever_the_number_of_processes():
    """With the global batch fixed (16 = micro x accumulation x processes), step s of an epoch
    holds the same 16 samples on 1, 2 or 4 processes, also when resumed mid-epoch; the epoch's
    tail that does not fill a step is left out alike (100 samples: 6 steps)."""
    for epoch in (0, 1):
        reference = _step_sets(100, micro=4, accumulation=4, processes=1, epoch=epoch)
        assert len(reference) == 6 and all(len(s) == 16 for s in reference)
        assert len(set().union(*reference)) == 96
        for micro, accumulation, processes in [(4, 2, 2), (8, 1, 2), (4, 1, 4), (2, 2, 4)]:
            layout = _step_sets(100, micro, accumulation, processes, epoch)
            assert layout == reference, (micro, accumulation, processes)
            assert _step_sets(100, micro, accumulation, processes, epoch,
                              skip_steps=2) == reference[2:]


@pytest.mark.parametrize("n, world, batch, accumulation, usable", [
    (10, 1, 3, 1, 9),  # whole micro batches only: 10 -> 9
    (9, 1, 3, 1, 9),  # exactly three: all of them
    (10, 1, 3, 2, 6),  # whole optimizer steps (2 x 3): 6
    (12, 1, 3, 2, 12),
    (10, 2, 3, 1, 3),  # two ranks of 5 (drop_last), one whole batch each
    (5, 1, 6, 1, 0),  # fewer samples than one batch: none
])
def test_a_rank_reads_whole_optimizer_steps_and_skips_a_consumed_prefix(n, world, batch,
                                                                       accumulation, usable):
    sampler = ResumableSampler(list(range(n)), world, 0, 0, batch, accumulation)
    assert sampler.usable == usable and len(sampler) == usable == len(list(sampler))
    sampler.start(DataPosition(0, 1))  # one micro batch consumed
    assert len(sampler) == max(0, usable - batch) == len(list(sampler))
    sampler.start(DataPosition(0, usable // batch + 1))  # past the end: nothing, not negative
    assert len(sampler) == 0 and list(sampler) == []
