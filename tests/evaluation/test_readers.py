"""Each benchmark reader on a small fixture written in the benchmark's own format."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tulip_pipelines.evaluation.readers import (
    BenchmarkMissing,
    IssueReason,
    build_dci_long,
    read_coco,
    read_dci_long,
    read_flickr30k,
    read_sharegpt4v,
    read_urban1k,
)


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def _reasons(bench) -> dict[str, str]:
    return {i.item: i.reason for i in bench.issues}


def test_urban1k_pairs_by_stem_in_sorted_order(tmp_path):
    root = tmp_path / "Urban1k"
    for stem in ("b", "a", "c", "d"):
        _image(root / "image" / f"{stem}.jpg")
    (root / "caption").mkdir()
    (root / "caption" / "b.txt").write_text("Second long caption.\nignored second line\n")
    (root / "caption" / "a.txt").write_text("First long caption.")
    (root / "caption" / "c.txt").write_text("\n\n")  # empty caption
    (root / "caption" / "z.txt").write_text("A caption without its image.")
    # d.jpg has no caption file
    bench = read_urban1k(root, name="u")
    assert [Path(p).name for p in bench.image_paths] == ["a.jpg", "b.jpg"]
    assert bench.texts == ["First long caption.", "Second long caption."]
    assert bench.text_to_image.tolist() == [0, 1]
    assert all(Path(p).is_absolute() for p in bench.image_paths)
    assert _reasons(bench) == {
        "image/d.jpg": IssueReason.IMAGE_WITHOUT_CAPTION,
        "caption/c.txt": IssueReason.EMPTY_CAPTION,
        "caption/z.txt": IssueReason.CAPTION_WITHOUT_IMAGE,
    }
    frame = bench.issues_frame()
    assert list(frame.columns) == ["benchmark", "item", "reason", "detail"] and set(
        frame["benchmark"]
    ) == {"u"}


def test_missing_benchmark_names_the_path(tmp_path):
    with pytest.raises(BenchmarkMissing, match="image") as err:
        read_urban1k(tmp_path / "nowhere")
    assert err.value.path == tmp_path / "nowhere" / "image"
    with pytest.raises(BenchmarkMissing, match="results.csv"):
        read_flickr30k(tmp_path)
    with pytest.raises(BenchmarkMissing, match="captions_val2017.json"):
        read_coco(tmp_path)
    with pytest.raises(BenchmarkMissing, match="dci_long.csv"):
        read_dci_long(tmp_path)


def _write_flickr(root: Path) -> None:
    _image(root / "flickr30k_images" / "1.jpg")
    _image(root / "flickr30k_images" / "2.jpg")
    rows = [
        "image_name| comment_number| comment",
        "1.jpg| 0| A dog runs .",
        "1.jpg| 1| A brown dog | with a pipe in the text .",
        "2.jpg| 0| Two people .",
        "2.jpg| 1| ",
        "3.jpg| 0| The image of this caption is missing .",
        "2.jpg| 2 A row whose separator is missing .",
    ]
    (root / "results.csv").write_text("\n".join(rows) + "\n")


def test_flickr30k_several_captions_per_image_and_issues(tmp_path):
    _write_flickr(tmp_path)
    bench = read_flickr30k(tmp_path, kind="short")
    assert [Path(p).name for p in bench.image_paths] == ["1.jpg", "2.jpg"]
    assert bench.texts == [
        "A dog runs .",
        "A brown dog | with a pipe in the text .",
        "Two people .",
    ]
    assert bench.text_to_image.tolist() == [0, 0, 1]
    assert _reasons(bench) == {
        "results.csv line 5": IssueReason.EMPTY_CAPTION,
        "results.csv line 7": IssueReason.MALFORMED_ROW,
        "3.jpg": IssueReason.MISSING_IMAGE,
    }


def test_flickr30k_karpathy_test_split(tmp_path):
    _write_flickr(tmp_path)
    split = {"images": [{"filename": "1.jpg", "split": "train", "sentences": []},
                        {"filename": "2.jpg", "split": "test", "sentences": []}]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(split))
    bench = read_flickr30k(tmp_path, karpathy_json="dataset_flickr30k.json")
    assert [Path(p).name for p in bench.image_paths] == ["2.jpg"] and bench.texts == [
        "Two people ."
    ]


def test_coco_first_five_captions_in_annotation_order(tmp_path):
    _image(tmp_path / "val2017" / "000000000001.jpg")
    _image(tmp_path / "val2017" / "000000000002.jpg")
    data = {
        "images": [
            {"id": 2, "file_name": "000000000002.jpg"},
            {"id": 1, "file_name": "000000000001.jpg"},
            {"id": 3, "file_name": "000000000003.jpg"},
            {"id": 4, "file_name": "000000000004.jpg"},
        ],
        "annotations": [{"id": 10 + i, "image_id": 1, "caption": f"one {i}"} for i in range(7)]
        + [
            {"id": 30, "image_id": 2, "caption": "two a"},
            {"id": 31, "image_id": 2, "caption": "  "},
            {"id": 32, "image_id": 2, "caption": "two b"},
            {"id": 40, "image_id": 3, "caption": "three"},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(data))
    bench = read_coco(tmp_path)
    assert bench.texts == ["two a", "two b", "one 0", "one 1", "one 2", "one 3", "one 4"]
    assert bench.text_to_image.tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert _reasons(bench) == {
        "annotation 31": IssueReason.EMPTY_CAPTION,
        "000000000003.jpg": IssueReason.MISSING_IMAGE,
        "000000000004.jpg": IssueReason.IMAGE_WITHOUT_CAPTION,
    }


def test_dci_long_csv_and_its_builder(tmp_path):
    root = tmp_path / "densely_captioned_images"
    _image(root / "photos" / "sa_1.jpg")
    _image(root / "photos" / "sa_3.jpg")
    records = {
        "1.json": {
            "image": "sa_1.jpg",
            "short_caption": "s",
            "extra_caption": "A long\ncaption of one.",
            "summaries": {},
        },
        "2.json": {"image": "sa_2.jpg", "short_caption": "s", "extra_caption": "", "summaries": {}},
        "3.json": {
            "image": "sa_3.jpg",
            "short_caption": "s",
            "extra_caption": "Long three.",
            "summaries": {},
        },
        "4.json": {
            "image": "sa_4.jpg",
            "short_caption": "s",
            "extra_caption": "Its photo is missing.",
        },
    }
    (root / "annotations").mkdir()
    for name, record in records.items():
        (root / "annotations" / name).write_text(json.dumps(record))
    frame, without_long = build_dci_long(root / "annotations")
    assert without_long == 1
    assert frame.to_dict("list") == {
        "filepath": ["photos/sa_1.jpg", "photos/sa_3.jpg", "photos/sa_4.jpg"],
        "title": ["A long caption of one.", "Long three.", "Its photo is missing."],
    }
    frame.loc[len(frame)] = ["photos/sa_1.jpg", ""]  # an empty title
    frame.to_csv(root / "dci_long.csv", sep="\t", index=False)
    bench = read_dci_long(root)
    assert bench.texts == ["A long caption of one.", "Long three."]
    assert [Path(p).name for p in bench.image_paths] == ["sa_1.jpg", "sa_3.jpg"]
    assert _reasons(bench) == {"dci_long.csv row 3": IssueReason.MISSING_IMAGE,
                               "dci_long.csv row 4": IssueReason.EMPTY_CAPTION}


def test_dci_long_rejects_a_table_without_its_columns(tmp_path):
    (tmp_path / "dci_long.csv").write_text("path\tcaption\nx.jpg\thello\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['filepath', 'title'\]"):
        read_dci_long(tmp_path)


def test_sharegpt4v_takes_the_first_n_records(tmp_path):
    for i in range(4):
        _image(tmp_path / "coco" / f"{i}.jpg")
    val = pd.DataFrame(
        {
            "id": ["r0", "r1", "r2", "r3", "r4"],
            "image": ["coco/0.jpg", "coco/1.jpg", "coco/9.jpg", "coco/3.jpg", "coco/2.jpg"],
            "caption": ["zero", "", "nine", "three", "two"],
        }
    )
    bench = read_sharegpt4v(val, tmp_path, n=4)
    assert bench.texts == ["zero", "three"]
    assert np.array_equal(bench.text_to_image, [0, 1])
    assert _reasons(bench) == {"r1": IssueReason.EMPTY_CAPTION, "r2": IssueReason.MISSING_IMAGE}
