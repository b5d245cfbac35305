"""The evaluate pipeline on tiny checkpoints and small benchmarks written in their own layouts."""

import logging
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from PIL import Image

from tests.conftest import kept_memory_dataset, mlflow_store
from tulip_pipelines.data.images import SKIPPED_COLUMNS, FolderImages
from tulip_pipelines.evaluation.encode import image_tower_key
from tulip_pipelines.evaluation.evaluate import EvaluateParams
from tulip_pipelines.models import (
    ModelBundle,
    build_student,
    create_teacher,
    load_bundle,
    save_model,
    stretch_position_embedding,
)
from tulip_pipelines.pipelines.evaluate import create_pipeline
from tulip_pipelines.pipelines.evaluate.pipeline import SKIPPED_FROM

COLORS = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250), (250, 0, 250)]


def _image(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 48), color).save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    urban = root / "urban"
    for i, color in enumerate(COLORS):
        _image(urban / "image" / f"u{i}.jpg", color)
        (urban / "caption").mkdir(exist_ok=True)
        (urban / "caption" / f"u{i}.txt").write_text(
            f"A square of colour number {i}. " + "More words. " * 60
        )
    (urban / "caption" / "orphan.txt").write_text("A caption without its image.")
    flickr = root / "flickr"
    lines = ["image_name| comment_number| comment"]
    for i, color in enumerate(COLORS[:4]):
        _image(flickr / "flickr30k_images" / f"f{i}.jpg", color)
        lines += [f"f{i}.jpg| 0| colour {i} .", f"f{i}.jpg| 1| another caption of {i} ."]
    (flickr / "results.csv").write_text("\n".join(lines) + "\n")
    _image(root / "images" / "v0.jpg", COLORS[0])
    _image(root / "images" / "v1.jpg", COLORS[1])
    val = pd.DataFrame(
        {"id": ["a", "b"], "image": ["v0.jpg", "v1.jpg"], "caption": ["zero", "one"]}
    )

    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    save_model(teacher, root / "teacher")
    teacher = load_bundle(root / "teacher")  # as the catalog would give it
    assert "Not evaluated yet" in (root / "teacher" / "MODEL_CARD.md").read_text()
    student = build_student(teacher, 248)
    models = {
        "teacher_model": teacher,
        "longclip_authors_model": stretch_position_embedding(teacher, 248, 20),
        "longclip_equal_budget_model": stretch_position_embedding(teacher, 248, 20),
        "distilled_model": student,
        "expanded_model": build_student(teacher, 248),
    }
    with torch.no_grad():
        models["expanded_model"].model.visual.proj.mul_(-1.0)  # its own image tower
    params = {
        "benchmarks": {
            "urban_tiny": {"format": "urban1k", "root": str(urban), "kind": "long"},
            "flickr_tiny": {"format": "flickr30k", "root": str(flickr), "kind": "short"},
            "coco_absent": {"format": "coco", "root": str(root / "no_coco"), "kind": "short"},
            "val": {"format": "sharegpt4v", "n": 2},
        },
        "ks": [1, 5], "batch_size": 4, "chunk_size": 3,
    }
    return {"models": models, "val": val, "params": params, "image_root": str(root / "images"),
            "teacher_dir": root / "teacher"}


def _catalog(setup) -> DataCatalog:
    """The evaluate pipeline's inputs (the training stages met no unreadable sample) and
    in-memory outputs."""
    catalog = DataCatalog()
    for stage in SKIPPED_FROM[:-1]:
        catalog[f"{stage}_skipped_samples"] = pd.DataFrame(columns=SKIPPED_COLUMNS)
    for name, bundle in setup["models"].items():
        catalog[name] = MemoryDataset(bundle, copy_mode="assign")
    catalog["val_captions"] = setup["val"]
    catalog["params:evaluate"] = setup["params"]
    catalog["prepared_images"] = FolderImages(setup["image_root"])
    for name in create_pipeline().all_outputs():
        catalog[name] = kept_memory_dataset()
    return catalog


