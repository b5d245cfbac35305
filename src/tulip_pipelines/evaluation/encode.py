"""Encoding for evaluation (no Kedro): image and text features from a model's own towers.

Images are decoded as the benchmarks' reference code does (whole files), or through an image
source (ShareGPT4V-1k: at the size the preprocess needs); an image that cannot be read is left
out and reported, never an exception. Texts use the model's own tokenizer (its context length).
The model runs on ``device`` (moved there for the call, :mod:`tulip_pipelines.models.device`),
under ``autocast`` on an accelerator; the features come back float32 on the CPU.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tulip_pipelines.data.images import ImageSource, preprocess_size
from tulip_pipelines.evaluation.analysis import token_lengths
from tulip_pipelines.models.device import inference_autocast, loader_context, on_device
from tulip_pipelines.models.spec import ModelBundle
from tulip_pipelines.progress import track

logger = logging.getLogger(__name__)


class _Images(Dataset):
    """Image files (decoded in full, as the benchmarks' reference code does), or the handles of
    an image source (ShareGPT4V-1k: decoded at the size the preprocess needs). An image that
    cannot be read is ``(index, None, error)``, never an exception."""

    def __init__(self, items: Sequence[Any], preprocess, source: ImageSource | None = None):
        self.items, self.preprocess, self.source = items, preprocess, source
        self.min_size = preprocess_size(preprocess)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            if self.source is not None:
                image = self.source.open(self.items[index], self.min_size)
                return index, self.preprocess(image), ""
            with Image.open(self.items[index]) as image:
                return index, self.preprocess(image.convert("RGB")), ""
        except Exception as err:  # noqa: BLE001 - any decoder or storage failure: left out, recorded
            return index, None, f"{type(err).__name__}: {err}"


def _collate_images(items):
    """(indices of the readable images, their pixels or None, {index: error} of the others)."""
    readable = [(i, x) for i, x, _ in items if x is not None]
    pixels = torch.stack([x for _, x in readable]) if readable else None
    return [i for i, _ in readable], pixels, {i: e for i, x, e in items if x is None}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(bundle: ModelBundle, paths: Sequence[Any], batch_size: int, num_workers: int = 0,
                  desc: str = "images", source: ImageSource | None = None,
                  unreadable: dict[int, str] | None = None, device: torch.device | None = None,
                  autocast: str | None = None, show_progress: bool = True) -> torch.Tensor:
    """L2-normalised image features [n, d] (float32, CPU) from the bundle's own image tower, of
    image files ``paths``, or of the handles ``paths`` of ``source``, computed on ``device``
    (default: where the model is). The row of an image that cannot be read is zero, and its
    index and error go into ``unreadable``. ``show_progress=False``: no bar or log line."""
    model = bundle.model.eval()
    device = device or _device(model)
    loader = DataLoader(_Images(paths, bundle.preprocess, source), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate_images,
                        pin_memory=device.type == "cuda",
                        multiprocessing_context=loader_context(device, num_workers))
    out: torch.Tensor | None = None
    with on_device(model, device), inference_autocast(device, autocast):
        for indices, pixels, errors in track(loader, desc, "batch", enabled=show_progress):
            if unreadable is not None:
                unreadable.update(errors)
            for index, error in errors.items():
                item = paths[index]
                named = f"#{index}" if isinstance(item, (bytes, bytearray)) else item
                logger.warning("%s: left out image %s: %s", desc, named, error)
            if pixels is None:
                continue
            pixels = pixels.to(device, non_blocking=True)
            features = model.encode_image(pixels, normalize=True).float().cpu()
            if out is None:
                out = torch.zeros(len(paths), features.shape[1])
            out[indices] = features
    if out is None:  # not one image could be read: no feature width to give
        raise RuntimeError(f"{desc}: none of the {len(paths)} images could be read")
    return out


def tokenize(bundle: ModelBundle, texts: Sequence[str], batch_size: int = 4096) -> torch.Tensor:
    """The bundle's own tokens of ``texts`` [n, its context length] (int32 to halve memory)."""
    return torch.cat([bundle.tokenizer(list(texts[start : start + batch_size])).int()
                      for start in range(0, len(texts), batch_size)])


@torch.no_grad()
def encode_tokens(
    bundle: ModelBundle, tokens: torch.Tensor, batch_size: int, desc: str = "texts",
    device: torch.device | None = None, autocast: str | None = None, show_progress: bool = True,
) -> torch.Tensor:
    """L2-normalised text features [n, d] (float32, CPU) of ``tokens`` (the bundle's
    tokenizer's output), computed on ``device`` (default: where the model is)."""
    model = bundle.model.eval()
    device = device or _device(model)
    out = []
    with on_device(model, device), inference_autocast(device, autocast):
        for start in track(range(0, len(tokens), batch_size), desc, "batch",
                           enabled=show_progress):
            batch = tokens[start : start + batch_size]
            # columns after the longest row's end token hold padding, which changes nothing ('!'
            # is token 0 too, so the end token's position counts, not the non-zero tokens)
            length = int(token_lengths(batch).max())
            out.append(model.encode_text(batch[:, :length].long().to(device),
                                         normalize=True).float().cpu())
    return torch.cat(out)


def image_tower_key(bundle: ModelBundle) -> str:
    """A hash of the image tower's weights and preprocessing: equal towers encode images alike."""
    digest = hashlib.sha1(repr(bundle.preprocess).encode())
    for key, tensor in bundle.model.visual.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
