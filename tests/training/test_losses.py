"""The losses against hand-computed values and references written out in the test."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tulip_pipelines.training.tasks import clip_loss, distill_loss, primary_components


def test_distill_losses_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # cosines: 1/sqrt(2) and 1 -> 1 - mean
    assert distill_loss(s, t, "cosine").item() == pytest.approx(1 - (1 / math.sqrt(2) + 1) / 2)
    # squared differences: 0, 1, 0, 1 -> mean 0.5
    assert distill_loss(s, t, "mse").item() == pytest.approx(0.5)
    # norms of differences: 1 and 1 -> 1
    assert distill_loss(s, t, "l2").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown distillation loss_type 'kl'"):
        distill_loss(s, t, "kl")


def test_clip_loss_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    # logits = 10 * image @ text.T = [[6, 0], [8, 10]]; mean of the row and column cross-entropies
    rows = (math.log(math.exp(6) + 1) - 6) + (math.log(math.exp(8) + math.exp(10)) - 10)
    cols = (math.log(math.exp(6) + math.exp(8)) - 6) + (math.log(1 + math.exp(10)) - 10)
    expected = (rows / 2 + cols / 2) / 2
    assert clip_loss(image, text, torch.tensor(10.0, dtype=torch.float64)).item() == pytest.approx(
        expected
    )


def test_primary_components_match_a_numpy_pca():
    gen = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(12, 10, generator=gen, dtype=torch.float64), dim=-1)
    x = features.numpy()
    mean = x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:3].T
    expected = (x - mean) @ basis @ basis.T + mean
    # the SVD runs in float32, as Long-CLIP computes it
    np.testing.assert_allclose(primary_components(features, 3).numpy(), expected, atol=2e-5)
    # all components (k >= rank): the features come back unchanged, no SVD
    assert torch.equal(primary_components(features, 10), features)