def test_pipeline_scores_every_model_side_by_side_and_skips_absent(
    setup, caplog, tmp_path, monkeypatch
):
    uri = mlflow_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    catalog = _catalog(setup)
    try:
        with caplog.at_level(logging.INFO):
            SequentialRunner().run(create_pipeline(), catalog)
    finally:
        mlflow.set_tracking_uri(None)
    metrics = catalog.load("retrieval_metrics")
    assert list(metrics.columns) == ["benchmark", "model", "direction", "k", "recall", "n_queries",
                                     "ci_low", "ci_high"]
    assert set(metrics["benchmark"]) == {"urban_tiny", "flickr_tiny", "val"}  # coco_absent: no rows
    assert (
        f"skipping coco_absent: {setup['params']['benchmarks']['coco_absent']['root']}"
        in caplog.text
    )
    models = [
        "teacher",
        "longclip_stretched",
        "longclip_authors",
        "longclip_equal_budget",
        "tulip_distilled",
        "tulip_expanded",
    ]
    assert list(dict.fromkeys(metrics["model"])) == models
    assert len(metrics) == 3 * 6 * 2 * 2
    assert metrics["recall"].between(0, 100).all()
    assert (metrics["ci_low"] <= metrics["recall"]).all()
    assert (metrics["recall"] <= metrics["ci_high"]).all()
    assert metrics["ci_high"].le(100).all() and metrics["ci_low"].ge(0).all()
    n = metrics.groupby(["benchmark", "direction"])["n_queries"].unique()
    assert n[("flickr_tiny", "i2t")].tolist() == [4] and n[("flickr_tiny", "t2i")].tolist() == [8]
    assert n[("urban_tiny", "t2i")].tolist() == [6]
    wide = metrics.pivot_table(
        index=["benchmark", "model", "direction"], columns="k", values="recall"
    )
    assert (wide[5] >= wide[1]).all()
    # k at least the number of candidates: every query hits, whatever the model
    assert (wide.loc["val", 5] == 100).all() and (
        wide.loc["flickr_tiny", 5].xs("t2i", level="direction") == 100
    ).all()

    issues = catalog.load("benchmark_issues")
    assert issues[["benchmark", "item", "reason"]].values.tolist() == [
        ["urban_tiny", "caption/orphan.txt", "caption_without_image"]
    ]
    report = catalog.load("retrieval_report")
    assert (
        "| urban_tiny" in report
        and "tulip_expanded" in report
        and "1 caption_without_image" in report
    )
    assert "retrieval results:" in caplog.text
    assert catalog.load("skipped_samples").empty  # every image was readable
    assert len(catalog.load("retrieval_report_plot").axes) == 6  # 3 benchmarks x 2 directions
    assert "## Recall@1 against the tokens read" in report
    assert "## Recall@1 by caption length" in report

    # recall against tokens read: the long-caption benchmarks only, every model, both directions
    by_tokens = catalog.load("recall_by_tokens_read")
    assert list(by_tokens.columns) == ["benchmark", "model", "direction", "tokens", "recall",
                                       "n_queries"]
    cuts = [20, 40, 77, 120, 160, 200, 248]
    assert set(by_tokens["benchmark"]) == {"urban_tiny", "val"}  # kind long (sharegpt4v: long)
    assert len(by_tokens) == 2 * len(models) * 2 * len(cuts)
    assert list(dict.fromkeys(by_tokens["model"])) == models
    assert by_tokens.groupby(["benchmark", "model", "direction"])["tokens"].apply(list).map(
        lambda t: t == cuts).all()
    urban = by_tokens[by_tokens["benchmark"] == "urban_tiny"]
    assert (urban["n_queries"] == 6).all()
    # at the longest cut every caption is whole: the full-caption R@1
    full_r1 = metrics[(metrics["k"] == 1)].set_index(["benchmark", "model", "direction"])["recall"]
    at_248 = by_tokens[by_tokens["tokens"] == 248].set_index(["benchmark", "model", "direction"])
    assert at_248["recall"].to_dict() == full_r1.loc[at_248.index].to_dict()
    # the teacher reads 77 tokens: every longer cut is the same caption for it
    teacher = urban[(urban["model"] == "teacher") & (urban["tokens"] >= 77)]
    assert teacher.groupby("direction")["recall"].nunique().eq(1).all()
    assert len(catalog.load("recall_by_tokens_read_plot").axes) == 4  # 2 long benchmarks x 2

    # recall by caption length: every benchmark, every model, bins that hold every query
    by_length = catalog.load("recall_by_caption_length")
    assert list(by_length.columns) == ["benchmark", "model", "direction", "bin", "min_tokens",
                                       "max_tokens", "recall", "n_queries"]
    totals = by_length.groupby(["benchmark", "model", "direction"])["n_queries"].sum()
    expected = metrics[metrics["k"] == 1].set_index(["benchmark", "model", "direction"])
    assert totals.to_dict() == expected["n_queries"].loc[totals.index].to_dict()
    assert set(by_length["benchmark"]) == {"urban_tiny", "flickr_tiny", "val"}

    run = mlflow.MlflowClient(uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()],
        filter_string="tags.`tulip.stage` = 'evaluate'")[0]
    assert run.data.metrics == {}  # the recalls go to the models' own runs, the table stays here
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert {"retrieval_report.md", "retrieval_report.png", "retrieval_metrics.parquet",
            "recall_by_tokens_read.png", "recall_by_tokens_read.parquet",
            "recall_by_caption_length.parquet"} <= artifacts

    # the teacher was loaded from its model directory: its card now holds its retrieval rows
    card = (setup["teacher_dir"] / "MODEL_CARD.md").read_text()
    assert "## Retrieval" in card and "| urban_tiny" in card and "| teacher " in card
    assert "tulip_expanded" not in card  # only its own rows


