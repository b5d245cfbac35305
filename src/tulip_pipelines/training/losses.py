"""Losses of the training stages (pure functions of embeddings)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTILL_LOSSES = ("cosine", "mse", "l2")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor,
                 loss_type: str = "cosine") -> torch.Tensor:
    """Loss between student and teacher text embeddings [batch, dim].

    ``cosine``: 1 - mean cosine similarity; ``mse``: mean squared error over all entries;
    ``l2``: mean over the batch of the L2 norm of the difference.
    """
    if loss_type == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1).mean()
    if loss_type == "mse":
        return F.mse_loss(student, teacher)
    if loss_type == "l2":
        return (student - teacher).norm(dim=-1).mean()
    raise ValueError(f"unknown distillation loss_type {loss_type!r}; one of {DISTILL_LOSSES}")


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """CLIP's symmetric contrastive loss on L2-normalised features of matching pairs: the mean of
    the image-to-text and text-to-image cross-entropies (optionally label-smoothed, as Long-CLIP
    trains), each averaged over the batch."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2


def primary_components(features: torch.Tensor, k: int) -> torch.Tensor:
    """Long-CLIP's *primary component matching* of image features [batch, dim]: centred over the
    batch, projected on their first ``k`` principal directions (exact SVD, float32) and back into
    the feature space, the mean added back; not renormalised. With ``k`` at least the batch's rank
    the features come back unchanged (and the SVD, whose gradient is undefined for repeated
    singular values, is skipped)."""
    if k >= min(features.shape):
        return features
    mean = features.mean(dim=0, keepdim=True)
    centred = (features - mean).float()
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    basis = vh[:k].T
    return ((centred @ basis) @ basis.T).to(features.dtype) + mean
