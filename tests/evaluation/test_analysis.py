"""Recall against tokens read (the cuts, with open_clip's real tokenizer), recall by caption
length (the binning), the bootstrap interval of a recall, and text encoding up to the end token."""

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch

from tulip_pipelines.evaluation.analysis import (
    CAPTION_LENGTH_COLUMNS,
    TOKENS_READ_COLUMNS,
    bin_of,
    caption_token_counts,
    cut_tokens,
    frame,
    length_bins,
    recall_by_caption_length,
    recall_by_tokens_read,
    token_lengths,
)
from tulip_pipelines.evaluation.encode import encode_tokens, tokenize
from tulip_pipelines.evaluation.metrics import RetrievalRanks, bootstrap_interval
from tulip_pipelines.models import build_student, create_teacher

SENTENCE = "A red square sits above a small blue circle near the left edge. "
CAPTIONS = [SENTENCE * n for n in (1, 3, 6, 12, 20)]  # about 15 to 300 tokens


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32", context_length=248)


@pytest.mark.parametrize("n", [20, 40, 77, 120, 248])
def test_a_cut_is_open_clip_tokenization_at_that_context(tokenizer, n):
    tokens = tokenizer(CAPTIONS)
    cut = cut_tokens(tokens, n)
    full = caption_token_counts(CAPTIONS)
    # each caption reads min(its length, n) tokens (start and end token included), end token last
    assert token_lengths(cut).tolist() == np.minimum(np.minimum(full, 248), n).tolist()
    assert (cut[torch.arange(len(cut)), token_lengths(cut) - 1] == tokenizer.eot_token_id).all()
    # exactly what open_clip's tokenizer keeps at context length n: the first n - 1, then EOT
    reference = open_clip.get_tokenizer("ViT-B-32", context_length=n)(CAPTIONS)
    assert torch.equal(cut[:, :n], reference) and not cut[:, n:].any()


def test_a_model_whose_context_is_shorter_reads_what_its_tokenizer_keeps():
    teacher_tokens = open_clip.get_tokenizer("ViT-B-32", context_length=77)(CAPTIONS)
    for n in (120, 248):
        assert cut_tokens(teacher_tokens, n) is teacher_tokens
    assert token_lengths(cut_tokens(teacher_tokens, 40)).max() == 40
    with pytest.raises(ValueError, match="n must be >= 2"):
        cut_tokens(teacher_tokens, 1)


def test_token_counts_are_untruncated_and_count_start_and_end(tokenizer):
    counts = caption_token_counts(CAPTIONS)
    assert counts[-1] > 248  # not cut at any context
    wide = open_clip.get_tokenizer("ViT-B-32", context_length=1000)(CAPTIONS)
    assert counts.tolist() == token_lengths(wide).tolist()
    assert caption_token_counts(["a cat"]).tolist() == [4]  # start, a, cat, end


def test_the_end_token_is_found_although_token_0_is_a_word(tokenizer):
    text = "a sign reading sale!(50% off), look!(here) and price!$5"
    tokens = tokenizer([text, "a dog"])
    length = 2 + len(tokenizer.encode(text))
    assert (tokens[0, 1 : length - 1] == 0).sum() == 3  # '!' before '(' or '$' is token 0
    assert token_lengths(tokens).tolist() == [length, 4]


def test_encoding_keeps_the_longest_captions_end_token():
    torch.manual_seed(0)
    bundle = build_student(create_teacher("TULIP-Tiny"), 248)
    texts = ["a red sign reading sale!(50% off) look!(here) price!$5 above", "a cat"]
    tokens = tokenize(bundle, texts, batch_size=1)
    assert tokens.dtype == torch.int32 and tokens.shape == (2, 248)
    together = encode_tokens(bundle, tokens, batch_size=2)
    with torch.no_grad():  # the whole padded context: the reference
        padded = bundle.model.eval().encode_text(bundle.tokenizer(texts), normalize=True)
    assert torch.allclose(together, padded, atol=1e-5)
    assert torch.allclose(encode_tokens(bundle, tokens, 1), together, atol=1e-6)


def _ranks(i2t, t2i, images=None, cap=1):
    i2t = torch.as_tensor(i2t)
    images = torch.arange(len(i2t)) if images is None else torch.as_tensor(images)
    return RetrievalRanks(i2t=i2t, t2i=torch.as_tensor(t2i), i2t_images=images, cap=cap)


def test_recall_by_tokens_read_reencodes_only_the_cuts_that_change_a_caption(tokenizer):
    tokens = tokenizer(CAPTIONS[:3])  # about 15, 45 and 90 tokens
    full = _ranks([0, 0, 0], [0, 0, 0])
    seen = []

    def rank_texts(cut):
        seen.append(int(token_lengths(cut).max()))
        return _ranks([1, 0, 0], [1, 1, 0])

    rows = recall_by_tokens_read("b", "m", tokens, full, rank_texts, [20, 40, 77, 120, 248])
    table = frame(rows, TOKENS_READ_COLUMNS)
    assert list(table.columns) == TOKENS_READ_COLUMNS and len(table) == 5 * 2
    assert seen == [20, 40, 77]  # 120 and 248 change nothing: the full ranks are reused
    t2i = table[table["direction"] == "t2i"].set_index("tokens")["recall"]
    assert t2i.to_dict() == {20: pytest.approx(100 / 3), 40: pytest.approx(100 / 3),
                             77: pytest.approx(100 / 3), 120: 100.0, 248: 100.0}
    assert set(table["n_queries"]) == {3}