def test_models_sharing_an_image_tower_share_the_key(setup):
    models = setup["models"]
    teacher = image_tower_key(models["teacher_model"])
    assert image_tower_key(models["longclip_authors_model"]) == teacher
    assert image_tower_key(models["distilled_model"]) == teacher
    assert image_tower_key(models["expanded_model"]) != teacher


def test_parameter_mistakes_name_the_field():
    with pytest.raises(ValueError, match=r"unknown evaluate parameter\(s\) \['batchsize'\]"):
        EvaluateParams.from_params({"batchsize": 4})
    with pytest.raises(ValueError, match=r"evaluate.benchmarks.x.format: unknown format 'urban'"):
        EvaluateParams.from_params({"benchmarks": {"x": {"format": "urban", "root": "r"}}})
    with pytest.raises(ValueError, match=r"evaluate.benchmarks.x.root is required"):
        EvaluateParams.from_params({"benchmarks": {"x": {"format": "coco"}}})
    with pytest.raises(
        ValueError, match=r"evaluate.benchmarks.x: unknown option\(s\) \['karpathy'\]"
    ):
        EvaluateParams.from_params(
            {"benchmarks": {"x": {"format": "flickr30k", "root": "r", "karpathy": "y"}}}
        )
    with pytest.raises(ValueError, match=r"evaluate.ks must be a list of positive integers"):
        EvaluateParams.from_params({"ks": [0, 5]})
    params = EvaluateParams.from_params(
        {"benchmarks": {"d": {"format": "dci_long", "root": "r", "annotations": "a"}}}
    )
    assert params.benchmarks["d"].options == {"annotations": "a"}


def test_each_registered_version_gets_its_own_models_rows_and_card(tmp_path, monkeypatch):
    """Two models, each trained (logged and registered) in its own run: the evaluation gives
    each run's versions its own model's R@1 tags and card, never the other's (the registry calls
    themselves: tests/test_tracking.py)."""
    import dataclasses

    from tulip_pipelines.pipelines.evaluate import nodes

    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    loaded = {}
    for name, model in (("teacher", teacher), ("tulip_expanded", build_student(teacher, 248))):
        spec = dataclasses.replace(model.spec, extra={**model.spec.extra,
                                                      "mlflow_run_id": f"run-of-{name}"})
        save_model(dataclasses.replace(model, spec=spec), tmp_path / name)
        loaded[name] = load_bundle(tmp_path / name)
    loaded["longclip_stretched"] = stretch_position_embedding(teacher, 248, 20)  # no directory
    metrics = pd.DataFrame({
        "benchmark": ["urban", "urban", "urban", "flickr"] * 3,
        "model": ["teacher"] * 4 + ["tulip_expanded"] * 4 + ["longclip_stretched"] * 4,
        "direction": ["t2i", "i2t", "t2i", "t2i"] * 3,
        "k": [1, 1, 5, 1] * 3,
        "recall": [11.111, 22.0, 50.0, 33.3, 44.444, 55.0, 90.0, 66.0, 1.0, 2.0, 3.0, 4.0],
        "n_queries": [6, 6, 6, 8] * 3,
    })
    cards, versions = {}, {}
    monkeypatch.setattr(nodes, "log_model_card",
                        lambda card, run_id: cards.setdefault(run_id, Path(card)))
    monkeypatch.setattr(nodes, "update_registered_versions",
                        lambda run_id, tags, description: versions.setdefault(
                            run_id, (tags, description)))
    params = {"benchmarks": {"urban": {"format": "urban1k", "root": "x", "kind": "long"},
                             "flickr": {"format": "flickr30k", "root": "y", "kind": "short"}}}
    nodes.add_retrieval_to_model_cards(loaded, metrics, params)
    # long_r1: the model's mean R@1 over the long benchmark (urban) in both directions
    expected = {"teacher": {"r1/urban/t2i": "11.11", "r1/urban/i2t": "22.00",
                            "r1/flickr/t2i": "33.30", "long_r1": "16.56"},
                "tulip_expanded": {"r1/urban/t2i": "44.44", "r1/urban/i2t": "55.00",
                                   "r1/flickr/t2i": "66.00", "long_r1": "49.72"}}
    assert set(cards) == set(versions) == {"run-of-teacher", "run-of-tulip_expanded"}
    for name, other in (("teacher", "tulip_expanded"), ("tulip_expanded", "teacher")):
        card = tmp_path / name / "MODEL_CARD.md"
        assert cards[f"run-of-{name}"] == card
        tags, description = versions[f"run-of-{name}"]
        assert tags == expected[name]
        assert description == card.read_text(encoding="utf-8")
        assert f"| {name} " in description and f"| {other} " not in description
        assert "longclip_stretched" not in description


