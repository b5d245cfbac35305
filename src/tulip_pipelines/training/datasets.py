"""Training data, what the engine's loop reads: image-caption pairs from a captions table and an
image source (the dataset and its collate), each with the short caption cut from its long one
(:data:`SHORT_CAPTIONS`), the per-rank sampler, batches moved to the device, and the unreadable
samples skipped on the way."""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler

from tulip_pipelines.data.images import (
    SKIPPED_COLUMNS,
    ImageSource,
    as_image_source,
    preprocess_size,
)

logger = logging.getLogger(__name__)


# A sentence ends at . ! or ? followed by white space (or the end of the text).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(caption: str) -> list[str]:
    """Split a caption into sentences (simple rule: end punctuation followed by white space)."""
    return [s.strip() for s in _SENTENCE_END.split(caption.strip()) if s.strip()]


def first_sentence(caption: str) -> str:
    """The caption's first sentence: TULIP's short caption in the expansion stage."""
    sentences = split_sentences(caption)
    return sentences[0] if sentences else ""


def tulip_short_caption(caption: str) -> str:
    """TULIP's preprocessing of a short caption: up to the first period, the period kept
    (``caption.split('.')[0] + '.'``; a decimal point ends it too)."""
    return caption.split(".")[0] + "."


def longclip_short_caption(caption: str) -> str:
    """Long-CLIP's short caption: newlines to spaces, then up to the first ``". "`` (no period;
    the whole caption when there is none)."""
    return caption.replace("\n", " ").split(". ")[0]


# How a short caption is cut from a long one (the ``short_caption`` parameters).
SHORT_CAPTIONS = {
    "first_sentence": first_sentence,
    "tulip": tulip_short_caption,
    "longclip": longclip_short_caption,
}


MAX_SUBSTITUTES = 16  # unreadable images in a row before a sample gives up


class UnreadableImage(OSError):
    """One record's image could not be read; ``record`` says which and why."""

    def __init__(self, record: dict[str, str]):
        super().__init__(f"cannot read image of record {record['record_id']!r}: "
                         f"{record['path']}: {record['error']}")
        self.record = record


class UnreadableImages(RuntimeError):
    """Too many unreadable images in a row to find a substitute."""


class CaptionImageDataset(Dataset):
    """Rows of a captions table (``id``, ``image``, ``caption``) as training samples.

    Each sample is ``{"image": tensor, "long": caption, "short": short_caption(caption)}`` (the
    first sentence by default; see :data:`SHORT_CAPTIONS`). Images come from ``images``
    (an :class:`~tulip_pipelines.data.images.ImageSource`: the prepared shards or the original
    folder; a path means the folder), decoded at the size ``preprocess`` needs. Records whose
    image the source left out (quarantined by ``prepare_images``) are dropped when images are
    read. With ``variants`` (id -> list of alternative captions, e.g. the demo's
    shuffled-sentence captions) the long caption is drawn at random among them each time the
    sample is read.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        images: ImageSource | str | Path,
        preprocess: Callable[[Image.Image], torch.Tensor] | None,
        variants: Mapping[str, Sequence[str]] | None = None,
        short_caption: Callable[[str], str] = first_sentence,
    ):
        missing = {"id", "image", "caption"} - set(frame.columns)
        if missing:
            raise ValueError(f"captions table lacks column(s) {sorted(missing)}")
        self.source = as_image_source(images)
        self.preprocess = preprocess
        self.short_caption = short_caption
        self.min_size = preprocess_size(preprocess)
        ids = frame["id"].astype(str).tolist()
        self.handles: list[Any] = []
        if preprocess is not None:
            self.handles = self.source.locate(ids, frame["image"].astype(str).tolist())
            left_out = [i for i, handle in enumerate(self.handles) if handle is None]
            if left_out:
                logger.warning("%d of %d records have no image in %r (rejected_images), e.g. "
                               "id %r: left out", len(left_out), len(ids), self.source,
                               ids[left_out[0]])
                kept = [i for i, handle in enumerate(self.handles) if handle is not None]
                frame = frame.iloc[kept]
                self.handles = [self.handles[i] for i in kept]
        self.ids = frame["id"].astype(str).tolist()
        self.captions = frame["caption"].tolist()
        self.variants = dict(variants) if variants else None
        if self.variants is not None:
            absent = [i for i in self.ids if i not in self.variants]
            if absent:
                raise ValueError(
                    f"no caption variants for {len(absent)} record(s), e.g. id {absent[0]!r}"
                )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample of record ``index``; if its image cannot be read, the next readable
        record's sample instead (the batch keeps its size; a deterministic choice, so a resumed
        run reads what the uninterrupted run read), with the unreadable ones listed under
        ``"skipped"``. :class:`UnreadableImages` after ``MAX_SUBSTITUTES`` unreadable in a row."""
        skipped: list[dict[str, str]] = []
        for attempt in range(min(MAX_SUBSTITUTES, len(self))):
            position = (index + attempt) % len(self)
            try:
                sample = self._sample(position)
            except UnreadableImage as err:
                skipped.append(err.record)
                continue
            if skipped:
                sample["skipped"] = skipped
            return sample
        raise UnreadableImages(f"{len(skipped)} records in a row from {index} have unreadable "
                               f"images, e.g. {skipped[:3]}")

    def _sample(self, index: int) -> dict[str, Any]:
        caption = self.captions[index]
        long = caption
        if self.variants:  # torch's RNG: seeded per sample by the engine (SeededSamples)
            choices = self.variants[self.ids[index]]
            long = choices[int(torch.randint(len(choices), ()))]
        sample: dict[str, Any] = {"long": long, "short": self.short_caption(caption)}
        if self.preprocess is not None:
            sample["image"] = self.preprocess(self.read_image(index))
        return sample

    def read_image(self, index: int) -> Image.Image:
        """The decoded image of record ``index``: every image read of training is here."""
        handle = self.handles[index]
        try:
            return self.source.open(handle, self.min_size)
        except Exception as err:  # noqa: BLE001 - any decoder or storage failure: skip, record
            raise UnreadableImage({"record_id": self.ids[index],
                                   "path": self.source.describe(handle),
                                   "error": f"{type(err).__name__}: {err}"}) from err


