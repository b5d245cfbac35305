"""Loading the TULIP authors' own ``epoch_N.pt`` files.

The fixtures are written from the authors' layout, key by key (ivonajdenkoska/tulip at 132c174:
open_clip/training/main_distill_rope.py saves stage 1, main_context_finetune_rope.py stage 2),
not from this project's modules, so that a naming or layout difference from their release shows:

* both files are ``{"epoch", "name", "state_dict", "optimizer"}``; under torchrun the model is
  wrapped in DDP, so every key of ``state_dict`` starts with ``module.``;
* stage 1 (distillation) holds only the student's text tower (``TextTransformerRoPE``):
  ``text_projection`` (width, embed_dim) copied from the teacher, ``token_embedding``, the RoPE
  blocks under ``nn.MultiheadAttention``'s names, ``ln_final``; no position embedding;
* stage 2 (context fine-tuning) holds the whole CLIP: the RoPE text tower, the teacher's
  ``text_projection``, ``logit_scale``, the image tower, and the teacher's unused
  ``positional_embedding`` (77 rows).

The sizes are TULIP-Tiny's (conf: src/tulip_pipelines/models/configs/TULIP-Tiny.json), and a
variant whose embedding width differs from the text width (text_projection not square).
"""

from collections import OrderedDict

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from tulip_pipelines.models import load_bundle, load_model

LONG = " ".join(f"In cell {i} there is a small red circle with a striped fill." for i in range(40))

WIDTH, LAYERS, VOCAB, TEXT_CONTEXT = 64, 3, 49408, 77  # TULIP-Tiny's text tower
VISUAL_WIDTH, VISUAL_LAYERS, PATCH, IMAGE = 128, 3, 16, 48  # and its image tower


def block_shapes(prefix: str, width: int) -> list[tuple[str, tuple[int, ...]]]:
    """One pre-LN residual block (open_clip's, and the authors' RoPE block: same names)."""
    return [
        (f"{prefix}.ln_1.weight", (width,)),
        (f"{prefix}.ln_1.bias", (width,)),
        (f"{prefix}.attn.in_proj_weight", (3 * width, width)),  # q, k, v packed
        (f"{prefix}.attn.in_proj_bias", (3 * width,)),
        (f"{prefix}.attn.out_proj.weight", (width, width)),
        (f"{prefix}.attn.out_proj.bias", (width,)),
        (f"{prefix}.ln_2.weight", (width,)),
        (f"{prefix}.ln_2.bias", (width,)),
        (f"{prefix}.mlp.c_fc.weight", (4 * width, width)),
        (f"{prefix}.mlp.c_fc.bias", (4 * width,)),
        (f"{prefix}.mlp.c_proj.weight", (width, 4 * width)),
        (f"{prefix}.mlp.c_proj.bias", (width,)),
    ]


def text_tower_shapes(embed_dim: int) -> list[tuple[str, tuple[int, ...]]]:
    """The stage-1 student's state dict, in its order (TextTransformerRoPE: no positions)."""
    shapes = [("text_projection", (WIDTH, embed_dim)), ("token_embedding.weight", (VOCAB, WIDTH))]
    for i in range(LAYERS):
        shapes += block_shapes(f"transformer.resblocks.{i}", WIDTH)
    return shapes + [("ln_final.weight", (WIDTH,)), ("ln_final.bias", (WIDTH,))]


def clip_shapes(embed_dim: int) -> list[tuple[str, tuple[int, ...]]]:
    """A whole CLIP as OpenAI's ``build_model`` names it (the teacher, and stage 2)."""
    grid = IMAGE // PATCH
    shapes = [
        ("positional_embedding", (TEXT_CONTEXT, WIDTH)),
        ("text_projection", (WIDTH, embed_dim)),
        ("logit_scale", ()),
        ("visual.class_embedding", (VISUAL_WIDTH,)),
        ("visual.positional_embedding", (grid * grid + 1, VISUAL_WIDTH)),
        ("visual.proj", (VISUAL_WIDTH, embed_dim)),
        ("visual.conv1.weight", (VISUAL_WIDTH, 3, PATCH, PATCH)),  # no bias
        ("visual.ln_pre.weight", (VISUAL_WIDTH,)),
        ("visual.ln_pre.bias", (VISUAL_WIDTH,)),
    ]
    for i in range(VISUAL_LAYERS):
        shapes += block_shapes(f"visual.transformer.resblocks.{i}", VISUAL_WIDTH)
    shapes += [("visual.ln_post.weight", (VISUAL_WIDTH,)), ("visual.ln_post.bias", (VISUAL_WIDTH,))]
    return shapes + [(k, s) for k, s in text_tower_shapes(embed_dim) if k != "text_projection"]


def random_state(shapes, seed: int) -> "OrderedDict[str, torch.Tensor]":
    """Non-zero random values: norms near 1, everything else small."""
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, shape in shapes:
        if key == "logit_scale":
            state[key] = torch.tensor(4.6052)
        elif ".ln_" in key or key.startswith(("ln_", "visual.ln_")):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[key] = 0.05 * torch.randn(shape, generator=gen)
    return state


