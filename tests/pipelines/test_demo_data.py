"""demo_data as a Kedro pipeline: the project's own catalog entries, re-rooted in tmp_path, receive
the generated dataset in ShareGPT4V's, Urban1k's and Flickr30k's on-disk layouts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog
from kedro.runner import SequentialRunner
from PIL import Image

from tulip_pipelines.data.demo import HUMAN_PROMPT, DemoDataParams, generate_demo_data
from tulip_pipelines.pipelines import demo_data

PARAMS = {"n_groups": 5, "group_size": 3, "shuffled_variants": 2, "n_benchmark_groups": 2,
          "n_short_benchmark_images": 4}  # fmt: skip
CONF = Path(__file__).resolve().parents[2] / "conf" / "base"


def _rooted_catalog(tmp_path: Path) -> DataCatalog:
    """The demo_data outputs as catalogued in conf/base, with every path moved under tmp_path."""
    config = yaml.safe_load((CONF / "catalog_demo_data.yml").read_text())
    ingest = yaml.safe_load((CONF / "catalog_ingest.yml").read_text())
    config["raw_annotations"] = ingest["raw_annotations"]
    for entry in config.values():
        key = "path" if "path" in entry else "filepath"
        entry[key] = str(tmp_path / entry[key])
    catalog = DataCatalog.from_config(config)
    catalog["params:demo_data"] = PARAMS
    return catalog


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("demo_data")
    SequentialRunner().run(demo_data.create_pipeline(), _rooted_catalog(tmp_path))
    return tmp_path


def test_annotation_file_and_images_in_sharegpt4v_layout(run_dir):
    root = run_dir / "data/01_raw/sharegpt4v_demo"
    records = json.loads((root / "share-captioner_demo.json").read_text())
    assert isinstance(records, list) and len(records) == PARAMS["n_groups"] * PARAMS["group_size"]
    for record in records:
        assert list(record) == ["id", "image", "conversations"]
        assert [turn["from"] for turn in record["conversations"]] == ["human", "gpt"]
        assert record["conversations"][0]["value"] == HUMAN_PROMPT
        with Image.open(root / "images" / record["image"]) as image:
            assert image.format == "PNG" and image.size == (48, 48) and image.mode == "RGB"
    assert len(list((root / "images" / "demo").glob("*.png"))) == len(records)
    shuffled = pd.read_parquet(run_dir / "data/02_intermediate/demo_shuffled_captions.parquet")
    assert list(shuffled.columns) == ["id", "variant", "caption"]
    assert len(shuffled) == len(records) * PARAMS["shuffled_variants"]
    assert set(shuffled["id"]) == {r["id"] for r in records}


def test_long_benchmark_in_urban1k_layout(run_dir):
    root = run_dir / "data/01_raw/benchmarks_demo/urban1k_demo"
    images = sorted(p.stem for p in (root / "image").glob("*.jpg"))
    captions = sorted(p.stem for p in (root / "caption").glob("*.txt"))
    assert images == captions and len(images) == PARAMS["n_benchmark_groups"] * PARAMS["group_size"]
    assert sorted(p.name for p in root.iterdir()) == ["caption", "image"]
    first_line = (root / "caption" / f"{images[0]}.txt").read_text().splitlines()[0]
    assert first_line.startswith("A three by three grid") and len(first_line.split(". ")) == 10


def test_short_benchmark_in_flickr30k_layout(run_dir):
    root = run_dir / "data/01_raw/benchmarks_demo/flickr30k_demo"
    text = (root / "results.csv").read_text()
    assert text.splitlines()[0] == "image_name| comment_number| comment"
    table = pd.read_csv(root / "results.csv", sep="|")
    assert list(table.columns) == ["image_name", " comment_number", " comment"]
    assert len(table) == PARAMS["n_short_benchmark_images"]
    assert (table[" comment_number"] == 0).all()
    files = sorted(p.name for p in (root / "flickr30k_images").glob("*.jpg"))
    assert files == sorted(table["image_name"])


def test_saved_jpegs_are_the_generated_images_at_quality_95(run_dir):
    data = generate_demo_data(DemoDataParams.from_params(PARAMS))
    root = run_dir / "data/01_raw/benchmarks_demo/urban1k_demo/image"
    for name, image in data.long_benchmark_images.items():
        expected = io.BytesIO()
        image.save(expected, format="JPEG", quality=95)
        assert (root / f"{name}.jpg").read_bytes() == expected.getvalue()
