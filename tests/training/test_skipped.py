"""The too-many-bad-samples threshold at its exact edges (training/skipped.py): more than
``max_bad_fraction`` of the samples seen stops a run, the first ``1 / max_bad_fraction`` samples
counting as that many; exactly the allowed number does not."""

import pytest
import torch

from tulip_pipelines.training.datasets import SkippedSamples, TooManyBadSamples


def _batch(n: int, bad: int) -> dict:
    return {"image": torch.zeros(n, 1),
            "skipped": [{"record_id": f"r{i}", "path": f"p{i}", "error": "bad"}
                        for i in range(bad)]}


def _take(fraction: float, seen: int, bad: int) -> SkippedSamples:
    samples = SkippedSamples("run", fraction)
    samples.take(_batch(seen, bad), "train", 0)
    return samples


@pytest.mark.parametrize("fraction, seen, allowed", [
    # 0.1% (the default): the first 1,000 samples count as 1,000, so one bad one is tolerated
    (0.001, 1, 1), (0.001, 999, 1), (0.001, 1000, 1), (0.001, 2000, 2), (0.001, 2999, 2),
    # 1%: the floor is 100 samples
    (0.01, 10, 1), (0.01, 100, 1), (0.01, 250, 2),
    # 30%: ceil(1 / 0.3) = 4 samples at least
    (0.3, 1, 1), (0.3, 10, 3),
])
def test_the_allowed_count_passes_and_one_more_stops_the_run(fraction, seen, allowed):
    assert len(_take(fraction, seen, allowed).records) == allowed
    with pytest.raises(TooManyBadSamples, match=f"{allowed + 1} of the {seen} samples"):
        _take(fraction, seen, allowed + 1)


def test_a_zero_fraction_tolerates_no_bad_sample_and_one_tolerates_all():
    with pytest.raises(TooManyBadSamples):
        _take(0.0, 1000, 1)
    assert len(_take(1.0, 5, 5).records) == 5
    with pytest.raises(TooManyBadSamples):
        _take(1.0, 5, 6)


def test_samples_seen_accumulate_over_batches():
    samples = SkippedSamples("run", 0.01)
    for _ in range(3):
        samples.take(_batch(100, 1), "train", 0)  # 3 of 300: exactly 1%
    assert samples.seen == 300
    samples.take(_batch(100, 1), "train", 1)  # 4 of 400 is 1% too ...
    with pytest.raises(TooManyBadSamples, match="5 of the 400"):
        samples.take(_batch(0, 1), "train", 1)  # ... 5 of 400 is not