def adamw_state(state: dict[str, torch.Tensor], trained: list[str]) -> dict:
    """What ``optimizer.state_dict()`` holds after one AdamW step over ``trained`` (decay on
    matrices, none on gains and biases, as in the authors' scripts)."""
    params = {k: torch.nn.Parameter(state[k].clone()) for k in trained}
    groups = [
        {"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    for p in params.values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return optimizer.state_dict()


def save_epoch_file(path, state, trained, epoch: int, ddp: bool) -> None:
    prefix = "module." if ddp else ""
    torch.save({
        "epoch": epoch,
        "name": "tulip-run",
        "state_dict": OrderedDict((prefix + k, v) for k, v in state.items()),
        "optimizer": adamw_state(state, trained),
    }, path)


def tiny_config(embed_dim: int, monkeypatch) -> str:
    """TULIP-Tiny (embed_dim 64 = text width) or a variant with another embed_dim."""
    if embed_dim == 64:
        return "TULIP-Tiny"
    base = open_clip.get_model_config("TULIP-Tiny")
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, f"Tiny-embed{embed_dim}",
                        {**base, "embed_dim": embed_dim})
    return f"Tiny-embed{embed_dim}"


def assert_holds(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``state`` is in ``model`` under the same name."""
    loaded = model.state_dict()
    missing = sorted(set(state) - set(loaded))
    assert not missing, missing
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def assert_towers_work(model: torch.nn.Module, tokenizer, embed_dim: int) -> None:
    tokens = tokenizer([LONG, "a red circle"])
    assert tokens.shape == (2, 248)
    with torch.no_grad():
        text = model.encode_text(tokens)
        image = model.encode_image(torch.randn(2, 3, IMAGE, IMAGE))
    assert text.shape == image.shape == (2, embed_dim)
    assert torch.isfinite(text).all() and torch.isfinite(image).all()


@pytest.mark.parametrize("embed_dim,ddp", [(64, True), (64, False), (32, True)],
                         ids=["torchrun", "one-gpu", "torchrun-embed32"])
def test_stage1_file_loads_with_the_teachers_image_tower(tmp_path, monkeypatch, embed_dim, ddp):
    tiny_name = tiny_config(embed_dim, monkeypatch)
    teacher_state = random_state(clip_shapes(embed_dim), seed=1)
    teacher_file = tmp_path / "teacher.pt"
    torch.save(dict(teacher_state, input_resolution=torch.tensor(IMAGE),  # OpenAI's format
                    context_length=torch.tensor(TEXT_CONTEXT), vocab_size=torch.tensor(VOCAB)),
               teacher_file)
    student_state = random_state(text_tower_shapes(embed_dim), seed=2)
    assert len(student_state) == 2 + 12 * LAYERS + 2  # 148 keys for ViT-L-14's 12 layers
    trained = [k for k in student_state if not k.startswith("token_embedding.")]
    save_epoch_file(tmp_path / "epoch_5.pt", student_state, trained, epoch=5, ddp=ddp)

    loaded = load_bundle(tmp_path / "epoch_5.pt", teacher=tiny_name, pretrained=str(teacher_file))
    assert_holds(loaded.model, student_state)
    assert_holds(loaded.model, {k: v for k, v in teacher_state.items()
                                if k.startswith("visual.") or k == "logit_scale"})
    assert "positional_embedding" not in loaded.model.state_dict()
    assert loaded.spec.kind == "rope" and loaded.spec.context_length == 248
    assert loaded.spec.extra["origin"] == "tulip-original-stage1"
    # the authors' student used exact GELU; OpenAI's image tower QuickGELU
    assert type(loaded.model.transformer.resblocks[0].mlp.gelu) is torch.nn.GELU
    assert isinstance(loaded.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert_towers_work(loaded.model, loaded.tokenizer, embed_dim)


@pytest.mark.parametrize("embed_dim", [64, 32], ids=["tiny", "embed32"])
def test_stage2_file_loads_whole_and_drops_the_leftover_positions(tmp_path, monkeypatch,
                                                                   embed_dim):
    tiny_name = tiny_config(embed_dim, monkeypatch)
    state = random_state(clip_shapes(embed_dim), seed=3)
    save_epoch_file(tmp_path / "epoch_2.pt", state, list(state), epoch=2, ddp=True)

    model, _, tokenizer = load_model(tmp_path / "epoch_2.pt", teacher=tiny_name, pretrained=None)
    assert_holds(model, {k: v for k, v in state.items() if k != "positional_embedding"})
    assert set(model.state_dict()) == set(state) - {"positional_embedding"}
    assert type(model.transformer.resblocks[0].mlp.gelu) is torch.nn.GELU
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert_towers_work(model, tokenizer, embed_dim)


def test_stage1_file_with_a_missing_block_names_what_is_missing(tmp_path):
    teacher_file = tmp_path / "teacher.pt"
    torch.save(random_state(clip_shapes(64), seed=1), teacher_file)
    state = random_state(text_tower_shapes(64), seed=2)
    del state["transformer.resblocks.2.mlp.c_fc.bias"]
    save_epoch_file(tmp_path / "epoch_1.pt", state, list(state), epoch=1, ddp=True)
    with pytest.raises(ValueError, match=r"transformer\.resblocks\.2\.mlp\.c_fc\.bias"):
        load_bundle(tmp_path / "epoch_1.pt", teacher="TULIP-Tiny", pretrained=str(teacher_file))
