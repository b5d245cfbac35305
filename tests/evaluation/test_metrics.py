"""Recall@k on hand-made similarities, ties, several captions per image, chunking."""

import pytest
import torch
import torch.nn.functional as F

from tulip_pipelines.evaluation.metrics import retrieval_recall, retrieval_recall_full_sort


def test_hand_made_single_caption():
    images = torch.eye(3)
    texts = torch.tensor(
        [[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]]
    )  # text 1 is image 2's, text 2 image 1's
    out = retrieval_recall(images, texts, [0, 2, 1], ks=(1,))
    assert out["i2t"][1] == 100.0 and out["t2i"][1] == 100.0
    wrong = retrieval_recall(images, texts, [0, 1, 2], ks=(1, 2))
    assert wrong["t2i"][1] == pytest.approx(100 / 3)
    assert wrong["i2t"][1] == pytest.approx(100 / 3)


def test_several_captions_per_image_any_hit_counts():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # image 0 has texts 0 and 1; its best text is text 1; image 1 has text 2
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    out = retrieval_recall(images, texts, [0, 0, 1], ks=(1, 2))
    assert out["i2t"][1] == 100.0 * 1 / 2  # image 0 hits (text 1); image 1: text 0 ties ahead
    assert out["n_queries"] == {"i2t": 2, "t2i": 3}
    assert out["t2i"][1] == pytest.approx(100 * 2 / 3)


def test_ties_are_broken_by_lower_index():
    images = torch.ones(3, 2) / 2**0.5  # every image scores the same for every text
    texts = torch.ones(3, 2) / 2**0.5
    out = retrieval_recall(images, texts, [0, 1, 2], ks=(1, 2, 3))
    # text t's image t ranks at position t: hits at k=1 only for t=0
    assert out["t2i"] == {1: pytest.approx(100 / 3), 2: pytest.approx(200 / 3), 3: 100.0}
    assert retrieval_recall_full_sort(images, texts, [0, 1, 2], ks=(1, 2, 3))["t2i"] == out["t2i"]


def test_chunked_equals_full_sort_with_ties():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(40, 8), dim=-1)
    texts = F.normalize(torch.randn(120, 8), dim=-1)
    texts[7] = texts[3]  # exact duplicates make ties
    t2i = torch.randint(0, 40, (120,))
    t2i[:40] = torch.arange(40)
    full = retrieval_recall_full_sort(images, texts, t2i)
    for chunk in (1, 7, 1000):
        out = retrieval_recall(images, texts, t2i, chunk_size=chunk)
        assert out["i2t"] == pytest.approx(full["i2t"]) and out["t2i"] == pytest.approx(full["t2i"])


@pytest.mark.parametrize("seed", range(4))
def test_chunked_equals_full_sort_with_duplicate_images_and_texts(seed):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(30, 4, generator=g), dim=-1)
    images[5], images[17] = images[2], images[2]  # tied columns for text->image
    t2i = torch.randint(0, 27, (70,), generator=g)  # images 27-29 have no text: no i2t query
    texts = F.normalize(images[t2i] + 0.8 * torch.randn(70, 4, generator=g), dim=-1)
    texts[40], texts[9] = texts[3], texts[3]  # tied rows for image->text
    ks = (1, 3, 20, 100)  # 100: more than there are candidates
    full = retrieval_recall_full_sort(images, texts, t2i, ks)
    for chunk in (1, 4, 64):
        out = retrieval_recall(images, texts, t2i, ks, chunk_size=chunk)
        assert out["i2t"] == full["i2t"] and out["t2i"] == full["t2i"]
        assert out["n_queries"] == {"i2t": len(torch.unique(t2i)), "t2i": 70}


def test_mismatched_links_are_an_error():
    with pytest.raises(ValueError, match="2 text->image links for 3 texts"):
        retrieval_recall(torch.eye(3), torch.eye(3), [0, 1])
