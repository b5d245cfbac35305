"""Long-CLIP's training model: the kept position rows cannot train, and export merges the two
tables back into one."""


import torch

from tests.models.conftest import LONG
from tulip_pipelines.models import (
    create_teacher,
    stretch_position_embedding,
    stretch_positions,
)
from tulip_pipelines.models.longclip import (
    KeptPositionsCLIP,
    freeze_kept_positions,
    merge_kept_positions,
)
from tulip_pipelines.training.tasks import ContrastiveTask


def test_kept_rows_stay_bit_identical_while_the_others_train():
    torch.manual_seed(0)
    stretched = stretch_position_embedding(create_teacher("TULIP-Tiny"), 248, 20)
    before = stretched.model.positional_embedding.detach().clone()
    frozen = freeze_kept_positions(stretched, 20)
    assert isinstance(frozen.model, KeptPositionsCLIP)
    tokens = frozen.tokenizer(["a red circle " * 30])  # long enough to reach row 100
    assert torch.equal(frozen.model.encode_text(tokens), stretched.model.encode_text(tokens))

    task = ContrastiveTask(frozen.model, 1.0, 0.0)  # freezes by tower: the kept table stays out
    assert not frozen.model.positional_embedding.requires_grad
    assert frozen.model.positional_embedding_res.requires_grad
    # weight decay on every parameter, as Long-CLIP: decay alone would move a trainable kept row
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.5)
    images = torch.randn(4, 3, 48, 48)
    texts = frozen.tokenizer([f"a {c} circle " * 30 for c in ("red", "blue", "green", "pink")])
    for _ in range(3):
        optimizer.zero_grad()
        task({"image": images, "long": texts})["loss"].backward()
        optimizer.step()

    merged = merge_kept_positions(frozen)
    assert type(merged.model).__name__ == "AbsoluteCLIP"
    assert sorted(merged.model.state_dict()) == sorted(stretched.model.state_dict())
    table = merged.model.positional_embedding
    assert torch.equal(table[:20], before[:20])
    assert (table[20:100] != before[20:100]).any(dim=1).all()  # every read row past 20 trained
    assert torch.equal(merged.model.encode_text(tokens), frozen.model.encode_text(tokens))


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


def test_the_defaults_are_long_clips_published_stretch():
    """Without arguments: 248 positions, the first 20 kept, 4x interpolation (the paper's)."""
    pre = torch.randn(77, 16, dtype=torch.float64)
    torch.testing.assert_close(stretch_positions(pre), longclip_reference(pre), rtol=0,
                               atol=1e-12)
    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    stretched = stretch_position_embedding(teacher)
    torch.testing.assert_close(stretched.model.positional_embedding.detach(),
                               longclip_reference(teacher.model.positional_embedding.detach()),
                               rtol=0, atol=1e-6)
    assert stretched.spec.context_length == 248 and stretched.spec.extra["keep"] == 20


def test_the_evaluations_stretched_teacher_is_the_published_stretch():
    """The evaluation's ``longclip_stretched`` stretches the teacher as the Long-CLIP baseline's
    own run did (its context and kept rows), by the published rule."""
    from tulip_pipelines.pipelines.evaluate.nodes import gather_models

    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    pre = teacher.model.positional_embedding.detach()
    authors = stretch_position_embedding(teacher, 248, 20)
    models = gather_models(teacher, authors, authors, teacher, teacher)
    torch.testing.assert_close(models["longclip_stretched"].model.positional_embedding.detach(),
                               longclip_reference(pre), rtol=0, atol=1e-6)
    # another recipe's stretch (kept rows, context) is followed, not the default one
    other = stretch_position_embedding(teacher, 200, 10)
    models = gather_models(teacher, other, authors, teacher, teacher)
    got = models["longclip_stretched"].model.positional_embedding.detach()
    assert got.shape[0] == 200
    assert torch.equal(got[:10], pre[:10])
    torch.testing.assert_close(got[11], (pre[10] + pre[11]) / 2)  # ratio 2 after row 10