def test_quartile_bins_match_pandas_qcut():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 300, size=997)
    edges = length_bins(lengths, 4)
    assert len(edges) == 5
    expected = pd.qcut(lengths, 4, labels=False)
    assert (bin_of(lengths, edges) == expected).all()
    assert np.bincount(bin_of(lengths, edges)).min() > 240  # about a quarter each
    assert length_bins(np.full(10, 7), 4).tolist() == [7.0]  # one length: one bin
    assert (bin_of(np.full(10, 7), length_bins(np.full(10, 7), 4)) == 0).all()


def test_recall_by_caption_length_bins_text_queries_and_images_by_their_longest_caption():
    # 4 images, 2 captions each (text t belongs to image t // 2)
    lengths = np.array([10, 12, 20, 22, 30, 32, 40, 90])
    t2i_hits = [1, 1, 0, 0, 1, 0, 0, 0]
    ranks = _ranks([0, 1, 0, 1], [0 if h else 1 for h in t2i_hits])
    rows = recall_by_caption_length("b", "m", ranks, lengths, np.arange(8) // 2, n_bins=4)
    table = frame(rows, CAPTION_LENGTH_COLUMNS)
    assert list(table.columns) == CAPTION_LENGTH_COLUMNS
    t2i = table[table["direction"] == "t2i"].set_index("bin")
    assert t2i["n_queries"].tolist() == [2, 2, 2, 2]
    assert t2i["recall"].tolist() == [100.0, 0.0, 50.0, 0.0]
    assert t2i[["min_tokens", "max_tokens"]].values.tolist() == [[10, 12], [20, 22], [30, 32],
                                                                 [40, 90]]
    i2t = table[table["direction"] == "i2t"].set_index("bin")
    # images' longest captions 12, 22, 32, 90: one per bin
    assert i2t["max_tokens"].tolist() == [12, 22, 32, 90]
    assert i2t["recall"].tolist() == [100.0, 0.0, 100.0, 0.0]
    assert table.groupby("direction")["n_queries"].sum().to_dict() == {"i2t": 4, "t2i": 8}


def _numpy_bootstrap(hits, resamples, seed, confidence=0.95):
    """The textbook way: resample the queries with replacement, take each resample's recall."""
    hits = np.asarray(hits, dtype=float)
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, len(hits), size=(resamples, len(hits)))].mean(axis=1)
    tail = (1 - confidence) / 2
    return tuple(np.quantile(100 * means, [tail, 1 - tail]))


@pytest.mark.parametrize("n, rate", [(50, 0.3), (200, 0.5), (1000, 0.9)])
def test_bootstrap_matches_resampling_the_queries(n, rate):
    hits = np.random.default_rng(1).random(n) < rate
    ours = bootstrap_interval(hits, resamples=20000, seed=0)
    reference = _numpy_bootstrap(hits, resamples=20000, seed=3)
    # two Monte-Carlo estimates of the same quantiles: equal up to the grid (100 / n) and noise
    assert ours == pytest.approx(reference, abs=100 / n + 0.3)
    wrong = _planted_fewer_queries(hits, 20000)
    assert wrong != pytest.approx(reference, abs=100 / n + 0.3)


def _planted_fewer_queries(hits, resamples):
    """A plausible slip: resamples of a quarter of the queries (e.g. one caption in four)."""
    n = len(hits) // 4
    counts = np.random.default_rng(0).binomial(n, hits.mean(), size=resamples)
    return tuple(np.quantile(100 * counts / n, [0.025, 0.975]))


def test_bootstrap_interval_properties():
    assert bootstrap_interval(np.ones(100, bool)) == (100.0, 100.0)
    assert bootstrap_interval(np.zeros(100, bool)) == (0.0, 0.0)
    assert all(np.isnan(bootstrap_interval(np.zeros(0, bool))))
    hits = np.arange(400) % 4 == 0  # 25%
    low, high = bootstrap_interval(hits, 2000, seed=0)
    assert low < 25.0 < high
    assert bootstrap_interval(hits, 2000, seed=0) == (low, high)  # the seed fixes it
    # 16 times the queries at the same rate: a quarter of the width (~1/sqrt(n))
    low16, high16 = bootstrap_interval(np.tile(hits, 16), 2000, seed=0)
    assert (high16 - low16) == pytest.approx((high - low) / 4, rel=0.15)
    # close to the normal approximation 1.96 * sqrt(p (1 - p) / n)
    assert (high - low) / 2 == pytest.approx(100 * 1.96 * (0.25 * 0.75 / 400) ** 0.5, rel=0.1)
