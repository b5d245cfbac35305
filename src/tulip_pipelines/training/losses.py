"""Losses of the three training stages (pure functions of embeddings)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTILL_LOSSES = ("cosine", "mse", "l2")


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, loss_type: str = "cosine"
) -> torch.Tensor:
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


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric contrastive loss on L2-normalised features of matching pairs."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
