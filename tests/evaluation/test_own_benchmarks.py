"""A user's own benchmarks without code: a captions table scored as retrieval (``format: table``)
and an image folder scored by zero-shot classification (``format: imagefolder``)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tulip_pipelines.evaluation.classification import (
    classification_frame,
    classify,
    default_templates,
    load_classification_benchmarks,
    read_imagefolder,
)
from tulip_pipelines.evaluation.evaluate import (
    BenchmarkParams,
    EvaluateParams,
    load_benchmarks,
)
from tulip_pipelines.evaluation.readers import read_table
from tulip_pipelines.evaluation.report import report_markdown

# ---------------------------------------------------------------------------------------------
# format: table


def _image(path: Path, colour=(10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


ROWS = [
    ("img/a.png", "First caption of a."),
    ("img/b.png", "Only caption of b."),
    ("img/a.png", "Second caption of a."),
    ("img/gone.png", "Its image is missing."),
    ("img/b.png", "   "),
    ("../outside.png", "Escapes the root."),
]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_a_captions_table_is_a_retrieval_benchmark_with_several_captions_per_image(
        tmp_path, suffix):
    root = tmp_path / "mine"
    _image(root / "img/a.png")
    _image(root / "img/b.png")
    frame = pd.DataFrame(ROWS, columns=["file", "text"])
    path = root / f"captions{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    bench = read_table(root, name="mine", kind="short", captions=path.name, image_column="file",
                       caption_column="text")
    assert [Path(p).name for p in bench.image_paths] == ["a.png", "b.png"]
    assert bench.texts == ["First caption of a.", "Second caption of a.", "Only caption of b."]
    assert bench.text_to_image.tolist() == [0, 0, 1]
    assert [i.reason.value for i in bench.issues] == ["empty_caption", "unsafe_image_path",
                                                      "missing_image"]


def test_a_table_benchmark_is_configured_without_code_and_checked(tmp_path):
    root = tmp_path / "mine"
    _image(root / "x.png")
    (root / "c.csv").write_text("image,caption\nx.png,A caption.\n")
    params = EvaluateParams(benchmarks={"mine": {"format": "table", "root": str(root),
                                                 "captions": "c.csv", "kind": "long"}})
    bench = load_benchmarks(params, None, tmp_path)["mine"]
    assert bench.kind == "long" and bench.texts == ["A caption."]
    with pytest.raises(ValueError, match="unknown option"):
        BenchmarkParams.from_params("mine", {"format": "table", "root": "r", "caption": "c.csv"})
    with pytest.raises(ValueError, match="no column 'caption'"):
        (root / "c.csv").write_text("image,text\nx.png,A caption.\n")
        load_benchmarks(params, None, tmp_path)


# ---------------------------------------------------------------------------------------------
# format: imagefolder


COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
           "yellow": (1.0, 1.0, 0.0)}


class _ColourCLIP(torch.nn.Module):
    """A stand-in CLIP: an image's feature is its mean colour, a text's is the colour it names."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Linear(1, 1)

    def encode_image(self, pixels, normalize=False):
        return torch.nn.functional.normalize(pixels.float(), dim=-1)

    def encode_text(self, tokens, normalize=False):
        table = torch.tensor(list(COLOURS.values()))
        return torch.nn.functional.normalize(table[tokens[:, 0]], dim=-1)


def _tokenize(texts):
    return torch.tensor([[next(i for i, c in enumerate(COLOURS) if c in t)] for t in texts])


def _preprocess(image):
    return torch.tensor(np.asarray(image, dtype=np.float32).mean(axis=(0, 1)))


BUNDLE = SimpleNamespace(model=_ColourCLIP(), preprocess=_preprocess, tokenizer=_tokenize)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "classes"
    for i in range(3):
        _image(root / "r" / f"{i}.png", (255, 0, 0))
    _image(root / "r" / "3.png", (0, 50, 200))      # blue, then green, yellow, red: top-3 miss
    for i in range(2):
        _image(root / "g" / f"{i}.png", (0, 255, 0))
    _image(root / "g" / "2.png", (100, 60, 0))      # yellow, red, then green: a top-3 hit only
    for i in range(2):
        _image(root / "b" / f"{i}.png", (0, 0, 255))
    (root / "y").mkdir()                            # a class without images: still a candidate
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "names.json").write_text(json.dumps(
        {"r": "red thing", "g": "green thing", "b": "blue thing", "y": "yellow thing"}))
    return root


