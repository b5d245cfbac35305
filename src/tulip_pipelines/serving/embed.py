"""Embeddings for users of a trained model: captions (cut as open_clip cuts them, end token
kept, with how many tokens each lost) and images given as bytes (decoded by
:func:`tulip_pipelines.data.images.open_image_file`; one that cannot be decoded is reported,
never an exception). Both are L2-normalised, float32, of the model's width."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

from tulip_pipelines.data.images import open_image_file
from tulip_pipelines.evaluation.analysis import caption_token_counts
from tulip_pipelines.evaluation.encode import encode_images, encode_tokens, tokenize
from tulip_pipelines.models.spec import ModelBundle


def truncated_tokens(bundle: ModelBundle, texts: Sequence[str]) -> np.ndarray:
    """How many tokens of each caption the model does not read (0 when it fits its context):
    the caption's full count, start and end tokens included, minus the context length."""
    encoder = bundle.tokenizer if hasattr(bundle.tokenizer, "encode") else None
    full = caption_token_counts(texts, encoder)
    return np.maximum(full - bundle.spec.context_length, 0)


def blank_texts(texts: Sequence[str]) -> list[int]:
    """The positions of the empty or whitespace-only captions (nothing to embed)."""
    return [i for i, text in enumerate(texts) if not str(text).strip()]


def embed_texts(bundle: ModelBundle, texts: Sequence[str], batch_size: int = 64,
                device: torch.device | None = None, autocast: str | None = None,
                show_progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """``(features [n, d], truncated [n])``: the captions' L2-normalised features with the
    model's own tokenizer (longer captions cut at its context, end token kept) and how many
    tokens each lost. An empty or whitespace-only caption is a ``ValueError`` naming it (its
    embedding would be the start and end tokens': a meaningless match for any image)."""
    blank = blank_texts(texts)
    if blank:
        raise ValueError(f"caption(s) {blank[:10]} empty or whitespace only: nothing to embed")
    features = encode_tokens(bundle, tokenize(bundle, texts), batch_size, device=device,
                             autocast=autocast, show_progress=show_progress)
    return features, truncated_tokens(bundle, texts)


class BytesImages:
    """An image source over encoded images held in memory (the items are their bytes)."""

    def open(self, item: bytes, min_size: int | None = None):
        return open_image_file(io.BytesIO(item), min_size)


def embed_image_bytes(bundle: ModelBundle, images: Sequence[bytes], batch_size: int = 64,
                      device: torch.device | None = None, autocast: str | None = None,
                      show_progress: bool = True) -> tuple[torch.Tensor | None, dict[int, str]]:
    """``(features [n, d], {index: error})`` of encoded images (JPEG, PNG, ... bytes); the row
    of one that cannot be decoded is zero and its error is returned; ``None`` features when
    none can."""
    unreadable: dict[int, str] = {}
    try:
        features = encode_images(bundle, list(images), batch_size, source=BytesImages(),
                                 unreadable=unreadable, device=device, autocast=autocast,
                                 show_progress=show_progress)
    except RuntimeError:
        if len(unreadable) == len(images):
            return None, unreadable
        raise
    return features, unreadable
