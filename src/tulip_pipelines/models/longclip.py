"""The Long-CLIP baseline: a teacher's absolute position embedding stretched to a longer context."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from tulip_pipelines.models.clip import AbsoluteCLIP, bundle
from tulip_pipelines.models.spec import ModelBundle, ModelSpec


def stretch_positions(pos: torch.Tensor, new_length: int = 248, keep: int = 20) -> torch.Tensor:
    """Long-CLIP's knowledge-preserved stretching of an absolute position embedding.

    Rule (Zhang et al., "Long-CLIP: Unlocking the Long-Text Capability of CLIP", ECCV 2024,
    Sec. 3.1; beichenzbc/Long-CLIP): the first ``keep`` positions, which CLIP trained well, stay
    as they are; every later gap between consecutive positions ``i`` and ``i+1`` is filled by
    linear interpolation with ``ratio - 1`` new points (ratio 4 for 77 -> 248), and the last
    trained position is extrapolated along its last difference to fill the tail.
    """
    old_length, _ = pos.shape
    rest = new_length - keep
    ratio = rest // (old_length - keep)
    if ratio < 1 or keep >= old_length:
        raise ValueError(f"cannot stretch {old_length} positions to {new_length} keeping {keep}")
    out = torch.empty(new_length, pos.shape[1], dtype=pos.dtype)
    out[:keep] = pos[:keep]
    for j in range(rest):
        src = keep + j / ratio
        lo = min(int(src), old_length - 2)
        frac = src - lo
        out[keep + j] = (1 - frac) * pos[lo] + frac * pos[lo + 1]
    return out


def stretch_position_embedding(
    teacher: ModelBundle, new_length: int = 248, keep: int = 20
) -> ModelBundle:
    """The Long-CLIP baseline: the teacher with its position embedding stretched to
    ``new_length``."""
    if teacher.spec.kind != "absolute":
        raise ValueError("Long-CLIP stretching needs a model with absolute position embeddings")
    model = copy.deepcopy(teacher.model)
    with torch.no_grad():
        stretched = stretch_positions(model.positional_embedding.detach().float(), new_length, keep)
    model.positional_embedding = nn.Parameter(stretched.to(model.positional_embedding.dtype))
    mask = torch.full((new_length, new_length), float("-inf")).triu_(1)
    model.attn_mask = mask
    model.context_length = new_length
    spec = ModelSpec(
        teacher.spec.model_name, "absolute", new_length, activation=teacher.spec.activation,
        extra={"origin": "longclip-stretch", "keep": keep, "teacher": teacher.spec.to_dict()},
    )  # fmt: skip
    return bundle(model, spec)


class KeptPositionsCLIP(AbsoluteCLIP):
    """A stretched CLIP as Long-CLIP fine-tunes it: two copies of the position table, the
    frozen ``positional_embedding`` (its first ``keep_positions`` rows are used) and the trainable
    ``positional_embedding_res`` (the other rows), so that the kept rows get no gradient and stay
    bit-identical. :func:`merge_kept_positions` turns it back into one table for export."""

    frozen_parameters = ("positional_embedding",)

    def text_transformer(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        kept = torch.arange(length, device=x.device)[:, None] < self.keep_positions
        positions = torch.where(kept, self.positional_embedding[:length],
                                self.positional_embedding_res[:length])
        return self.transformer(x + positions.to(x.dtype),
                                attn_mask=self.attn_mask[:length, :length])


def freeze_kept_positions(stretched: ModelBundle, keep: int) -> ModelBundle:
    """A copy of a stretched model whose first ``keep`` position rows cannot train."""
    model = copy.deepcopy(stretched.model)
    model.__class__ = KeptPositionsCLIP
    model.keep_positions = keep
    model.positional_embedding_res = nn.Parameter(model.positional_embedding.detach().clone())
    model.positional_embedding.requires_grad_(False)
    return dataclasses.replace(stretched, model=model)


def merge_kept_positions(trained: ModelBundle) -> ModelBundle:
    """The exported form of a :class:`KeptPositionsCLIP`: one position table (kept rows from the
    frozen copy, the others trained), as a plain absolute-position CLIP."""
    model = trained.model
    if not isinstance(model, KeptPositionsCLIP):
        return trained
    model = copy.deepcopy(model)
    with torch.no_grad():
        rows = torch.arange(len(model.positional_embedding))[:, None] < model.keep_positions
        merged = torch.where(rows, model.positional_embedding, model.positional_embedding_res)
    del model.positional_embedding_res
    model.positional_embedding = nn.Parameter(merged)
    model.__class__ = AbsoluteCLIP
    del model.keep_positions
    return dataclasses.replace(trained, model=model)
