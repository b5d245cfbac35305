"""Retrieval recall@k, computed in chunks so that no full similarity matrix is held.

Ranking rule (deterministic, ties included): a candidate ranks ahead of the correct one when its
score is higher, or equal with a lower index. The rank of a query is the number of candidates
ahead of its best-ranked correct candidate; a hit at k means rank < k. This equals sorting each
row of ``images @ texts.T`` (and of its transpose) with a stable descending sort and finding the
first correct candidate, which :func:`retrieval_recall_full_sort` does.

How: the similarity matrix is computed once, in chunks of image rows. Only ranks below
``max(ks)`` matter, so each chunk keeps the ``max(ks) + 1`` highest scores per image row and,
merged over chunks, per text column. A query's rank follows from those values and its correct score,
unless its correct score ties with another candidate near the top; those few queries are ranked
exactly from the full row or column (for text columns the chunks are recomputed, only then).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def _texts_per_image(t2i: torch.Tensor, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images that have texts, and their texts [n, max_texts] (padded with their last text)."""
    order = torch.sort(t2i, stable=True).indices  # texts grouped by image, in text order
    counts = torch.bincount(t2i, minlength=n_images)
    images = torch.nonzero(counts).squeeze(1)
    counts = counts[images]
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(int(counts.max()) if len(counts) else 1)
    slots = starts[:, None] + torch.minimum(offsets[None, :], counts[:, None] - 1)
    return images, order[slots]