class Collate:
    """Stack images and tokenise texts: ``{"image", "long", "short"}`` plus, for distillation,
    ``"teacher_long"`` (the teacher's tokenisation) or ``"windows"``/``"window_mask"``."""

    def __init__(
        self,
        tokenizer,
        short_tokenizer=None,
        teacher_tokenizer=None,
        windows: int = 0,
        overlap: int = 20,
    ):
        self.tokenizer = tokenizer
        self.short_tokenizer = short_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.windows, self.overlap = windows, overlap

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longs = [s["long"] for s in samples]
        batch = {"long": trim_padding(self.tokenizer(longs))}
        if "image" in samples[0]:
            batch["image"] = torch.stack([s["image"] for s in samples])
        if self.short_tokenizer is not None:
            batch["short"] = trim_padding(self.short_tokenizer([s["short"] for s in samples]))
        skipped = [record for s in samples for record in s.get("skipped", ())]
        if skipped:  # unreadable images replaced by readable ones: the engine records them
            batch["skipped"] = skipped
        if "teacher_embedding" in samples[0]:  # cached: no teacher input needed
            batch["teacher_embedding"] = torch.stack([s["teacher_embedding"] for s in samples])
        if self.teacher_tokenizer is not None:
            if not self.windows:  # the student reads the teacher's tokens too
                batch["teacher_long"] = self.teacher_tokenizer(longs)
            elif "teacher_embedding" not in samples[0]:  # windows: only a live teacher reads them
                batch["windows"], batch["window_mask"] = window_tokens(
                    longs, self.teacher_tokenizer, self.overlap, self.windows
                )
        return batch


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the padding columns that no text in the batch reaches (the text towers are causal
    and pool at the end-of-text token, so the embeddings do not change; the work does)."""
    length = int((tokens != 0).sum(dim=1).max())
    return tokens[:, : max(length, 1)]


def window_tokens(
    texts: list[str], tokenizer, overlap: int, max_windows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping windows of each text for a short-context teacher.

    Each window holds ``context - 2`` BPE tokens wrapped in start/end tokens; consecutive windows
    share ``overlap`` tokens. Returns tokens [B, max_windows, context] and a mask [B, max_windows].
    """
    context = tokenizer.context_length
    inner = context - 2
    stride = inner - overlap
    if stride < 1:
        raise ValueError(f"window overlap {overlap} leaves no stride in a {context}-token window")
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    out = torch.zeros(len(texts), max_windows, context, dtype=torch.long)
    mask = torch.zeros(len(texts), max_windows, dtype=torch.bool)
    for b, text in enumerate(texts):
        ids = tokenizer.encode(text)
        starts = list(range(0, max(len(ids) - overlap, 1), stride))[:max_windows]
        for w, start in enumerate(starts):
            piece = [sot, *ids[start : start + inner], eot]
            out[b, w, : len(piece)] = torch.tensor(piece)
            mask[b, w] = True
    return out, mask


# Batches: moving them to the device, their scalars, counting their samples

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


# The per-rank order of the samples: seeded, whole optimizer steps only, resumable on any number
# of processes

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


# Unreadable samples during training and validation: skipped (the dataset substitutes the next
# readable record), recorded, and fatal only once too many are bad. A run fails with
# TooManyBadSamples, listing the first offenders, once more than max_bad_fraction of the samples
# it has seen could not be read; the first 1 / max_bad_fraction samples count as that many, so
# that one early bad image (0.1% of 1,000) does not end a run that has seen only a few.

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
