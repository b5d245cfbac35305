"""The TULIP student, teachers, the Long-CLIP stretch and model files (the authors' epoch_N.pt
files: test_original.py)."""

import math

import open_clip
import pytest
import safetensors.torch
import torch
from open_clip.transformer import QuickGELU

from tulip_pipelines.models import (
    build_student,
    create_teacher,
    expand_rope_context,
    load_bundle,
    load_model,
    save_model,
    stretch_position_embedding,
    stretch_positions,
)
from tulip_pipelines.models.rope import RopeSelfAttention, RotaryEmbedding, ntk_scaled_theta

LONG = " ".join(f"In cell {i} there is a small red circle with a striped fill." for i in range(40))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return create_teacher("TULIP-Tiny")


@pytest.fixture(scope="module")
def student(teacher):
    return build_student(teacher, context_length=248)


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


def test_student_copies_every_teacher_weight():
    """Every teacher weight reaches the student under the same name (the position embedding
    excepted), on a teacher with no zero anywhere: a weight left at its initial value (biases
    start at zero) or taken from the wrong layer shows."""
    torch.manual_seed(3)
    teacher = create_teacher("TULIP-Tiny")
    with torch.no_grad():
        for param in teacher.model.parameters():
            param.copy_(torch.rand_like(param) + 0.5)  # in [0.5, 1.5): all distinct from zero
    t = teacher.model.state_dict()
    assert all(bool((v != 0).all()) for v in t.values())
    student = build_student(teacher, context_length=248)
    s = student.model.state_dict()
    assert set(s) == set(t) - {"positional_embedding"}
    assert any(".attn.in_proj_bias" in k for k in s) and any(".out_proj.bias" in k for k in s)
    for key in s:
        assert torch.equal(s[key], t[key]), key
    # copies, not shared tensors: training the student leaves the teacher alone
    assert student.model.visual is not teacher.model.visual
    assert all(s[k].data_ptr() != t[k].data_ptr() for k in s)


def test_eot_pooling_ignores_tokens_after_eot(student):
    tok = student.tokenizer(["a red circle"])
    eot = int(tok.argmax())
    changed = tok.clone()
    changed[0, eot + 1 : eot + 5] = 123  # padding after EOT; causal attention cannot see it
    with torch.no_grad():
        assert torch.allclose(
            student.model.encode_text(tok), student.model.encode_text(changed), atol=1e-6
        )
        # and the pooled token is the EOT: truncating right after it changes nothing
        assert torch.allclose(
            student.model.encode_text(tok), student.model.encode_text(tok[:, : eot + 1]), atol=1e-5
        )


def test_truncation_at_248_keeps_eot(student):
    tok = student.tokenizer([LONG])
    assert tok.shape == (1, 248)
    assert int(tok[0, -1]) == open_clip.tokenizer.SimpleTokenizer().eot_token_id


def test_student_shorter_than_teacher_is_refused(teacher):
    with pytest.raises(ValueError, match="shorter than the teacher's 77"):
        build_student(teacher, context_length=64)


def test_save_load_round_trip_is_identical(student, tmp_path):
    save_model(student, tmp_path / "ckpt")
    model, preprocess, tokenizer = load_model(tmp_path / "ckpt")
    tok = tokenizer([LONG, "short"])
    image = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model.encode_text(tok), student.model.encode_text(tok))
        assert torch.equal(model.encode_image(image), student.model.encode_image(image))
    assert load_bundle(tmp_path / "ckpt").spec == student.spec


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_bundle(tmp_path / "nothing")


def longclip_reference(pre: torch.Tensor) -> torch.Tensor:
    """Long-CLIP's published stretch of 77 positions to 248, row by row (beichenzbc/Long-CLIP,
    model/longclip.py): rows 0-19 kept; every later pair (20+i, 21+i) filled with quarters
    ((4-j)*a + j*b)/4, j = 0..3; the last 4 rows extrapolated along pre[76] - pre[75]."""
    assert pre.shape[0] == 77
    rows = [pre[r] for r in range(20)]
    for i in range(56):
        a, b = pre[20 + i], pre[21 + i]
        rows += [((4 - j) * a + j * b) / 4 for j in range(4)]
    rows += [pre[76] + k * (pre[76] - pre[75]) / 4 for k in range(4)]
    return torch.stack(rows)


