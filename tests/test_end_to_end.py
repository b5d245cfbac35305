"""The whole method on the embedded default, end to end, in a copy of the project.

One ``kedro run`` (the module fixture ``default_run``) serves every test here: each asserts one
property of its outputs. The first asserts the method's effect on the held-out long-caption demo
benchmark (Urban1k layout): a 77-token teacher can only find an image's group, the expanded TULIP
student finds the image. The run goes through prepare_images: training and evaluation read the
prepared shards.
"""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from tests.conftest import copy_project
from tulip_pipelines.models import load_bundle
from tulip_pipelines.pipeline_registry import register_pipelines
from tulip_pipelines.serving.registry import resolve_bundle

pytestmark = pytest.mark.slow

# Smaller than `make run` so that the suite stays within its budget; the effect must hold anyway
# (at these budgets, on 2026-12-07: the teacher 20.0 / 19.5 R@1 on urban1k_demo, near the 25 a
# 77-token reader gets by finding the group, the expanded student 79.0 / 81.5, where the test
# asks for 25 points more). Long-CLIP's authors recipe only has to run here; equal_budget
# trains with expand's budget.
RUNTIME_PARAMS = {
    "teacher": {"train": {"max_steps": 150, "val_every": 0, "checkpoint_every": 75}},
    "distill": {"train": {"max_steps": 80, "val_every": 0, "checkpoint_every": 0}},
    "expand": {"train": {"max_steps": 50, "val_every": 0, "checkpoint_every": 0}},
    "longclip": {"authors": {"train": {"max_steps": 10, "warmup_steps": 3, "val_every": 0,
                                       "checkpoint_every": 0}}},
    # two prompts a class instead of open_clip's 80 ImageNet templates: the class folder is
    # scored the same way, with 40 times fewer texts to encode
    "evaluate": {"benchmarks": {"classes_demo": {"templates": ["a photo of a {}.",
                                                              "a grid of {} cells."]}}},
}


@pytest.fixture(scope="module")
def default_run(project_root, tmp_path_factory):
    """The project directory after one ``kedro run`` of the default pipeline."""
    project = copy_project(project_root, tmp_path_factory.mktemp("e2e") / "project")
    mp = pytest.MonkeyPatch()
    mp.chdir(project)
    mp.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    # the project's own store, by absolute path: mlflow caches one store per URI in a process,
    # so the relative default (sqlite:///mlflow.db) would reuse an earlier test project's file
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project, runtime_params=RUNTIME_PARAMS) as session:
            session.run()
        yield project
    finally:
        mp.undo()


def test_default_run_shows_tulip_beating_the_teacher_on_long_captions(default_run):
    project = default_run
    metrics = pd.read_parquet(project / "data/08_reporting/retrieval_metrics.parquet")
    assert list(metrics.columns)[:6] == ["benchmark", "model", "direction", "k", "recall",
                                         "n_queries"]
    assert set(metrics["model"]) == {"teacher", "longclip_stretched", "longclip_authors",
                                     "longclip_equal_budget", "tulip_distilled", "tulip_expanded"}
    r1 = metrics[(metrics["benchmark"] == "urban1k_demo") & (metrics["k"] == 1)].set_index(
        ["model", "direction"]
    )["recall"]
    for direction in ("i2t", "t2i"):
        gain = r1["tulip_expanded", direction] - r1["teacher", direction]
        assert gain >= 25, (
            f"{direction}: expanded {r1['tulip_expanded', direction]:.1f} "
            f"vs teacher {r1['teacher', direction]:.1f}"
        )
    assert (project / "data/08_reporting/retrieval_report.png").stat().st_size > 0
    assert "urban1k_demo" in (project / "data/08_reporting/retrieval_report.md").read_text()


