"""Training samples from a captions table and an image root; tokenising collate."""

import pickle

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image

from tulip_pipelines.training.datasets import (
    CaptionImageDataset,
    Collate,
    UnreadableImage,
    trim_padding,
)

CAPTIONS = ["A red circle on top. A blue square below it.", "Two cats. One sleeps, one plays."]


@pytest.fixture
def table(tmp_path):
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (20, 12), colour).save(tmp_path / f"img{i}.png")
    return pd.DataFrame({"id": ["a", "b"], "image": ["img0.png", "img1.png"], "caption": CAPTIONS})


def preprocess(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


def test_sample_has_image_long_and_first_sentence(table, tmp_path):
    ds = CaptionImageDataset(table, tmp_path, preprocess)
    assert len(ds) == 2
    sample = ds[0]
    assert sample["long"] == CAPTIONS[0]
    assert sample["short"] == "A red circle on top."
    assert sample["image"].shape == (3, 12, 20)
    assert sample["image"][:, 0, 0].tolist() == [255.0, 0.0, 0.0]  # the red image, read from disk
    assert "image" not in CaptionImageDataset(table, tmp_path, None)[1]  # text only (distill)


def test_variants_are_drawn_per_read_and_short_comes_from_the_caption(table, tmp_path):
    variants = {
        "a": [
            "A red circle on top. A blue square below it.",
            "A red circle on top. Below: a blue square.",
        ],
        "b": ["Two cats. One plays, one sleeps."],
    }
    ds = CaptionImageDataset(table, tmp_path, None, variants)
    torch.manual_seed(0)
    seen = {ds[0]["long"] for _ in range(40)}
    assert seen == set(variants["a"])
    assert ds[1]["long"] == variants["b"][0] and ds[1]["short"] == "Two cats."
    with pytest.raises(ValueError, match="no caption variants for 1 record.*'b'"):
        CaptionImageDataset(table, tmp_path, None, {"a": variants["a"]})


def test_errors_name_the_column_and_the_image(table, tmp_path):
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['image'\]"):
        CaptionImageDataset(table.drop(columns="image"), tmp_path, preprocess)
    (tmp_path / "img1.png").write_bytes(b"not a png")
    ds = CaptionImageDataset(table, tmp_path, preprocess)
    with pytest.raises(UnreadableImage, match=r"record 'b'.*img1\.png"):
        ds.read_image(1)
    sample = ds[1]  # the next readable record takes its place, and the bad one is recorded
    assert sample["skipped"][0]["record_id"] == "b" and "img1.png" in sample["skipped"][0]["path"]
    table.loc[0, "image"] = "missing.png"
    with pytest.raises(UnreadableImage, match=r"record 'a'.*missing\.png"):
        CaptionImageDataset(table, tmp_path, preprocess).read_image(0)


def test_collate_tokenises_for_each_task(table, tmp_path):
    student_tok = open_clip.get_tokenizer("ViT-B-32", context_length=248)
    teacher_tok = open_clip.get_tokenizer("ViT-B-32")
    samples = [CaptionImageDataset(table, tmp_path, preprocess)[i] for i in range(2)]

    batch = Collate(student_tok, short_tokenizer=student_tok)(samples)
    assert batch["image"].shape == (2, 3, 12, 20)
    full = student_tok(CAPTIONS)
    width = batch["long"].shape[1]
    assert width < 248 and torch.equal(batch["long"], full[:, :width])  # padding trimmed
    assert (full[:, width:] == 0).all()
    assert torch.equal(
        batch["short"][0], student_tok(["A red circle on top."])[0, : batch["short"].shape[1]]
    )

    distill = Collate(student_tok, teacher_tokenizer=teacher_tok)(samples)
    assert distill["teacher_long"].shape == (2, 77) and "short" not in distill
    windows = Collate(student_tok, teacher_tokenizer=teacher_tok, windows=3)(samples)
    assert (
        windows["windows"].shape == (2, 3, 77)
        and windows["window_mask"].tolist() == [[True, False, False]] * 2
    )

    restored = pickle.loads(
        pickle.dumps(Collate(student_tok, teacher_tokenizer=teacher_tok))
    )  # DataLoader workers
    assert torch.equal(restored(samples)["long"], distill["long"])


def test_trim_padding_keeps_embeddings(tiny):
    teacher, student = tiny
    tokens = student.tokenizer(["a red circle", "a much longer caption about a blue square"])
    trimmed = trim_padding(tokens)
    assert trimmed.shape[1] < 248 and (tokens[:, trimmed.shape[1]:] == 0).all()
    with torch.no_grad():
        assert torch.allclose(
            student.model.encode_text(tokens), student.model.encode_text(trimmed), atol=1e-5
        )


def test_a_window_overlap_must_leave_a_stride_of_at_least_one_token():
    """A 77-token window holds 75 caption tokens: an overlap of 74 moves by 1, 75 by nothing."""
    from tulip_pipelines.models import get_tokenizer
    from tulip_pipelines.training.datasets import window_tokens

    tokenizer = get_tokenizer("TULIP-Tiny", 77)
    text = " ".join(f"word{i}" for i in range(40))
    ids = tokenizer.encode(text)
    windows, mask = window_tokens([text], tokenizer, overlap=74, max_windows=3)
    assert mask[0].tolist() == [True] * 3
    assert windows[0, 1, 1:76].tolist() == ids[1:76]  # the second window starts 1 token later
    assert windows[0, 0, 0] == tokenizer.sot_token_id
    assert windows[0, 0, 76] == tokenizer.eot_token_id  # 75 caption tokens, then the end token
    with pytest.raises(ValueError, match="no stride"):
        window_tokens([text], tokenizer, overlap=75, max_windows=3)