def test_an_image_folder_reads_classes_from_a_mapping_and_reports_what_it_cannot_use(folder):
    bench = read_imagefolder(folder, "mine", classes="names.json")
    assert bench.class_names == ["red thing", "green thing", "blue thing", "yellow thing"]
    assert bench.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert [(i.item, i.reason.value) for i in bench.issues] == [
        ("b/notes.txt", "not_an_image"), ("y", "class_without_images")]
    by_folder = read_imagefolder(folder, "mine")
    assert by_folder.class_names == ["b", "g", "r", "y"]  # sorted folder names


def test_a_folder_the_mapping_does_not_name_is_a_clear_error(folder):
    (folder / "names.json").write_text(json.dumps({"r": "red thing"}))
    with pytest.raises(ValueError, match=r"class folder\(s\) \['b', 'g', 'y'\]"):
        read_imagefolder(folder, "mine", classes="names.json")


def test_zero_shot_accuracy_counts_the_true_class_within_the_top_k(folder):
    bench = read_imagefolder(folder, "mine", classes="names.json",
                             templates=["a photo of a {}."])
    rows, _ = classify({"stub": BUNDLE, "again": BUNDLE}, bench, (1, 3, 5), 4,
                       torch.device("cpu"), None, 200, 0)
    metrics = classification_frame(rows).set_index(["model", "k"])
    # worked out by hand in the fixture: 7 of 9 right at top-1, 8 of 9 within the top 3
    assert metrics.loc[("stub", 1), "accuracy"] == pytest.approx(700 / 9)
    assert metrics.loc[("stub", 3), "accuracy"] == pytest.approx(800 / 9)
    assert ("stub", 5) not in metrics.index  # more than the 4 classes: left out
    assert metrics.loc[("again", 1), "accuracy"] == metrics.loc[("stub", 1), "accuracy"]
    assert (metrics["n_images"] == 9).all() and (metrics["n_classes"] == 4).all()
    low, high = metrics.loc[("stub", 1), ["ci_low", "ci_high"]]
    assert low < 700 / 9 < high


def test_the_default_templates_are_open_clips_imagenet_ones(folder):
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert default_templates() == list(OPENAI_IMAGENET_TEMPLATES)
    bench = read_imagefolder(folder, "mine", classes="names.json")
    assert bench.templates is None
    rows, _ = classify({"stub": BUNDLE}, bench, (1,), 4, torch.device("cpu"), None, 50, 0)
    assert rows[0][3] == pytest.approx(700 / 9)


def test_imagefolder_benchmarks_are_configured_apart_from_retrieval(folder, tmp_path):
    params = EvaluateParams(benchmarks={"mine": {"format": "imagefolder", "root": str(folder),
                                                 "classes": "names.json"}})
    assert load_benchmarks(params, None, tmp_path) == {}
    assert list(load_classification_benchmarks(params)) == ["mine"]
    with pytest.raises(ValueError, match="templates"):
        BenchmarkParams.from_params("mine", {"format": "imagefolder", "root": "r",
                                             "templates": ["no placeholder"]})


def test_the_report_shows_every_model_side_by_side(folder):
    bench = read_imagefolder(folder, "mine", classes="names.json", templates=["{}"])
    rows, scored = classify({"teacher": BUNDLE, "tulip": BUNDLE}, bench, (1, 3), 4,
                            torch.device("cpu"), None, 50, 0)
    report = report_markdown(pd.DataFrame(), classification=classification_frame(rows),
                             classification_issues=scored.issues_frame())
    assert "# Zero-shot classification" in report
    table = [line for line in report.splitlines() if line.startswith("| mine")]
    assert len(table) == 2 and "top-3" in report
    assert "77.8 [" in table[0]
    assert "1 not_an_image" in report and "1 class_without_images" in report