def test_longclip_stretch_matches_the_published_rule_on_every_row():
    pre = torch.randn(77, 16, dtype=torch.float64)
    expected = longclip_reference(pre)
    assert expected.shape == (248, 16)
    got = stretch_positions(pre, new_length=248, keep=20)
    assert got.shape == (248, 16)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_longclip_stretch(teacher):
    longclip = stretch_position_embedding(teacher, new_length=248, keep=20)
    old = teacher.model.positional_embedding.detach()
    new = longclip.model.positional_embedding.detach()
    assert new.shape == (248, old.shape[1])
    torch.testing.assert_close(new, longclip_reference(old), rtol=0, atol=1e-6)
    assert longclip.tokenizer([LONG]).shape == (1, 248)


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


def test_missing_pretrained_weights_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not in the local cache") as err:
        create_teacher("ViT-B-32", "openai", cache_dir=str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value)
    with pytest.raises(FileNotFoundError, match="teacher weights file not found"):
        create_teacher("TULIP-Tiny", str(tmp_path / "missing.pt"))


def _tiny_gelu_configs(monkeypatch):
    """A GELU variant of TULIP-Tiny and its -quickgelu twin, registered for one test."""
    base = open_clip.get_model_config("TULIP-Tiny")
    monkeypatch.setitem(
        open_clip.factory._MODEL_CONFIGS, "Tiny-gelu", {**base, "quick_gelu": False}
    )
    monkeypatch.setitem(
        open_clip.factory._MODEL_CONFIGS, "Tiny-gelu-quickgelu", {**base, "quick_gelu": True}
    )


def test_pretrained_tag_resolves_from_hub_cache_offline(teacher, tmp_path, monkeypatch):
    _tiny_gelu_configs(monkeypatch)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "Tiny-gelu",
                        {"demo": {"url": "", "hf_hub": "tulip/tiny-demo/", "quick_gelu": True}})
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tulip--tiny-demo"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    safetensors.torch.save_file(
        teacher.model.state_dict(), repo / "snapshots" / commit / "open_clip_model.safetensors"
    )
    loaded = create_teacher("Tiny-gelu", "demo", cache_dir=str(tmp_path / "hub"))
    assert loaded.spec.model_name == "Tiny-gelu-quickgelu"  # the tag was trained with QuickGELU
    tok = teacher.tokenizer(["a blue square"])
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_text(tok), teacher.model.encode_text(tok))


def test_openai_state_dict_format_loads(teacher, tmp_path):
    state = dict(teacher.model.state_dict())
    state.update(
        input_resolution=torch.tensor(48),
        context_length=torch.tensor(77),
        vocab_size=torch.tensor(49408),
    )
    torch.save(state, tmp_path / "openai_format.pt")
    loaded = create_teacher("TULIP-Tiny", str(tmp_path / "openai_format.pt"))
    tok = teacher.tokenizer(["a blue square"])
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_text(tok), teacher.model.encode_text(tok))


def test_openai_format_selects_quick_gelu_in_both_towers(teacher, tmp_path, monkeypatch):
    _tiny_gelu_configs(monkeypatch)
    state = dict(teacher.model.state_dict(), input_resolution=torch.tensor(48))
    torch.save(state, tmp_path / "openai_format.pt")
    loaded = create_teacher("Tiny-gelu", str(tmp_path / "openai_format.pt"))
    assert loaded.spec.model_name == "Tiny-gelu-quickgelu"
    assert isinstance(loaded.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(loaded.model.transformer.resblocks[0].mlp.gelu, QuickGELU)
