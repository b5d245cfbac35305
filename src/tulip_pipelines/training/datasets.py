"""Training data: image-caption pairs from a captions table and an image source."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from tulip_pipelines.data.images import ImageSource, as_image_source, preprocess_size
from tulip_pipelines.data.text import first_sentence

logger = logging.getLogger(__name__)


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
    first sentence by default; see ``data.text.SHORT_CAPTIONS``). Images come from ``images``
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
