"""The Long-CLIP baseline: a teacher's absolute position embedding stretched to a longer context."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tulip_pipelines.models.clip import AbsoluteCLIP, bundle, derived_clip
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
    state = teacher.model.state_dict()
    positions = state["positional_embedding"]
    with torch.no_grad():
        stretched = stretch_positions(positions.detach().float(), new_length, keep)
    state["positional_embedding"] = stretched.to(positions.dtype)
    spec = ModelSpec(
        teacher.spec.model_name, "absolute", new_length, activation=teacher.spec.activation,
        extra={"origin": "longclip-stretch", "keep": keep,
               "teacher": dataclasses.asdict(teacher.spec)},
    )  # fmt: skip
    return bundle(derived_clip(teacher.model, spec, state=state), spec)


class KeptPositionsCLIP(AbsoluteCLIP):
    """A stretched CLIP as Long-CLIP fine-tunes it: two copies of the position table, the
    frozen ``positional_embedding`` (its first ``keep_positions`` rows are used) and the trainable
    ``positional_embedding_res`` (the other rows), so that the kept rows get no gradient and stay
    bit-identical. :func:`merge_kept_positions` turns it back into one table for export."""

    frozen_parameters = ("positional_embedding",)

    def __init__(self, *args, keep_positions: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_positions = keep_positions
        self.positional_embedding_res = nn.Parameter(self.positional_embedding.detach().clone())
        self.positional_embedding.requires_grad_(False)

    def text_transformer(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        kept = torch.arange(length, device=x.device)[:, None] < self.keep_positions
        positions = torch.where(kept, self.positional_embedding[:length],
                                self.positional_embedding_res[:length])
        return self.transformer(x + positions.to(x.dtype),
                                attn_mask=self.attn_mask[:length, :length])


def freeze_kept_positions(stretched: ModelBundle, keep: int) -> ModelBundle:
    """A copy of a stretched model whose first ``keep`` position rows cannot train."""
    state = stretched.model.state_dict()
    state["positional_embedding_res"] = state["positional_embedding"].detach().clone()
    model = derived_clip(stretched.model, stretched.spec, KeptPositionsCLIP, state,
                         keep_positions=keep)
    return dataclasses.replace(stretched, model=model)


def merge_kept_positions(trained: ModelBundle) -> ModelBundle:
    """The exported form of a :class:`KeptPositionsCLIP`: one position table (kept rows from the
    frozen copy, the others trained), as a plain absolute-position CLIP."""
    model = trained.model
    if not isinstance(model, KeptPositionsCLIP):
        return trained
    state = model.state_dict()
    with torch.no_grad():
        rows = torch.arange(len(model.positional_embedding))[:, None] < model.keep_positions
        state["positional_embedding"] = torch.where(rows, state["positional_embedding"],
                                                    state.pop("positional_embedding_res"))
    merged = derived_clip(model, trained.spec, state=state)
    merged.train(model.training)
    return dataclasses.replace(trained, model=merged)