def test_default_run_compares_every_model_on_the_demo_class_folder(default_run):
    project = default_run
    metrics = pd.read_parquet(project / "data/08_reporting/classification_metrics.parquet")
    assert set(metrics["benchmark"]) == {"classes_demo"}
    assert sorted(metrics.groupby("model")["k"].apply(sorted).tolist()) == [[1, 5]] * 6
    assert set(metrics["model"]) == {"teacher", "longclip_stretched", "longclip_authors",
                                     "longclip_equal_budget", "tulip_distilled", "tulip_expanded"}
    assert (metrics["n_images"] == 80).all() and (metrics["n_classes"] == 8).all()
    # every model is at least as good within its top 5 as at top 1 (the same ranking)
    top = metrics.pivot_table(index="model", columns="k", values="accuracy")
    assert (top[5] >= top[1]).all()
    report = (project / "data/08_reporting/retrieval_report.md").read_text()
    assert "# Zero-shot classification" in report and "| classes_demo" in report


def test_default_run_prepares_the_images_and_trains_and_evaluates_on_the_shards(default_run):
    project = default_run
    described = json.loads((project / "data/05_model_input/prepared_images.json").read_text())
    assert described["kind"] == "prepared" and described["size"] == 48  # TULIP-Tiny's input
    n_records = sum(len(pd.read_parquet(project / f"data/05_model_input/{split}_captions.parquet"))
                    for split in ("train", "val"))
    rejected = pd.read_parquet(project / "data/02_intermediate/rejected_images.parquet")
    assert described["n_records"] == n_records == described["n_samples"] + len(rejected)
    assert rejected.empty  # the demo's images are all readable
    prepared = project / described["folder"]
    index = json.loads((prepared / "index.json").read_text())
    assert sum(shard["nsamples"] for shard in index["shardlist"]) == n_records
    assert len(list((prepared / "shards").glob("*.tar"))) == described["n_shards"] > 1
    # every training stage and the evaluation read that source
    readers = {node.name for node in register_pipelines()["__default__"].nodes
               if "prepared_images" in node.inputs}
    assert readers == {"train_teacher", "distill_relative_positions", "expand_context",
                       "finetune_longclip_authors", "finetune_longclip_equal_budget",
                       "load_retrieval_benchmarks"}


def test_default_run_shows_the_teacher_flat_past_77_tokens_and_tulip_still_rising(default_run):
    reporting = default_run / "data/08_reporting"
    by_tokens = pd.read_parquet(reporting / "recall_by_tokens_read.parquet")
    assert list(by_tokens.columns) == ["benchmark", "model", "direction", "tokens", "recall",
                                       "n_queries"]
    assert set(by_tokens["benchmark"]) == {"urban1k_demo", "sharegpt4v_val"}  # the long ones
    assert set(by_tokens["tokens"]) == {20, 40, 77, 120, 160, 200, 248}
    r1 = by_tokens[by_tokens["benchmark"] == "urban1k_demo"].set_index(
        ["model", "direction", "tokens"])["recall"].sort_index()
    for direction in ("i2t", "t2i"):
        teacher = r1["teacher", direction]
        assert (teacher.loc[77:] == teacher[77]).all(), teacher.to_dict()  # reads 77 at most
        student = r1["tulip_expanded", direction]
        assert student[120] > student[77], student.to_dict()
        assert student[248] >= student[77] + 25, student.to_dict()
    assert (reporting / "recall_by_tokens_read.png").stat().st_size > 0

    by_length = pd.read_parquet(reporting / "recall_by_caption_length.parquet")
    assert by_length.groupby(["benchmark", "model", "direction"])["bin"].nunique().le(4).all()
    metrics = pd.read_parquet(reporting / "retrieval_metrics.parquet")
    assert ((metrics["ci_low"] <= metrics["recall"]) & (metrics["recall"] <= metrics["ci_high"])
            ).all()
    report = (reporting / "retrieval_report.md").read_text()
    assert "## Recall@1 against the tokens read" in report and "by caption length" in report


