"""Rotary position embeddings (RoPE) for the TULIP student's text tower.

Layout follows the original TULIP student so that its checkpoints load: q and k (not v) are
rotated after the fused qkv projection, in float32, with *interleaved* channel pairs
(channels 2i and 2i+1 of a head form one complex number, as in LLaMA), frequencies
``theta ** (-2i / head_dim)``. The attention module keeps ``nn.MultiheadAttention``'s parameter
names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) so open_clip weights map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def ntk_scaled_theta(theta: float, head_dim: int, old_len: int, new_len: int, scale: float) -> float:
    """NTK-style RoPE base for a longer context: theta * (s * new/old - (s - 1)) ** (d / (d - 2))."""
    if new_len <= old_len:
        return theta
    return theta * (scale * new_len / old_len - (scale - 1)) ** (head_dim / (head_dim - 2))


class RotaryEmbedding(nn.Module):
    """cos/sin tables for interleaved RoPE, cached per (length, device, dtype)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_theta(self, theta: float) -> None:
        self.theta = float(theta)
        self._cache.clear()

    def tables(self, length: int, device: torch.device, dtype: torch.dtype = torch.float32):
        key = (length, device, dtype, self.theta)
        if key not in self._cache:
            inv_freq = self.theta ** (
                -torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim
            )
            angles = torch.outer(torch.arange(length, device=device, dtype=torch.float64), inv_freq)
            # each frequency serves one (even, odd) channel pair: repeat it for both channels
            angles = angles.repeat_interleave(2, dim=-1)
            self._cache[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
        return self._cache[key]

    def rotate(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate ``x`` of shape [..., L, head_dim] (float32 math, result in x's dtype)."""
        length = x.shape[-2]
        cos, sin = self.tables(length if positions is None else int(positions.max()) + 1, x.device)
        if positions is not None:
            cos, sin = cos[positions], sin[positions]
        else:
            cos, sin = cos[:length], sin[:length]
        xf = x.float()
        pairs = xf.unflatten(-1, (-1, 2))
        rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return (xf * cos + rotated_half * sin).to(x.dtype)


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

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention, rotary: RotaryEmbedding) -> "RopeSelfAttention":
        attn = cls(mha.embed_dim, mha.num_heads, rotary, batch_first=mha.batch_first)
        with torch.no_grad():
            attn.in_proj_weight.copy_(mha.in_proj_weight)
            attn.in_proj_bias.copy_(mha.in_proj_bias)
            attn.out_proj.load_state_dict(mha.out_proj.state_dict())
        return attn

    def project_qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (rotated) and v as [batch, heads, L, head_dim] from x [batch, L, width]."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2) for t in qkv.chunk(3, -1))
        return self.rotary.rotate(q), self.rotary.rotate(k), v

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        x = query if self.batch_first else query.transpose(0, 1)
        q, k, v = self.project_qk(x)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        return (out if self.batch_first else out.transpose(0, 1)), None
