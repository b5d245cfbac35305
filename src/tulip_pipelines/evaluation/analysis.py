"""Why a model scores what it scores (no Kedro): recall against the number of caption tokens it
reads, and recall by caption length.

*Tokens read.* A caption cut at ``n`` tokens is what open_clip's tokenizer gives at context length
``n``: the start token and the first ``n - 2`` text tokens, then the end token. The cut is made on
the tokens of the model's own tokenizer, so a model whose context is shorter than ``n`` reads what
its tokenizer keeps (the teacher reads 77 tokens at every cut past 77). Only the texts are encoded
again; image features and the rest of the ranking are the full-caption evaluation's.

*Caption length.* Each caption's length is its full token count (start and end tokens included,
not truncated), with open_clip's tokenizer. Queries are binned at the quantiles of the captions'
lengths (quartiles by default); an image query is binned by its longest caption.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import pandas as pd
import torch

from tulip_pipelines.evaluation.metrics import RetrievalRanks

logger = logging.getLogger(__name__)

TOKENS_READ_COLUMNS = ["benchmark", "model", "direction", "tokens", "recall", "n_queries"]
CAPTION_LENGTH_COLUMNS = ["benchmark", "model", "direction", "bin", "min_tokens", "max_tokens",
                          "recall", "n_queries"]
DIRECTIONS = ("i2t", "t2i")


def token_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens per row up to and including the end token [n] (open_clip: the end token has the
    highest id of the vocabulary, which is also how its text towers find it)."""
    return tokens.argmax(dim=1) + 1


def cut_tokens(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """``tokens`` [N, context] (a tokenizer's output) cut at ``n`` tokens, end token kept: rows
    longer than ``n`` keep their first ``n - 1`` tokens (start token included), then the end
    token, then padding; shorter rows are unchanged."""
    if n < 2:
        raise ValueError(f"a cut keeps the start and the end token: n must be >= 2, got {n}")
    lengths = token_lengths(tokens)
    longer = lengths > n
    if n >= tokens.shape[1] or not longer.any():
        return tokens
    out = tokens.clone()
    rows = torch.nonzero(longer).squeeze(1)
    eot = tokens[rows].max(dim=1).values
    out[rows, n - 1] = eot
    out[rows, n:] = 0
    return out


def caption_token_counts(texts: Sequence[str], tokenizer=None) -> np.ndarray:
    """Each caption's full token count, start and end tokens included (not truncated), with
    ``tokenizer.encode`` (open_clip's ``SimpleTokenizer`` by default)."""
    tokenizer = tokenizer or _default_tokenizer()
    return np.array([len(tokenizer.encode(text)) + 2 for text in texts], dtype=np.int64)


@lru_cache(maxsize=1)
def _default_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def recall_by_tokens_read(
    benchmark: str,
    model: str,
    tokens: torch.Tensor,
    full: RetrievalRanks,
    rank_texts: Callable[[torch.Tensor], RetrievalRanks],
    cuts: Sequence[int],
) -> list[tuple]:
    """Rows of ``recall_by_tokens_read`` (R@1 in percent) for one model on one benchmark.

    ``tokens``: the model's tokens of the benchmark's texts; ``full``: the ranks of the uncut
    captions; ``rank_texts(tokens)``: the ranks when the texts are these tokens (it encodes them
    and ranks them against the image features already computed). A cut that changes no caption
    reuses ``full``.
    """
    rows = []
    for n in cuts:
        cut = cut_tokens(tokens, n)
        ranks = full if cut is tokens or torch.equal(cut, tokens) else rank_texts(cut)
        rows += [(benchmark, model, d, int(n), ranks.recall(d, 1), ranks.n(d)) for d in DIRECTIONS]
    return rows


def length_bins(lengths: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile edges of ``lengths`` (``n_bins`` bins, fewer where quantiles coincide)."""
    return np.unique(np.quantile(lengths, np.linspace(0.0, 1.0, n_bins + 1)))


def bin_of(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """0-based bin of each value: bins are ``[e0, e1], (e1, e2], ...`` (as ``pandas.qcut``)."""
    return np.searchsorted(edges[1:-1], values, side="left")


def recall_by_caption_length(
    benchmark: str,
    model: str,
    ranks: RetrievalRanks,
    lengths: np.ndarray,
    text_to_image: Sequence[int] | np.ndarray,
    n_bins: int,
) -> list[tuple]:
    """Rows of ``recall_by_caption_length`` (R@1 in percent per length bin, 1-based ``bin``) for
    one model on one benchmark; ``lengths[t]`` is text ``t``'s token count."""
    lengths = np.asarray(lengths)
    edges = length_bins(lengths, n_bins)
    longest = pd.Series(lengths).groupby(np.asarray(text_to_image)).max()
    query_lengths = {
        "t2i": lengths,
        "i2t": longest.reindex(ranks.i2t_images.numpy()).to_numpy(),
    }
    rows = []
    for d in DIRECTIONS:
        hits, length = ranks.hits(d, 1), query_lengths[d]
        bins = bin_of(length, edges)
        for b in range(max(len(edges) - 1, 1)):
            inside = bins == b
            if inside.any():
                rows.append((benchmark, model, d, b + 1, int(length[inside].min()),
                             int(length[inside].max()), 100.0 * float(hits[inside].mean()),
                             int(inside.sum())))
    return rows


def frame(rows: list[tuple], columns: list[str]) -> pd.DataFrame:
    """A results table with integer counts and float recalls, empty or not."""
    out = pd.DataFrame(rows, columns=columns)
    types = {c: "int64" for c in ("tokens", "bin", "min_tokens", "max_tokens", "n_queries")
             if c in columns}
    return out.astype({**types, "recall": "float64"})