def _rank_from_top(
    top: torch.Tensor, best: torch.Tensor, cap: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks (capped at ``cap``) from each query's ``cap + 1`` highest scores ``top`` [n, kk]
    (descending; all of them when there are fewer) and its best correct score; and the mask of
    queries whose correct score ties with another kept score (the tie rule needs the full row).

    A unique best that is not below the cap-th highest score is above every score not kept, so
    the kept scores count everything ranked ahead of it.
    """
    greater = (top > best[:, None]).sum(dim=1)
    tied = (top == best[:, None]).sum(dim=1) > 1
    if top.shape[1] > cap:
        below = best < top[:, cap - 1]
        return torch.where(below, cap, greater).clamp(max=cap), tied & ~below
    return greater.clamp(max=cap), tied


def _exact_rank(scores: torch.Tensor, best: torch.Tensor, best_index: torch.Tensor) -> torch.Tensor:
    """Rank by the full rule, on rows of ``scores`` [n, n_candidates]."""
    index = torch.arange(scores.shape[1])
    ahead = (scores > best[:, None]) | ((scores == best[:, None]) & (index < best_index[:, None]))
    return ahead.sum(dim=1)


@dataclass
class RetrievalRanks:
    """Per-query ranks (0 = the correct candidate first), capped at ``cap``: a hit at k <= cap
    is ``rank < k``.

    ``i2t[q]`` is the rank of image query ``q``, the image ``i2t_images[q]`` (the images that have
    texts, in index order); ``t2i[t]`` the rank of text ``t``.
    """

    i2t: torch.Tensor
    t2i: torch.Tensor
    i2t_images: torch.Tensor
    cap: int

    def hits(self, direction: str, k: int) -> np.ndarray:
        """Per-query hit indicators (bool) at ``k`` for ``direction`` (``i2t`` or ``t2i``)."""
        if k > self.cap:
            raise ValueError(f"ranks are capped at {self.cap}: recall@{k} is unknown")
        return (getattr(self, direction) < k).numpy()

    def recall(self, direction: str, k: int) -> float:
        """Recall@k in percent (NaN without queries)."""
        return 100.0 * float(self.hits(direction, k).mean()) if self.n(direction) else math.nan

    def n(self, direction: str) -> int:
        return len(getattr(self, direction))


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Sequence[int] | np.ndarray | torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, dict]:
    """Recall@k (percent) for image-to-text and text-to-image retrieval.

    ``image_features`` [n_images, d] and ``text_features`` [n_texts, d] are L2-normalised;
    ``text_to_image[t]`` is the image of text ``t`` (an image may have several texts: its i2t
    query hits when any of them is in the top k; each text is its own t2i query). Images without
    a text are no i2t query. Extra memory: about ``chunk_size x n_texts`` floats a few times.
    Returns ``{"i2t": {k: recall}, "t2i": {k: recall}, "n_queries": {"i2t": n, "t2i": n}}``.
    """
    ranks = retrieval_ranks(image_features, text_features, text_to_image, max(ks), chunk_size)
    return {
        "i2t": {k: ranks.recall("i2t", k) for k in ks},
        "t2i": {k: ranks.recall("t2i", k) for k in ks},
        "n_queries": {"i2t": ranks.n("i2t"), "t2i": ranks.n("t2i")},
    }


def retrieval_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Sequence[int] | np.ndarray | torch.Tensor,
    cap: int = 10,
    chunk_size: int = 1024,
) -> RetrievalRanks:
    """Every query's rank, capped at ``cap`` (what recall@k for k <= cap needs), in both
    directions; arguments as :func:`retrieval_recall`."""
    t2i = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long)
    images, texts = image_features.float(), text_features.float()
    n_images, n_texts = len(images), len(texts)
    if len(t2i) != n_texts:
        raise ValueError(f"{len(t2i)} text->image links for {n_texts} texts")
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    query_images, texts_of = _texts_per_image(t2i, n_images)
    is_query = torch.full((n_images,), -1, dtype=torch.long)
    is_query[query_images] = torch.arange(len(query_images))

    i2t_ranks = torch.empty(len(query_images), dtype=torch.long)
    t2i_best = torch.empty(n_texts)
    column_top = texts.new_empty((0, n_texts))
    for start in range(0, n_images, chunk_size):
        sims = images[start : start + chunk_size] @ texts.T  # [chunk, n_texts]
        # texts -> images: keep each column's highest scores, and its correct score
        column_top = torch.cat([column_top, sims.topk(min(cap + 1, len(sims)), dim=0).values])
        column_top = column_top.topk(min(cap + 1, len(column_top)), dim=0).values
        mine = torch.nonzero((t2i >= start) & (t2i < start + len(sims))).squeeze(1)
        t2i_best[mine] = sims[t2i[mine] - start, mine]
        # images -> texts, for this chunk's images that have texts
        rows = torch.nonzero(is_query[start : start + len(sims)] >= 0).squeeze(1)
        if len(rows):
            sims, right = sims[rows], texts_of[is_query[start + rows]]
            right_scores = sims.gather(1, right)
            best = right_scores.max(dim=1).values
            ranks, tied = _rank_from_top(sims.topk(min(cap + 1, n_texts), dim=1).values, best, cap)
            if tied.any():
                best_index = (
                    right.masked_fill(right_scores != best[:, None], n_texts).min(dim=1).values
                )
                ranks[tied] = _exact_rank(sims[tied], best[tied], best_index[tied]).clamp(max=cap)
            i2t_ranks[is_query[start + rows]] = ranks

    t2i_ranks, tied = _rank_from_top(column_top.T, t2i_best, cap)
    if tied.any():  # recompute the same chunks for the few tied columns only
        cols = torch.nonzero(tied).squeeze(1)
        exact = sum(
            _exact_rank(
                (images[s : s + chunk_size] @ texts.T)[:, cols].T, t2i_best[cols], t2i[cols] - s
            )
            for s in range(0, n_images, chunk_size)
        )
        t2i_ranks[cols] = exact.clamp(max=cap)
    return RetrievalRanks(i2t=i2t_ranks, t2i=t2i_ranks, i2t_images=query_images, cap=cap)


def retrieval_recall_full_sort(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Sequence[int] | np.ndarray | torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[int, float]]:
    """The straightforward way: the full matrix ``images @ texts.T``, each row (and each row of
    its transpose) stably argsorted in descending order; the first correct candidate's position
    is the rank. The reference for tests and the bench."""
    t2i = np.asarray(text_to_image)
    sims = (image_features.float() @ text_features.float().T).numpy()
    order_i2t = np.argsort(-sims, axis=1, kind="stable")
    order_t2i = np.argsort(-sims.T, axis=1, kind="stable")
    i2t_ranks = np.array([np.flatnonzero(t2i[order_i2t[i]] == i)[0] for i in np.unique(t2i)])
    t2i_ranks = np.argmax(order_t2i == t2i[:, None], axis=1)
    return {
        "i2t": {k: 100.0 * float((i2t_ranks < k).mean()) for k in ks},
        "t2i": {k: 100.0 * float((t2i_ranks < k).mean()) for k in ks},
    }


def bootstrap_interval(
    hits: Sequence[bool] | np.ndarray, resamples: int = 1000, seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval (percent) of a recall, over its queries.

    A bootstrap resample draws ``n`` queries with replacement; its recall is the share of hits
    among them. With 0/1 hit indicators, the number of hits in such a resample follows
    Binomial(n, hits / n) exactly, so the resamples are drawn from that distribution directly:
    the same bootstrap distribution in O(resamples) instead of O(resamples x n). A fresh
    generator seeded with ``seed`` per call: an interval does not depend on what was scored
    before it. Returns ``(nan, nan)`` without queries.
    """
    hits = np.asarray(hits, dtype=bool)
    if hits.size == 0:
        return math.nan, math.nan
    counts = np.random.default_rng(seed).binomial(hits.size, hits.mean(), size=resamples)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(100.0 * counts / hits.size, [tail, 1.0 - tail])
    return float(low), float(high)