def test_every_model_directory_has_a_card_naming_its_parent_run(default_run):
    models = default_run / "data/06_models"
    directories = sorted(p.parent for p in models.rglob("model.safetensors"))
    assert {"teacher_model", "distilled_model", "expanded_model"} <= {d.name for d in directories}
    run_of = {}
    for directory in directories:
        card = (directory / "MODEL_CARD.md").read_text()
        extra = json.loads((directory / "config.json").read_text())["extra"]
        run_of[directory.name] = extra["mlflow_run_id"]
        assert f"MLflow run: `{extra['mlflow_run_id']}`" in card
        if extra.get("parent"):
            assert f"Parent MLflow run: `{extra['parent']['mlflow_run_id']}`" in card
        else:
            assert "Parent model: none, trained from scratch. Parent MLflow run: none." in card
        assert "| urban1k_demo" in card, f"{directory}: no retrieval rows in its card"
    parents = {d.name: json.loads((d / "config.json").read_text())["extra"]["parent"]
               for d in directories}
    assert parents["expanded_model"]["mlflow_run_id"] == run_of["distilled_model"]
    assert parents["distilled_model"]["mlflow_run_id"] == run_of["teacher_model"]
    # the model artifact of the expand run holds the card with its retrieval rows too (the
    # pyfunc models' copies, under mlartifacts/<experiment>/models/, keep the card they were
    # logged with: their registered versions get the new one as description)
    logged = [p.read_text() for p in (default_run / "mlartifacts").rglob("model/MODEL_CARD.md")
              if "models" not in p.relative_to(default_run / "mlartifacts").parts]
    expand = [c for c in logged if f"MLflow run: `{run_of['expanded_model']}`" in c]
    assert len(expand) == 1 and "| urban1k_demo" in expand[0]


def test_default_run_registers_five_models_tagged_with_their_r1_rows(default_run):
    """Every trained model is a registered MLflow model; evaluate tags its version with its R@1
    rows (and its card); models:/ URIs load the exported weights."""
    metrics = pd.read_parquet(default_run / "data/08_reporting/retrieval_metrics.parquet")
    mp = pytest.MonkeyPatch()
    mp.chdir(default_run)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{default_run / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        registered = {m.name for m in client.search_registered_models()}
        assert registered == {"tulip-teacher", "tulip-distilled", "tulip-expanded",
                              "longclip-authors", "longclip-equal-budget"}
        evaluated = {"tulip-teacher": ("teacher", "teacher_model"),
                     "tulip-distilled": ("tulip_distilled", "distilled_model"),
                     "tulip-expanded": ("tulip_expanded", "expanded_model"),
                     "longclip-authors": ("longclip_authors", "longclip_authors_model"),
                     "longclip-equal-budget": ("longclip_equal_budget",
                                               "longclip_equal_budget_model")}
        for name, (model, directory) in evaluated.items():
            (version,) = client.search_model_versions(f"name='{name}'")
            config = json.loads((default_run / "data/06_models" / directory / "config.json")
                                .read_text())
            assert version.run_id == config["extra"]["mlflow_run_id"], name
            rows = metrics[(metrics["model"] == model) & (metrics["k"] == 1)]
            assert len(rows) >= 4
            for row in rows.itertuples():
                tag = version.tags[f"r1/{row.benchmark}/{row.direction}"]
                assert float(tag) == pytest.approx(row.recall, abs=0.006), (name, row)
            assert "| urban1k_demo" in version.description
        loaded = resolve_bundle("models:/tulip-expanded/latest")
        exported = load_bundle(default_run / "data/06_models/expanded_model")
        for key, value in exported.model.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[key], value), key
    finally:
        mp.undo()


TRAINED = {"teacher": "tulip-teacher", "distill": "tulip-distilled", "expand": "tulip-expanded",
           "longclip_authors": "longclip-authors",
           "longclip_equal_budget": "longclip-equal-budget"}


