"""Unreadable samples during training and validation: skipped (the dataset substitutes the next
readable record), recorded, and fatal only once too many are bad.

A run fails with :class:`TooManyBadSamples`, listing the first offenders, once more than
``max_bad_fraction`` of the samples it has seen could not be read; the first
``1 / max_bad_fraction`` samples count as that many, so that one early bad image (0.1% of 1,000)
does not end a run that has seen only a few.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch.distributed as dist

from tulip_pipelines.data.images import SKIPPED_COLUMNS
from tulip_pipelines.training.batches import count_samples


class TooManyBadSamples(RuntimeError):
    """More than ``max_bad_fraction`` of the samples seen could not be read."""


class SkippedSamples:
    """The unreadable samples one process met, and how many samples it has seen."""

    def __init__(self, run_name: str, max_fraction: float):
        self.run_name, self.max_fraction = run_name, max_fraction
        self.seen = 0
        self.records: list[dict[str, Any]] = []

    def take(self, batch: Any, split: str, step: int) -> Any:
        """``batch`` without its ``skipped`` list, which is recorded; counts the batch as seen
        and raises :class:`TooManyBadSamples` when too many are bad."""
        skipped = batch.pop("skipped", ()) if isinstance(batch, dict) else ()
        self.seen += count_samples(batch)
        for record in skipped:
            self.records.append({"stage": self.run_name, "split": split, "step": step, **record})
        if skipped:
            self.check()
        return batch

    def check(self) -> None:
        floor = math.ceil(1 / self.max_fraction) if self.max_fraction > 0 else 0
        allowed = self.max_fraction * max(self.seen, floor)
        if len(self.records) > allowed:
            first = "; ".join(f"{r['record_id']} ({r['path']}: {r['error']})"
                              for r in self.records[:5])
            raise TooManyBadSamples(
                f"run {self.run_name!r}: {len(self.records)} of the {self.seen} samples seen "
                f"could not be read, more than max_bad_fraction={self.max_fraction}. First: "
                f"{first}. Quarantine them (ingest check_images: decode, or prepare_images) or "
                f"raise train.max_bad_fraction.")

    def frame(self, world_size: int) -> pd.DataFrame:
        """Every process's records (a collective when several processes train)."""
        records = self.records
        if world_size > 1:
            gathered: list[list[dict[str, Any]]] = [[] for _ in range(world_size)]
            dist.all_gather_object(gathered, self.records)
            records = [record for part in gathered for record in part]
        return pd.DataFrame(records, columns=SKIPPED_COLUMNS)
