"""Long-CLIP's training model: the kept position rows cannot train, and export merges the two
tables back into one."""

import torch

from tulip_pipelines.models import create_teacher, stretch_position_embedding
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