def test_default_run_reads_in_mlflow_as_a_model_training_experiment(default_run):
    """The store the way MLflow's API gives it back: the experiment's kind, the parent run's
    name, tags, headline and report, each stage run's own recall under the same names, params
    without the stage prefix, datasets, its logged model named after it, the registered models
    described and tagged, and @champion on the best long-caption version."""
    client = mlflow.MlflowClient(f"sqlite:///{default_run / 'mlflow.db'}")
    runs = default_run_in_mlflow(client)
    parent, stages = runs["parent"], runs["stages"]
    assert runs["experiment"].tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.info.run_name.startswith("default · local · ")
    assert parent.data.tags["runner"] == "SequentialRunner"
    assert parent.data.tags["env"] == "local"
    metrics = pd.read_parquet(default_run / "data/08_reporting/retrieval_metrics.parquet")
    accuracy = pd.read_parquet(default_run / "data/08_reporting/classification_metrics.parquet")
    long_r1 = metrics[(metrics["k"] == 1)
                      & metrics["benchmark"].isin(["urban1k_demo", "sharegpt4v_val"])]
    expected = long_r1.groupby("model")["recall"].mean()
    assert parent.data.metrics == pytest.approx({f"long_r1/{m}": v for m, v in expected.items()})
    assert {"retrieval_report.md", "retrieval_report.png", "recall_by_tokens_read.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "distill.train.lr" in parent.data.params  # the parent keeps the prefixed set

    names = None
    for stage, run in stages.items():
        model = {"distill": "tulip_distilled", "expand": "tulip_expanded"}.get(stage, stage)
        own = metrics[metrics["model"] == model]
        evals = {k: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
        expected = {f"eval/{r.benchmark}/{r.direction}_r{r.k}": r.recall
                    for r in own.itertuples()}
        # and its zero-shot accuracy on the demo class folder, under the same names
        expected.update({f"eval/{r.benchmark}/top{r.k}": r.accuracy
                         for r in accuracy[accuracy["model"] == model].itertuples()})
        assert evals == pytest.approx(expected), stage
        names = names or set(evals)
        assert set(evals) == names  # the same names in every stage run
        assert not [k for k in run.data.metrics if k.startswith("final")]
        assert "train.lr" in run.data.params and not any(
            k.startswith(f"{stage}.") for k in run.data.params)
        loss = run.data.tags["tulip.loss"]
        assert f"train/loss_{loss}" in run.data.metrics and "train/loss" not in run.data.metrics
        datasets = {d.dataset.name for d in run.inputs.dataset_inputs}
        assert {"train_captions", "prepared_images"} <= datasets, (stage, datasets)
        logged = mlflow.search_logged_models(experiment_ids=[runs["experiment"].experiment_id],
                                             filter_string=f"source_run_id = '{run.info.run_id}'",
                                             output_format="list")
        assert [m.name for m in logged] == [stage]
        registered = client.get_registered_model(TRAINED[stage])
        assert registered.tags["stage"] == stage and registered.description
        assert registered.tags["context_length"] == ("77" if stage == "teacher" else "248")
    best = max(TRAINED.values(), key=lambda name: float(
        client.get_model_version(name, "1").tags["long_r1"]))
    assert client.get_registered_model(best).aliases == {"champion": 1}
    assert sum("champion" in m.aliases for m in client.search_registered_models()) == 1


def default_run_in_mlflow(client) -> dict:
    """The experiment, the parent run of the default ``kedro run`` and its five training stage
    runs by stage."""
    experiment = client.get_experiment_by_name("tulip_pipelines")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parent = next(r for r in runs if r.info.run_name.startswith("default · "))
    stages = {r.data.tags["tulip.stage"]: r for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
              and r.data.tags.get("tulip.stage") in TRAINED}
    assert set(stages) == set(TRAINED)
    champion = [m.name for m in client.search_registered_models() if "champion" in m.aliases]
    return {"experiment": experiment, "parent": parent, "stages": stages,
            "champion": champion[0] if champion else None}


def test_mlflow_ui_in_a_browser_shows_the_run_the_models_side_by_side_and_the_champion(
        default_run, tmp_path):
    """What a user sees in MLflow's UI over the run's store, in headless Chromium."""
    check_mlflow_ui(default_run, tmp_path)


def check_mlflow_ui(project: Path, out: Path) -> None:
    """The experiment opens on its runs table (MLflow 3.17's own switch, ``workflowType``, is a
    setting of the browser whose default is GenAI: the link the README gives names it); the
    parent run shows its name and headline metrics; the compare page puts the five stage runs'
    recalls side by side; the registered models list the five names and the @champion alias."""
    from tests.browser import chromium_page, mlflow_ui, screenshot

    store = f"sqlite:///{project / 'mlflow.db'}"
    found = default_run_in_mlflow(mlflow.MlflowClient(store))
    experiment_id = found["experiment"].experiment_id
    parent, stages = found["parent"], found["stages"]
    ml = "workflowType=machine_learning"
    with mlflow_ui(store, project, out / "mlflow_ui.log") as url, chromium_page() as page:
        page.goto(f"{url}/#/experiments/{experiment_id}?{ml}")
        page.wait_for_url(f"**/experiments/{experiment_id}/runs**")
        page.get_by_text(parent.info.run_name).first.wait_for()
        page.get_by_role("columnheader", name="Run Name").first.wait_for()
        _close_assistant(page)
        # the parent's row unfolds into its stage runs
        page.get_by_role("row").filter(has_text=parent.info.run_name).get_by_role(
            "button").first.click()
        for stage, registered in TRAINED.items():
            page.get_by_role("row").filter(has_text=stage).first.wait_for()
            page.get_by_text(registered, exact=True).first.wait_for()  # the Models column
        # the Datasets column: each stage run's caption table
        assert page.get_by_text("train_captions").count() == len(TRAINED)
        screenshot(page, out, "mlflow_runs")

        page.goto(f"{url}/#/experiments/{experiment_id}/runs/{parent.info.run_id}?{ml}")
        page.get_by_role("heading", name=parent.info.run_name).first.wait_for()
        for name in parent.data.metrics:
            page.get_by_text(name, exact=True).first.wait_for()
        _close_assistant(page)
        screenshot(page, out, "mlflow_parent_run")

        ids = json.dumps([stages[s].info.run_id for s in TRAINED])
        page.goto(f"{url}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment_id])}"
                  f"&{ml}")
        page.get_by_text("Comparing 5 Runs").first.wait_for()
        for stage in TRAINED:
            page.get_by_text(stage, exact=True).first.wait_for()
        metric = next(k for k in stages["expand"].data.metrics if k.startswith("eval/"))
        page.get_by_text(metric, exact=True).first.wait_for()
        _close_assistant(page)
        for section in ("Visualizations", "Parameters"):  # folded: run names above recalls
            page.get_by_text(section, exact=True).first.click()
        page.get_by_text(metric, exact=True).first.wait_for()
        screenshot(page, out, "mlflow_compare")

        page.goto(f"{url}/#/models?{ml}")
        for name in TRAINED.values():
            page.get_by_text(name, exact=True).first.wait_for()
        _close_dialog(page)
        rows = page.get_by_role("row")
        champion = rows.filter(has_text=found["champion"]).filter(has_text="champion")
        champion.first.wait_for()
        assert rows.filter(has_text="champion").count() == 1
        screenshot(page, out, "mlflow_models")


def _close_dialog(page) -> None:
    """Dismiss a "what's new" dialog if one opened over the page."""
    dialog = page.get_by_role("dialog")
    if dialog.count():
        dialog.get_by_role("button", name="Close").first.click()
        dialog.first.wait_for(state="hidden")


def _close_assistant(page) -> None:
    """Fold the MLflow Assistant side panel away (it takes a third of the page)."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
