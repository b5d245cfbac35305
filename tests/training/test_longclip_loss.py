"""Long-CLIP's loss pieces against references written out in the test: primary component
matching (PCA through numpy's SVD) and the authors' loss (label smoothing, 1:1 long and short,
short captions against the image features' primary components)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.training.toy_tasks import PairData, contrastive_task
from tulip_pipelines.training.losses import primary_components


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


def test_authors_loss_by_hand():
    torch.manual_seed(0)
    task = contrastive_task(label_smoothing=0.1, short_image_components=2, max_logit_scale=None)
    task.long_weight = task.short_weight = 1.0
    with torch.no_grad():
        task.model.logit_scale.fill_(4.6052)
    task.eval()
    batch = PairData(6)[:]  # a dict of stacked tensors
    out = task(batch)
    with torch.no_grad():
        image = task.model.encode_image(batch["image"], normalize=True)
        long = task.model.encode_text(batch["long"], normalize=True)
        short = task.model.encode_text(batch["short"], normalize=True)
        centred = image - image.mean(0)
        basis = torch.linalg.svd(centred, full_matrices=False)[2][:2].T
        image_short = centred @ basis @ basis.T + image.mean(0)
        scale = torch.tensor(4.6052).exp()
        labels = torch.arange(6)

        def loss(a, b):
            logits = scale * a @ b.T
            return (F.cross_entropy(logits, labels, label_smoothing=0.1)
                    + F.cross_entropy(logits.T, labels, label_smoothing=0.1)) / 2

        expected_long, expected_short = loss(image, long), loss(image_short, short)
    assert out["loss_long"].item() == pytest.approx(expected_long.item(), abs=1e-5)
    assert out["loss_short"].item() == pytest.approx(expected_short.item(), abs=1e-5)
    assert out["loss"].item() == pytest.approx((expected_long + expected_short).item(), abs=1e-5)
    # the short loss really uses the primary components: with the plain features it differs
    assert abs(loss(image, short).item() - expected_short.item()) > 1e-4
