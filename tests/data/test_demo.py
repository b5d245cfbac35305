"""The embedded demo data: ShareGPT4V's format, determinism, lengths and the group property."""

import dataclasses
import io

import pytest
from open_clip.tokenizer import SimpleTokenizer

from tulip_pipelines.data.demo import (
    HUMAN_PROMPT,
    DemoDataParams,
    DemoImage,
    check_group_prefixes,
    generate_demo_data,
)
from tulip_pipelines.training.datasets import first_sentence, split_sentences

SMALL = DemoDataParams(n_groups=12, n_benchmark_groups=3, n_short_benchmark_images=5)


@pytest.fixture(scope="module")
def demo():
    return generate_demo_data(SMALL)


@pytest.fixture(scope="module")
def bpe():
    return SimpleTokenizer()


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_records_have_sharegpt4v_shape(demo):
    assert len(demo.records) == SMALL.n_groups * SMALL.group_size
    for record in demo.records:
        assert set(record) == {"id", "image", "conversations"}
        human, gpt = record["conversations"]
        assert human == {"from": "human", "value": HUMAN_PROMPT}
        assert human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"]
        assert record["image"].startswith("demo/") and record["image"].endswith(".png")
        assert record["image"].removesuffix(".png") in demo.images
    assert len({r["id"] for r in demo.records}) == len(demo.records)


def test_same_seed_same_data_other_seed_other_data(demo):
    again = generate_demo_data(SMALL)
    assert again.records == demo.records
    assert [_png(again.images[k]) for k in sorted(again.images)] == [
        _png(demo.images[k]) for k in sorted(demo.images)
    ]
    other = generate_demo_data(dataclasses.replace(SMALL, seed=1))
    assert other.records != demo.records


def test_captions_are_long(demo, bpe):
    lengths = [len(bpe.encode(r["conversations"][1]["value"])) for r in demo.records]
    assert 120 <= min(lengths) and max(lengths) <= 240


def test_group_shares_first_77_tokens_and_differs_later(demo, bpe):
    captions = [r["conversations"][1]["value"] for r in demo.records]
    groups = [captions[i : i + SMALL.group_size] for i in range(0, len(captions), SMALL.group_size)]
    for group in groups:
        tokens = [bpe.encode(c) for c in group]
        assert len({tuple(t[:75]) for t in tokens}) == 1, group  # what a 77-token tower reads
        assert len({tuple(t[:246]) for t in tokens}) == len(group)  # what 248 tokens read
    images = [_png(demo.images[r["image"].removesuffix(".png")]) for r in demo.records]
    assert len(set(images)) == len(images)


def test_too_few_shared_cells_is_refused():
    params = dataclasses.replace(SMALL, shared_cells=3)
    image = DemoImage("x", 0, 0, tuple((0, 0, 0, 0) for _ in range(9)))
    with pytest.raises(ValueError, match="raise demo_data.shared_cells"):
        check_group_prefixes([image], params)


def test_shuffled_variants_keep_summary_first_and_same_sentences(demo):
    table = demo.shuffled_captions
    assert len(table) == len(demo.records) * SMALL.shuffled_variants
    original = {r["id"]: r["conversations"][1]["value"] for r in demo.records}
    for row in table.itertuples():
        sentences = split_sentences(row.caption)
        reference = split_sentences(original[row.id])
        assert sentences[0] == reference[0]
        assert sorted(sentences) == sorted(reference)
    assert (table["caption"] != table["id"].map(original)).mean() > 0.9


def test_benchmarks_are_held_out_and_in_their_formats(demo):
    assert len(demo.long_benchmark_images) == SMALL.n_benchmark_groups * SMALL.group_size
    assert set(demo.long_benchmark_images) == set(demo.long_benchmark_captions)
    train_captions = {r["conversations"][1]["value"] for r in demo.records}
    assert not {c.strip() for c in demo.long_benchmark_captions.values()} & train_captions
    train_pixels = {_png(im) for im in demo.images.values()}
    for image in [*demo.long_benchmark_images.values(), *demo.short_benchmark_images.values()]:
        assert _png(image) not in train_pixels
    lines = demo.short_benchmark_results_csv.splitlines()
    assert lines[0] == "image_name| comment_number| comment"
    assert len(lines) == 1 + SMALL.n_short_benchmark_images
    name, number, comment = lines[1].split("| ")
    assert name.removesuffix(".jpg") in demo.short_benchmark_images and number == "0"
    assert comment == first_sentence(comment)


def test_first_sentence():
    assert first_sentence("A grid on grey. In the centre a dot.") == "A grid on grey."
    assert first_sentence("  no end mark ") == "no end mark"
    assert first_sentence("") == ""


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"group_size": 1}, "group_size"),
        ({"image_size": 50}, "multiple of 3"),
        ({"shared_cells": 9}, "shared_cells"),
        ({"min_differing_cells": 6}, "min_differing_cells"),
        ({"colour": "red"}, "unknown demo_data parameter"),
    ],
)
def test_config_mistakes_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        DemoDataParams.from_params(bad)


def test_the_class_folder_draws_grids_of_one_colour_from_its_own_stream():
    import numpy as np

    from tulip_pipelines.data.demo import COLOURS, DemoDataParams, generate_demo_classes

    params = DemoDataParams(n_groups=2, n_benchmark_groups=0, n_short_benchmark_images=0,
                            n_class_images=3)
    images, classes = generate_demo_classes(params)
    assert len(images) == 3 * len(COLOURS)
    assert classes["red"] == "grid of red shapes" and set(classes) == set(COLOURS)
    for key, image in images.items():
        colour = key.split("/")[0]
        pixels = {tuple(p) for p in np.asarray(image).reshape(-1, 3).tolist()}
        # every cell is drawn in the class colour: it is one of the image's two colours
        assert tuple(COLOURS[colour]) in pixels and len(pixels) <= 2, key
    again, _ = generate_demo_classes(params)
    assert all(np.array_equal(np.asarray(images[k]), np.asarray(again[k])) for k in images)


@pytest.mark.parametrize("name, accepted, rejected", [
    ("seed", [0], [-1]), ("image_size", [3], [0, 2]), ("n_groups", [1], [0]),
    ("group_size", [2], [1]), ("shared_cells", [1, 8], [0, 9]),
    ("min_differing_cells", [1, 4], [0, 5]),  # at most the 9 - 5 cells after the shared ones
    ("shuffled_variants", [1], [0]), ("n_benchmark_groups", [0], [-1]),
    ("n_short_benchmark_images", [0], [-1])])
def test_each_bound_accepts_its_edge_and_rejects_one_step_past(name, accepted, rejected):
    from tests.bounds import assert_bounds
    from tulip_pipelines.data.demo import DemoDataParams

    def make(**values):
        if "shared_cells" in values:  # room for at least one differing cell
            values["min_differing_cells"] = 1
        return DemoDataParams(**values)

    assert_bounds(make, name, accepted, rejected)


def test_the_image_size_is_a_multiple_of_the_grid():
    from tests.bounds import assert_bounds
    from tulip_pipelines.data.demo import DemoDataParams

    assert_bounds(DemoDataParams, "image_size", [6, 9], [7, 8], message="multiple of 3")
