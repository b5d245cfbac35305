"""What the parent run of a ``kedro run`` and the stage runs show in MLflow besides metrics:
the parent run's name and readable tags, and each stage run's catalogued inputs as datasets
(the hooks of :mod:`tulip_pipelines.hooks`, the helpers of :mod:`tulip_pipelines.tracking`)."""

import hashlib
import json
import subprocess
from datetime import datetime, timezone

import mlflow
import pandas as pd
from kedro.io import DataCatalog
from kedro_datasets.pandas import ParquetDataset

from tulip_pipelines.data.images import PreparedImages
from tulip_pipelines.hooks import MlflowRunHooks, parent_run_tags, run_link
from tulip_pipelines.tracking.stage_runs import log_datasets, node_inputs, stage_run


def test_the_parent_run_is_named_for_what_ran_where_and_when(tmp_path):
    started = int(datetime(2026, 12, 7, 4, 31, 5, tzinfo=timezone.utc).timestamp() * 1000)
    runner = "<kedro.runner.sequential_runner.SequentialRunner object at 0x7f3a2c1d0e50>"
    tags = parent_run_tags({"pipeline_names": None, "env": None, "runner": runner},
                           started, tmp_path)
    assert tags == {"mlflow.runName": "default · local · 2026-12-07 04:31:05 UTC",
                    "runner": "SequentialRunner", "env": "local"}  # not a git checkout
    tags = parent_run_tags({"pipeline_names": ["distill", "expand"], "env": "sharegpt4v",
                            "runner": "ParallelRunner"}, started, tmp_path)
    assert tags["mlflow.runName"] == "distill+expand · sharegpt4v · 2026-12-07 04:31:05 UTC"
    assert (tags["runner"], tags["env"]) == ("ParallelRunner", "sharegpt4v")
    # KedroSession.run() without a runner records "None" and runs its SequentialRunner
    assert parent_run_tags({"runner": "None"}, started, tmp_path)["runner"] == "SequentialRunner"


def test_the_parent_run_names_the_git_commit_of_a_checkout(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("a")
    subprocess.run([*git, "-C", str(tmp_path), "add", "a.txt"], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-qm", "a"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    tags = parent_run_tags({"runner": None}, 0, tmp_path)
    assert tags["mlflow.source.git.commit"] == head and len(head) == 40


def _prepared(tmp_path, n_samples=3) -> PreparedImages:
    folder = tmp_path / "prepared_images"
    (folder / "shards").mkdir(parents=True)
    (folder / "index.json").write_text(json.dumps({"shardlist": [
        {"url": "shards/000000.tar", "nsamples": n_samples}]}))
    return PreparedImages(folder, {"n_samples": n_samples, "n_shards": 1, "size": 48})


def test_a_stage_run_logs_the_nodes_catalogued_inputs_as_its_datasets(tracking_uri, tmp_path):
    captions = pd.DataFrame({"id": ["a", "b"], "image": ["a.jpg", "b.jpg"],
                             "caption": ["A red square.", "A blue one."]})
    captions.to_parquet(tmp_path / "train_captions.parquet")
    catalog = DataCatalog({"train_captions": ParquetDataset(
        filepath=str(tmp_path / "train_captions.parquet"))})
    images = _prepared(tmp_path)
    hooks = MlflowRunHooks()
    # what Kedro hands the hook before the node: its inputs by catalog name (parameters skipped)
    hooks.before_node_run(None, catalog, {"train_captions": captions, "prepared_images": images,
                                          "params:distill": {"lr": 1.0}, "teacher_model": None})
    assert set(node_inputs()) == {"train_captions", "prepared_images", "teacher_model"}
    with stage_run("distill", {"lr": 1.0}) as tracker:
        pass
    hooks.after_node_run(None)
    assert node_inputs() == {}

    inputs = mlflow.get_run(tracker.run_id).inputs.dataset_inputs
    by_name = {d.dataset.name: d for d in inputs}
    assert set(by_name) == {"train_captions", "prepared_images"}  # not the model
    assert all(d.tags[0].value == "distill" for d in inputs)  # the context: the stage
    table = by_name["train_captions"].dataset
    assert json.loads(table.source)["uri"] == str(tmp_path / "train_captions.parquet")
    assert json.loads(table.profile)["num_rows"] == 2
    shards = by_name["prepared_images"].dataset
    expected = hashlib.sha256((images.folder / "index.json").read_bytes()).hexdigest()[:16]
    assert shards.digest == expected
    assert json.loads(shards.source)["uri"] == str(images.folder)
    assert json.loads(shards.profile) == {"num_rows": 3}


def test_the_digest_of_a_table_follows_its_content(tracking_uri):
    one = pd.DataFrame({"caption": ["A red square."]})
    with mlflow.start_run() as run:
        assert log_datasets({"a": (one, None), "b": (one.assign(caption="Another."), None),
                             "model": (object(), None)}, "distill") == 2
    digests = {d.dataset.name: d.dataset.digest
               for d in mlflow.get_run(run.info.run_id).inputs.dataset_inputs}
    assert digests["a"] != digests["b"]


def test_the_link_to_a_run_opens_it_in_the_model_training_view():
    assert run_link("http://mlflow.example.org:5000/", "3", "abc") == (
        "http://mlflow.example.org:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    local = run_link("sqlite:///mlflow.db", "1", "abc")
    assert local.startswith("http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType="
                            "machine_learning")
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in local
