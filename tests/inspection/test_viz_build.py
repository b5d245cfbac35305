"""The static kedro-viz site that `make viz` (and the README's `kedro viz build` line) produces:
every pipeline and key dataset, and dataset previews (tables and plots) once data exists."""

import base64
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import copy_project

PIPELINES = ["demo_data", "ingest", "split", "prepare_images", "teacher", "distill", "expand",
             "longclip", "evaluate"]
DATASETS = [
    "raw_annotations",
    "captions",
    "rejected_captions",
    "train_captions",
    "val_captions",
    "prepared_images",
    "rejected_images",
    "teacher_model",
    "distilled_model",
    "expanded_model",
    "longclip_authors_model",
    "longclip_equal_budget_model",
    "retrieval_metrics",
]
TABLE_TYPES = ("pandas.ParquetDataset", "tulip_pipelines.io.parquet.ParquetPartsDataset")
IMAGE_TYPES = ("matplotlib.MatplotlibDataset",)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def documented_build_args(project_root: Path) -> list[str]:
    """The arguments `make viz` gives `kedro` (the Makefile's recipe, `$(BIN)/kedro ...`)."""
    makefile = (project_root / "Makefile").read_text()
    recipe = re.search(r"^viz:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert recipe, "Makefile has no `viz` target"
    args = shlex.split(recipe.group(1))
    assert args[0] == "$(BIN)/kedro", args
    return args[1:]


def project_catalog(project: Path):
    """The project's base catalog, its relative paths taken from the project directory (as
    `kedro run` there would)."""
    from kedro.config import OmegaConfigLoader
    from kedro.io import DataCatalog

    conf = OmegaConfigLoader(str(project / "conf"), base_env="base", default_run_env="local")
    entries = {}
    for name, entry in conf["catalog"].items():
        entry = dict(entry)
        for key in ("filepath", "path"):
            if key in entry and not Path(entry[key]).is_absolute():
                entry[key] = str(project / entry[key])
        entries[name] = entry
    return DataCatalog.from_config(entries)


def write_outputs(project: Path) -> dict[str, pd.DataFrame]:
    """A few outputs of a run, saved through the project's own catalog entries: a streamed
    Parquet table, plain and patterned Parquet tables, a loss curve and the recall chart."""
    from tulip_pipelines.data.images import PreparedImages
    from tulip_pipelines.evaluation.report import report_figure
    from tulip_pipelines.training.plots import loss_figure

    captions = pd.DataFrame({
        "id": ["1", "2", "3"], "image": ["coco/1.jpg", "coco/2.jpg", "sam/3.jpg"],
        "caption": ["A red circle. It is striped.", "A blue square.", "Two stars."],
        "source": ["coco", "coco", "sam"], "n_chars": [28, 14, 10],
    })
    history = pd.DataFrame({"step": [1, 2, 3], "loss": [2.1, 1.7, 1.4],
                            "lr": [1e-4, 2e-4, 1e-4], "samples_per_s": [50.0, 51.0, 49.0]})
    metrics = pd.DataFrame({
        "benchmark": ["urban1k_demo"] * 2, "model": ["teacher", "tulip_expanded"],
        "direction": ["i2t"] * 2, "k": [1, 1], "recall": [12.5, 62.5], "n_queries": [8, 8],
    })
    tables = {"captions": captions, "train_captions": captions, "teacher_history": history,
              "retrieval_metrics": metrics}
    catalog = project_catalog(project)
    for name, frame in tables.items():
        catalog.save(name, frame)
    catalog.save("prepared_images", PreparedImages("data/05_model_input/prepared_images",
                                                   {"size": 48, "n_samples": 3}))
    catalog.save("teacher_loss_plot", loss_figure(history, "teacher"))
    catalog.save("retrieval_report_plot", report_figure(metrics))
    catalog.save("retrieval_report", REPORT)
    import torch

    from tulip_pipelines.models import create_teacher

    torch.manual_seed(0)
    catalog.save("teacher_model", create_teacher("TULIP-Tiny"))  # with its model card
    return tables


REPORT = ("# Retrieval\n\n| benchmark | model | I2T R@1 |\n|:--|:--|--:|\n"
          "| urban1k_demo | teacher | 12.5 |\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory, project_root):
    """A copy of the project (the checkout stays clean) with some outputs written, and the site
    built there by `make viz`'s command. Returns (site directory, tables written)."""
    project = copy_project(project_root, tmp_path_factory.mktemp("viz") / "project")
    tables = write_outputs(project)
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    kedro = Path(sys.executable).with_name("kedro")
    done = subprocess.run(
        [str(kedro), *documented_build_args(project_root)], cwd=project, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return project / "build", tables


@pytest.fixture(scope="module")
def viz_site(built) -> Path:
    return built[0]


def node_details(site: Path) -> dict[str, dict]:
    """Each dataset node's detail JSON (``api/nodes/<id>``) by dataset name."""
    main = json.loads((site / "api" / "main").read_text())
    return {n["name"]: json.loads((site / "api" / "nodes" / n["id"]).read_text())
            for n in main["nodes"] if n["type"] == "data"}


def catalog_types(project_root: Path) -> dict[str, str]:
    """Catalog entry (or pattern) -> dataset type, over conf/base/catalog*.yml."""
    out = {}
    for path in sorted((project_root / "conf" / "base").glob("catalog*.yml")):
        for name, entry in (yaml.safe_load(path.read_text()) or {}).items():
            if isinstance(entry, dict) and "type" in entry:
                out[name] = entry["type"]
    return out


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


def test_tables_written_show_their_rows(built):
    site, tables = built
    details = node_details(site)
    for name, frame in tables.items():
        detail = details[name]
        assert detail["preview_type"] == "TablePreview", (name, detail.get("preview_type"))
        preview = detail["preview"]
        assert preview is not None, f"{name}: no preview in the site"
        assert preview["columns"] == list(frame.columns), name
        assert preview["data"] == frame.head(10).values.tolist(), name


def test_plots_written_show_as_images(built):
    details = node_details(built[0])
    for name in ("teacher_loss_plot", "retrieval_report_plot"):
        detail = details[name]
        assert detail["preview_type"] == "ImagePreview", (name, detail.get("preview_type"))
        assert detail["preview"], f"{name}: no preview in the site"
        assert base64.b64decode(detail["preview"]).startswith(PNG_MAGIC), name


def test_the_report_and_the_model_cards_show_their_markdown(built, tmp_path):
    site, _ = built
    details = node_details(site)
    report = details["retrieval_report"]
    assert report["preview_type"] == "TextPreview" and report["preview"] == REPORT
    card = details["teacher_model"]
    written = (site.parent / "data/06_models/teacher_model/MODEL_CARD.md").read_text()
    assert card["preview_type"] == "TextPreview" and card["preview"] == written
    assert "TULIP-Tiny" in written
    # a model directory not written yet says so
    assert "not trained yet" in details["expanded_model"]["preview"]


def test_prepared_images_show_their_description(built):
    detail = node_details(built[0])["prepared_images"]
    assert detail["preview_type"] == "JSONPreview", detail.get("preview_type")
    shown = json.loads(detail["preview"])
    assert shown == {"kind": "prepared", "folder": "data/05_model_input/prepared_images",
                     "size": 48, "n_samples": 3}


def test_every_table_and_plot_entry_offers_a_preview(viz_site, project_root):
    """Whatever is written later previews too: each Parquet and matplotlib entry of the catalog
    has kedro-viz's preview type (an entry with ``preview: false`` or a type without
    ``preview()`` would have none)."""
    types = catalog_types(project_root)
    details = node_details(viz_site)
    checked = 0
    for name, detail in details.items():
        entry = next((types[p] for p in types
                      if re.fullmatch(re.sub(r"\\\{\w+\\\}", ".+", re.escape(p)), name)), None)
        if entry in TABLE_TYPES:
            assert detail["preview_type"] == "TablePreview", name
        elif entry in IMAGE_TYPES:
            assert detail["preview_type"] == "ImagePreview", name
        else:
            continue
        checked += 1
    assert checked >= 17  # 12 tables and 5 plots in the default catalog


def test_the_site_in_a_browser_offers_every_pipeline(viz_site, tmp_path):
    """What a user sees: the built site served over HTTP, in headless Chromium; its pipeline
    menu lists every pipeline, and choosing one draws its nodes."""
    from tests.browser import chromium_page, screenshot, static_site

    with static_site(viz_site, tmp_path / "http.log") as url, chromium_page() as page:
        page.goto(f"{url}/")
        menu = page.locator(".kedro.dropdown", has_text="__default__").first
        menu.wait_for()
        screenshot(page, tmp_path, "viz_default")
        menu.click()
        offered = [t.strip() for t in menu.locator("[role=option]").all_inner_texts()]
        assert set(PIPELINES) | {"__default__"} <= set(offered), offered
        menu.locator("[role=option]", has_text="expand").first.click()
        page.get_by_text("expand_context").first.wait_for()
        assert menu.locator(".dropdown__label").inner_text().strip() == "expand"
        screenshot(page, tmp_path, "viz_expand")


def test_readme_build_line_is_the_make_viz_command(project_root):
    readme = (project_root / "README.md").read_text()
    lines = [line for line in readme.splitlines() if "kedro viz build" in line]
    assert lines, "README has no `kedro viz build` line"
    args = " ".join(documented_build_args(project_root))
    for line in lines:
        assert args in line, line
