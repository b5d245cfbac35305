"""``score`` with several models through one call (evaluation/evaluate.py): each model's rows are
its own (its image tower, its text tower, its tokenizer), checked against recall computed here
by hand from each model alone; and both ends of every EvaluateParams bound."""

import copy
import dataclasses

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from tests.bounds import assert_bounds
from tulip_pipelines.evaluation.benchmark import RetrievalBenchmark
from tulip_pipelines.evaluation.evaluate import EvaluateParams, score
from tulip_pipelines.models import build_student, create_teacher

CAPTIONS = ["red", "green", "blue", "yellow", "white", "black"]


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    gen = np.random.default_rng(0)
    paths = []
    for i in range(6):
        pixels = gen.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    texts = [f"a {c} picture number {i} with {'many ' * (3 * j)}words."
             for i, c in enumerate(CAPTIONS) for j in range(2)]
    return RetrievalBenchmark("tiny", "long", paths, texts, np.repeat(np.arange(6), 2))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    a = create_teacher("TULIP-Tiny")
    torch.manual_seed(1)
    b = create_teacher("TULIP-Tiny")
    # a's text tower with b's image tower (the evaluation shares image features by tower)
    mixed = copy.deepcopy(a.model)
    mixed.visual.load_state_dict(b.model.visual.state_dict())
    return {"a": a, "b": b, "a_text_b_image": dataclasses.replace(a, model=mixed),
            "b_student": build_student(b, 248)}


def hand_recall(bundle, bench, ks, n_tokens=None) -> dict[tuple[str, int], float]:
    """R@k in percent, from the model alone: features, similarities, ranks."""
    with torch.no_grad():
        pixels = torch.stack([bundle.preprocess(Image.open(p).convert("RGB"))
                              for p in bench.image_paths])
        images = bundle.model.encode_image(pixels, normalize=True)
        context = bundle.spec.context_length if n_tokens is None else n_tokens
        tokens = open_clip.get_tokenizer("TULIP-Tiny", context_length=context)(bench.texts)
        tokens = tokens[:, :int((tokens != 0).sum(1).max())]  # padding changes nothing
        texts = bundle.model.encode_text(tokens, normalize=True)
    sims = texts @ images.T  # [texts, images]
    links = torch.as_tensor(bench.text_to_image)
    right = sims[torch.arange(len(links)), links]
    t2i_rank = (sims > right[:, None]).sum(1)
    i2t_rank = []
    for image in range(len(bench.image_paths)):
        best = sims[links == image, image].max()
        i2t_rank.append(int((sims[:, image] > best).sum()))
    i2t_rank = torch.tensor(i2t_rank)
    return {(d, k): 100.0 * float((ranks < k).float().mean())
            for d, ranks in (("t2i", t2i_rank), ("i2t", i2t_rank)) for k in ks}


def test_each_models_rows_are_its_own(models, benchmark):
    params = EvaluateParams(ks=(1, 3), batch_size=12, bootstrap_resamples=20, device="cpu",
                            tokens_read=(6, 77), caption_length_bins=2)
    scores = score(models, {"tiny": benchmark}, params)
    metrics = scores.metrics
    assert list(dict.fromkeys(metrics["model"])) == list(models)
    expected = {name: hand_recall(bundle, benchmark, params.ks)
                for name, bundle in models.items()}
    # the models differ, so a row of one model in another's place shows
    assert len({tuple(sorted(e.items())) for e in expected.values()}) == len(models)
    for name in models:
        rows = metrics[metrics["model"] == name]
        got = {(r.direction, r.k): r.recall for r in rows.itertuples()}
        assert got == pytest.approx(expected[name]), name
        assert {(r.direction, r.n_queries) for r in rows.itertuples()} == {("t2i", 12), ("i2t", 6)}
    # R@1 against the tokens read: at 77 (no caption longer) the full R@1, at 6 tokens each
    # model's own cut captions
    by_tokens = scores.by_tokens_read
    for name, bundle in models.items():
        cut6 = hand_recall(bundle, benchmark, (1,), n_tokens=6)
        for tokens, want in ((77, expected[name]), (6, cut6)):
            rows = by_tokens[(by_tokens["model"] == name) & (by_tokens["tokens"] == tokens)]
            got = {(r.direction, 1): r.recall for r in rows.itertuples()}
            assert got == pytest.approx({k: v for k, v in want.items() if k[1] == 1}), \
                (name, tokens)
    # by caption length: each model's hits add up to its own R@1
    by_length = scores.by_caption_length
    for name in models:
        rows = by_length[by_length["model"] == name]
        for d in ("t2i", "i2t"):
            part = rows[rows["direction"] == d]
            total = (part["recall"] * part["n_queries"]).sum() / part["n_queries"].sum()
            assert total == pytest.approx(expected[name][(d, 1)]), (name, d)


# field -> (values at the bound, accepted; one step past it, rejected)
BOUNDS = {"ks": ([(1,)], [(0,), (1, 0)]), "batch_size": ([1], [0]), "chunk_size": ([1], [0]),
          "num_workers": ([0], [-1]), "bootstrap_resamples": ([1], [0]),
          "bootstrap_seed": ([0], [-1]), "tokens_read": ([(2,), (2, 248)], [(1,), (77, 1)]),
          "caption_length_bins": ([1], [0]), "parallel_models": ([1, None], [0])}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_each_bound_accepts_its_edge_and_rejects_one_step_past(name):
    accepted, rejected = BOUNDS[name]
    assert_bounds(EvaluateParams, name, accepted, rejected)


def test_the_defaults_are_the_papers():
    params = EvaluateParams()
    assert params.ks == (1, 5, 10)
    assert params.tokens_read == (20, 40, 77, 120, 160, 200, 248)  # 77: CLIP; 248: TULIP