def _tracked_model(stage: str, registered: str, seed: int, root) -> ModelBundle:
    """A model logged and registered by its own run ``stage``, its directory written with that
    run id (as a training stage leaves it), loaded back as the catalog gives it."""
    from tulip_pipelines.serving.pyfunc import log_embedding_model

    torch.manual_seed(seed)
    bundle = create_teacher("TULIP-Tiny")
    with mlflow.start_run(run_name=stage) as run:
        bundle.spec.extra = {"stage": stage, "mlflow_run_id": run.info.run_id}
        directory = root / f"{stage}_{seed}"
        save_model(bundle, directory)
        log_embedding_model(directory, stage, registered_model_name=registered)
    return load_bundle(directory)


def _recall_table(values: dict) -> pd.DataFrame:
    """``{(model, benchmark, direction, k): recall}`` as a retrieval_metrics table."""
    return pd.DataFrame([{"benchmark": b, "model": m, "direction": d, "k": k, "recall": r,
                          "n_queries": 4} for (m, b, d, k), r in values.items()])


def test_each_model_recall_goes_to_its_own_run_and_the_champion_to_the_best(tmp_path,
                                                                            monkeypatch):
    from tulip_pipelines.pipelines.evaluate.nodes import add_retrieval_to_model_cards

    uri = mlflow_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    params = {"benchmarks": {"urban": {"format": "urban1k", "root": "x", "kind": "long"},
                             "flickr": {"format": "flickr30k", "root": "y", "kind": "short"}}}
    try:
        teacher = _tracked_model("teacher", "tulip-teacher", 0, tmp_path)
        expanded = _tracked_model("expand", "tulip-expanded", 1, tmp_path)
        values = {}
        for model, base in (("teacher", 10.0), ("tulip_expanded", 40.0)):
            for bench, extra in (("urban", 0.0), ("flickr", 30.0)):
                values.update({(model, bench, "i2t", 1): base + extra,
                               (model, bench, "t2i", 1): base + extra + 2.0,
                               (model, bench, "i2t", 5): base + extra + 20.0,
                               (model, bench, "t2i", 5): base + extra + 22.0})
        add_retrieval_to_model_cards({"teacher": teacher, "tulip_expanded": expanded},
                                     _recall_table(values), params)
        client = mlflow.MlflowClient()
        teacher_run = client.get_run(teacher.spec.extra["mlflow_run_id"]).data.metrics
        expand_run = client.get_run(expanded.spec.extra["mlflow_run_id"]).data.metrics
        # the same names in both runs, each with its own model's values
        assert teacher_run == {"eval/urban/i2t_r1": 10.0, "eval/urban/t2i_r1": 12.0,
                               "eval/urban/i2t_r5": 30.0, "eval/urban/t2i_r5": 32.0,
                               "eval/flickr/i2t_r1": 40.0, "eval/flickr/t2i_r1": 42.0,
                               "eval/flickr/i2t_r5": 60.0, "eval/flickr/t2i_r5": 62.0}
        assert expand_run["eval/urban/i2t_r1"] == 40.0 and set(expand_run) == set(teacher_run)
        # long-caption R@1: urban only (flickr is short), both directions
        assert client.get_model_version("tulip-teacher", "1").tags["long_r1"] == "11.00"
        assert client.get_model_version("tulip-expanded", "1").tags["long_r1"] == "41.00"
        assert client.get_registered_model("tulip-expanded").aliases == {"champion": 1}
        assert client.get_registered_model("tulip-teacher").aliases == {}

        # a better version registered later takes the alias (flickr's higher R@1 does not count)
        better = _tracked_model("teacher", "tulip-teacher", 2, tmp_path)
        values = {("teacher", "urban", "i2t", 1): 50.0, ("teacher", "urban", "t2i", 1): 54.0,
                  ("teacher", "flickr", "i2t", 1): 1.0, ("teacher", "flickr", "t2i", 1): 1.0}
        add_retrieval_to_model_cards({"teacher": better}, _recall_table(values), params)
        assert client.get_model_version("tulip-teacher", "2").tags["long_r1"] == "52.00"
        assert client.get_registered_model("tulip-teacher").aliases == {"champion": 2}
        assert client.get_registered_model("tulip-expanded").aliases == {}
        # a worse one leaves it where it is
        worse = _tracked_model("expand", "tulip-expanded", 3, tmp_path)
        values = {("tulip_expanded", "urban", "i2t", 1): 45.0,
                  ("tulip_expanded", "urban", "t2i", 1): 45.0}
        add_retrieval_to_model_cards({"tulip_expanded": worse}, _recall_table(values), params)
        assert client.get_registered_model("tulip-teacher").aliases == {"champion": 2}
        assert client.get_registered_model("tulip-expanded").aliases == {}
    finally:
        mlflow.set_tracking_uri(None)


