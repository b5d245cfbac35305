"""The TULIP student: a CLIP whose text tower uses RoPE instead of learned absolute positions."""

from __future__ import annotations

import copy

import torch

from tulip_pipelines.models.clip import AbsoluteCLIP, bundle, derived_clip
from tulip_pipelines.models.rope import RopeSelfAttention, RotaryEmbedding, ntk_scaled_theta
from tulip_pipelines.models.spec import ModelBundle, ModelSpec


class RopeCLIP(AbsoluteCLIP):
    """open_clip's CLIP whose text tower uses RoPE in every attention layer (one
    :class:`RotaryEmbedding` of base ``rope_theta`` shared by all), no absolute position
    embedding, and any input length up to ``context_length``."""

    def __init__(self, *args, rope_theta: float = 10000.0, **kwargs):
        super().__init__(*args, **kwargs)
        heads = self.transformer.resblocks[0].attn.num_heads
        self.rotary = RotaryEmbedding(self.transformer.width // heads, rope_theta)
        for block in self.transformer.resblocks:
            mha = block.attn
            block.attn = RopeSelfAttention(mha.embed_dim, mha.num_heads, self.rotary,
                                           batch_first=mha.batch_first)
        del self.positional_embedding
        self.attn_mask = torch.empty(0)

    def text_transformer(self, x: torch.Tensor) -> torch.Tensor:
        """No absolute positions: RoPE and the causal mask act inside every attention layer."""
        return self.transformer(x, attn_mask=None)


def rope_state(absolute: AbsoluteCLIP) -> dict[str, torch.Tensor]:
    """An absolute-position CLIP's weights as a :class:`RopeCLIP` holds them (the same tensors
    less the position table: attention keeps its projection weights)."""
    return {k: v for k, v in absolute.state_dict().items() if k != "positional_embedding"}


def build_student(
    teacher: ModelBundle,
    context_length: int = 248,
    rope_theta: float = 10000.0,
    activation: str | None = None,
) -> ModelBundle:
    """The TULIP student: a copy of the teacher (token embedding, transformer blocks, final norm,
    text projection, image tower, logit scale) with RoPE instead of the position embedding."""
    if context_length < teacher.spec.context_length:
        raise ValueError(
            f"student context_length {context_length} is shorter than the teacher's "
            f"{teacher.spec.context_length}; TULIP only lengthens the context"
        )
    spec = ModelSpec(
        teacher.spec.model_name, "rope", context_length, rope_theta,
        activation or teacher.spec.activation,
        extra={"teacher": teacher.spec.to_dict()},
    )  # fmt: skip
    model = derived_clip(teacher.model, spec, RopeCLIP, rope_state(teacher.model),
                         rope_theta=rope_theta)
    return bundle(model, spec)


def expand_rope_context(
    student: ModelBundle, new_context_length: int, ntk_scale: float | None = None
) -> ModelBundle:
    """Lengthen a student's context; with ``ntk_scale`` also rescale the RoPE base NTK-style."""
    if student.spec.kind != "rope":
        raise ValueError("expand_rope_context needs a RoPE student")
    model = copy.deepcopy(student.model)
    theta = student.spec.rope_theta
    if ntk_scale is not None:
        old_length, head_dim = student.spec.context_length, model.rotary.head_dim
        theta = ntk_scaled_theta(theta, head_dim, old_length, new_context_length, ntk_scale)
    model.rotary.set_theta(theta)
    model.context_length = new_context_length
    spec = copy.deepcopy(student.spec)
    spec.context_length, spec.rope_theta = new_context_length, theta
    return bundle(model, spec)
