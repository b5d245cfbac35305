"""`kedro viz build` produces a static site whose JSON shows every pipeline and key dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import copy_project

PIPELINES = ["demo_data", "ingest", "split", "teacher", "distill", "expand", "longclip", "evaluate"]
DATASETS = [
    "raw_annotations",
    "captions",
    "rejected_captions",
    "train_captions",
    "val_captions",
    "teacher_model",
    "distilled_model",
    "expanded_model",
    "longclip_authors_model",
    "longclip_equal_budget_model",
    "retrieval_metrics",
]


@pytest.fixture(scope="module")
def viz_site(tmp_path_factory, project_root) -> Path:
    """Build the site in a copy of the project so that the checkout stays clean."""
    project = copy_project(project_root, tmp_path_factory.mktemp("viz") / "project")
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    kedro = Path(sys.executable).with_name("kedro")
    done = subprocess.run(
        [str(kedro), "viz", "build"], cwd=project, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return project / "build"


def test_site_lists_every_pipeline(viz_site):
    main = json.loads((viz_site / "api" / "main").read_text())
    registered = {p["id"] for p in main["pipelines"]}
    assert set(PIPELINES) <= registered
    assert (viz_site / "index.html").exists()
    for name in PIPELINES:
        assert (viz_site / "api" / "pipelines" / name).exists()


def test_default_pipeline_graph_reads_as_the_method(viz_site):
    main = json.loads((viz_site / "api" / "main").read_text())
    names = {n["name"] for n in main["nodes"]}
    assert set(DATASETS) <= names, sorted(set(DATASETS) - names)
    tags = {t["id"] for t in main["tags"]}
    assert set(PIPELINES) <= tags
    # Every task node carries the tag of the pipeline it belongs to.
    for node in main["nodes"]:
        if node["type"] == "task":
            assert set(node["tags"]) & set(PIPELINES), node["name"]


def test_parquet_tables_carry_preview_metadata(viz_site):
    main = json.loads((viz_site / "api" / "main").read_text())
    by_name = {n["name"]: n for n in main["nodes"]}
    for name in ("captions", "train_captions", "retrieval_metrics"):
        detail = json.loads((viz_site / "api" / "nodes" / by_name[name]["id"]).read_text())
        assert detail.get("preview_type") == "TablePreview" or "preview" in json.dumps(detail), (
            name,
            detail,
        )