REPORT = "# Retrieval\n\n| model | R@1 |\n## Benchmarks\n\n- urban: 4 queries\n"


def test_the_parent_run_gets_the_headline_and_the_report(tmp_path, monkeypatch):
    from tulip_pipelines.pipelines.evaluate.nodes import log_evaluation

    uri = mlflow_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    params = {"benchmarks": {"urban": {"format": "urban1k", "root": "x", "kind": "long"},
                             "val": {"format": "sharegpt4v", "n": 2},  # long by default
                             "flickr": {"format": "flickr30k", "root": "y", "kind": "short"}}}
    metrics = _recall_table({("teacher", "urban", "i2t", 1): 20.0,
                             ("teacher", "urban", "t2i", 1): 30.0,
                             ("teacher", "val", "i2t", 1): 40.0,
                             ("teacher", "val", "t2i", 1): 50.0,
                             ("teacher", "flickr", "i2t", 1): 90.0,
                             ("teacher", "flickr", "t2i", 1): 90.0,
                             ("tulip_expanded", "urban", "i2t", 1): 70.0,
                             ("tulip_expanded", "urban", "t2i", 1): 80.0})
    by_tokens = pd.DataFrame({"benchmark": ["urban"] * 2, "model": ["teacher"] * 2,
                              "direction": ["i2t"] * 2, "tokens": [20, 77], "recall": [5.0, 20.0],
                              "n_queries": [4, 4]})
    torch.manual_seed(0)
    try:
        with mlflow.start_run(run_name="kedro-run") as parent:
            log_evaluation(params, metrics, REPORT, pd.DataFrame(
                columns=["benchmark", "item", "reason"]), by_tokens, pd.DataFrame(),
                pd.DataFrame(columns=SKIPPED_COLUMNS), create_teacher("TULIP-Tiny"))
        client = mlflow.MlflowClient()
        run = client.get_run(parent.info.run_id)
        assert run.data.metrics == {"long_r1/teacher": pytest.approx(35.0),  # urban and val
                                    "long_r1/tulip_expanded": pytest.approx(75.0)}
        assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
            "retrieval_report.md", "retrieval_report.png", "recall_by_tokens_read.png"}
        # its description in the UI: the recall table, not the sections below it
        assert run.data.tags["mlflow.note.content"] == "# Retrieval\n\n| model | R@1 |"
    finally:
        mlflow.set_tracking_uri(None)
