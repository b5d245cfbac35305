"""The TULIP student: a CLIP whose text tower uses RoPE instead of learned absolute positions."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from tulip_pipelines.models.clip import AbsoluteCLIP, bundle, derived_clip
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


# Rotary position embeddings (RoPE) in the text tower's attention

def ntk_scaled_theta(
    theta: float, head_dim: int, old_len: int, new_len: int, scale: float
) -> float:
    """NTK-style RoPE base for a longer context:
    ``theta * (s * new/old - (s - 1)) ** (d / (d - 2))``."""
    if new_len <= old_len:
        return theta
    return theta * (scale * new_len / old_len - (scale - 1)) ** (head_dim / (head_dim - 2))


class RotaryEmbedding(nn.Module):
    """Interleaved RoPE with its cos/sin tables (one complex64 table, ``cos + i sin``) cached per
    (length, device, theta); the rotation is a complex multiplication in float32."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self._cache: dict[tuple, torch.Tensor] = {}

    def set_theta(self, theta: float) -> None:
        self.theta = float(theta)
        self._cache.clear()

    def table(self, length: int, device: torch.device) -> torch.Tensor:
        """``exp(i * pos * theta ** (-2j / head_dim))`` as complex64, shape
        [length, head_dim / 2]."""
        key = (length, device, self.theta)
        if key not in self._cache:
            channels = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64)
            positions = torch.arange(length, device=device, dtype=torch.float64)
            angles = torch.outer(positions, self.theta ** -(channels / self.head_dim))
            self._cache[key] = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
        return self._cache[key]

    def rotate(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate ``x`` of shape [..., L, head_dim]: channels (2j, 2j+1) at position p turn by
        ``p * theta ** (-2j / head_dim)``. Math in float32, result in x's dtype."""
        if positions is None:
            table = self.table(x.shape[-2], x.device)
        else:
            table = self.table(int(positions.max()) + 1, x.device)[positions]
        xf = x.float()
        if xf.stride(-1) != 1 or any(s % 2 for s in xf.stride()[:-1]):
            xf = xf.contiguous()  # view_as_complex needs (real, imag) pairs adjacent in memory
        rotated = torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * table
        return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


class RopeSelfAttention(nn.Module):
    """Causal self-attention with RoPE on q and k through ``scaled_dot_product_attention``.

    Called like ``nn.MultiheadAttention`` by open_clip's residual block; the block's additive mask
    is ignored in favour of SDPA's causal mode (the text tower is always causal).
    """

    def __init__(self, width: int, heads: int, rotary: RotaryEmbedding, batch_first: bool = True):
        super().__init__()
        self.width, self.heads, self.batch_first = width, heads, batch_first
        self.head_dim = width // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # shared by every layer; not a submodule so it appears once and holds no state to save
        object.__setattr__(self, "rotary", rotary)

    def project_qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (rotated) and v as [batch, heads, L, head_dim] from x [batch, L, width]."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k = self.rotary.rotate(qkv[:2]).unbind(0)  # q and k in one pass
        return q, k, qkv[2]

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        x = query if self.batch_first else query.transpose(0, 1)
        q, k, v = self.project_qk(x)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        return (out if self.batch_first else out.transpose(0, 1)), None
