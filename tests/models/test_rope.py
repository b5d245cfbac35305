"""RoPE (models/rope.py): the rotation, relative attention scores, the attention layer against an
explicit computation, NTK scaling of the base."""

import math

import pytest
import torch

from tests.models.conftest import LONG
from tulip_pipelines.models import (
    expand_rope_context,
)
from tulip_pipelines.models.clip import RopeSelfAttention, RotaryEmbedding, ntk_scaled_theta


def test_rotation_matches_direct_formula():
    rotary = RotaryEmbedding(head_dim=8, theta=10000.0)
    x = torch.randn(5, 8)
    out = rotary.rotate(x)
    for pos in range(5):
        for i in range(4):
            angle = pos * 10000.0 ** (-2 * i / 8)
            a, b = x[pos, 2 * i], x[pos, 2 * i + 1]
            assert out[pos, 2 * i] == pytest.approx(
                float(a * math.cos(angle) - b * math.sin(angle)), abs=1e-5
            )
            assert out[pos, 2 * i + 1] == pytest.approx(
                float(a * math.sin(angle) + b * math.cos(angle)), abs=1e-5
            )


def test_attention_scores_depend_only_on_offset():
    rotary = RotaryEmbedding(head_dim=16)
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    qs, ks = q.expand(60, 16), k.expand(60, 16)
    positions = torch.arange(60)
    rq, rk = rotary.rotate(qs, positions), rotary.rotate(ks, positions)
    shift = 17
    rq2 = rotary.rotate(qs, positions + shift)
    rk2 = rotary.rotate(ks, positions + shift)
    scores, shifted = rq @ rk.T, rq2 @ rk2.T
    assert torch.allclose(scores, shifted, atol=1e-4)
    assert not torch.allclose(scores[0, 1], scores[0, 5])  # but they do depend on the offset


def test_rope_attention_matches_explicit_computation():
    torch.manual_seed(1)
    width, heads, length = 32, 4, 9
    mha = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    rotary = RotaryEmbedding(width // heads)
    attn = RopeSelfAttention(width, heads, rotary)
    attn.load_state_dict(mha.state_dict())  # the same weights under the same names
    x = torch.randn(2, length, width)
    q, k, v = (x @ w.T + b for w, b in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)))
    split = lambda t: t.unflatten(-1, (heads, width // heads)).transpose(1, 2)  # noqa: E731
    q, k, v = rotary.rotate(split(q)), rotary.rotate(split(k)), split(v)  # v is not rotated
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    expected = mha.out_proj(((scores.softmax(-1) @ v).transpose(1, 2)).flatten(2))
    assert torch.allclose(attn(x)[0], expected, atol=1e-5)


def test_ntk_scaling_raises_theta(student):
    assert ntk_scaled_theta(10000.0, 16, 248, 248, 1.0) == 10000.0
    longer = expand_rope_context(student, 512, ntk_scale=1.0)
    expected = 10000.0 * (512 / 248) ** (16 / 14)
    assert longer.spec.rope_theta == pytest.approx(expected)
    assert longer.model.rotary.theta == pytest.approx(expected)
    assert all(
        block.attn.rotary is longer.model.rotary for block in longer.model.transformer.resblocks
    )
    assert student.model.rotary.theta == 10000.0  # the original is untouched
    tok = student.tokenizer([LONG])
    with torch.no_grad():
        assert not torch.allclose(longer.model.encode_text(tok), student.model.encode_text(tok))


def test_the_default_rope_base_is_10000_as_tulip_evaluates(student):
    """RoPE's base theta 1e4 (TULIP's ``transformer_rope.py`` and its evaluation at 248) is the
    default of the rotation, the student and its spec; frequencies theta^(-2i/d)."""
    from tulip_pipelines.models import ModelSpec, build_student, create_teacher

    rotary = RotaryEmbedding(head_dim=8)
    x = torch.randn(3, 8)
    out = rotary.rotate(x, torch.tensor([0, 1, 7]))
    angle = 7 * 10000.0 ** (-2 * 1 / 8)  # position 7, pair 1
    assert float(out[2, 2]) == pytest.approx(
        float(x[2, 2] * math.cos(angle) - x[2, 3] * math.sin(angle)), abs=1e-5)
    assert student.model.rotary.theta == 10000.0 and student.spec.rope_theta == 10000.0
    assert ModelSpec("x").rope_theta == 10000.0
    torch.manual_seed(0)
    default = build_student(create_teacher("TULIP-Tiny"))
    assert default.spec.context_length == 248 and default.model.context_length == 248
    assert default.model.rotary.theta == 10000.0 and default.spec.kind == "rope"
