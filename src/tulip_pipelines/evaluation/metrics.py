"""Retrieval recall@k, computed in chunks so that no full similarity matrix is held.

Ranking rule (deterministic, ties included): a candidate ranks ahead of the correct one when its
score is higher, or equal with a lower index. The rank of a query is the number of candidates
ahead of its best-ranked correct candidate; a hit at k means rank < k. This equals sorting each
row with a stable descending sort and finding the first correct candidate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _ranks(queries: torch.Tensor, candidates: torch.Tensor, correct: list[torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Rank of each query's best correct candidate (see module docstring), in query chunks."""
    ranks = torch.empty(len(queries), dtype=torch.long)
    index = torch.arange(len(candidates))
    for start in range(0, len(queries), chunk_size):
        sims = queries[start : start + chunk_size] @ candidates.T  # [chunk, n_candidates]
        rows = torch.cat([torch.full((len(c),), r) for r, c in enumerate(correct[start : start + chunk_size])])
        cols = torch.cat(correct[start : start + chunk_size])
        is_correct = torch.zeros_like(sims, dtype=torch.bool)
        is_correct[rows, cols] = True
        masked = sims.masked_fill(~is_correct, float("-inf"))
        best_score = masked.max(dim=1, keepdim=True).values
        best_index = (masked == best_score).int().argmax(dim=1, keepdim=True)  # first (lowest) index
        ahead = (sims > best_score) | ((sims == best_score) & (index < best_index))
        ranks[start : start + len(sims)] = ahead.sum(dim=1)
    return ranks


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Sequence[int] | np.ndarray | torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, dict[int, float]]:
    """Recall@k (percent) for image-to-text and text-to-image retrieval.

    ``image_features`` [n_images, d] and ``text_features`` [n_texts, d] are L2-normalised;
    ``text_to_image[t]`` is the image of text ``t`` (an image may have several texts: its i2t
    query hits when any of them is in the top k; each text is its own t2i query).
    """
    t2i = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long)
    if len(t2i) != len(text_features):
        raise ValueError(f"{len(t2i)} text->image links for {len(text_features)} texts")
    n_images = len(image_features)
    texts_of = [[] for _ in range(n_images)]
    for t, i in enumerate(t2i.tolist()):
        texts_of[i].append(t)
    queries_i = [i for i in range(n_images) if texts_of[i]]
    i2t_ranks = _ranks(image_features[queries_i].float(), text_features.float(),
                       [torch.tensor(texts_of[i]) for i in queries_i], chunk_size)
    t2i_ranks = _ranks(text_features.float(), image_features.float(), [t2i[t : t + 1] for t in range(len(t2i))], chunk_size)
    return {
        "i2t": {k: 100.0 * float((i2t_ranks < k).double().mean()) for k in ks},
        "t2i": {k: 100.0 * float((t2i_ranks < k).double().mean()) for k in ks},
        "n_queries": {"i2t": len(queries_i), "t2i": len(t2i)},
    }


def retrieval_recall_full_sort(image_features, text_features, text_to_image, ks=(1, 5, 10)) -> dict:
    """The straightforward way (full matrix, stable argsort): the reference for tests and bench."""
    t2i = np.asarray(text_to_image)
    sims = (image_features.float() @ text_features.float().T).numpy()
    out = {"i2t": {}, "t2i": {}}
    order_i2t = np.argsort(-sims, axis=1, kind="stable")
    order_t2i = np.argsort(-sims.T, axis=1, kind="stable")
    has_text = [i for i in range(len(sims)) if (t2i == i).any()]
    i2t_ranks = np.array([np.flatnonzero(t2i[order_i2t[i]] == i)[0] for i in has_text])
    t2i_ranks = np.array([np.flatnonzero(order_t2i[t] == t2i[t])[0] for t in range(len(t2i))])
    for k in ks:
        out["i2t"][k] = 100.0 * float((i2t_ranks < k).mean())
        out["t2i"][k] = 100.0 * float((t2i_ranks < k).mean())
    return out
