"""What a stage's MLflow run holds, read back with mlflow.search_runs: flattened parameters, the
DeepSpeed config, per-step metrics, the checkpoint artifact and the lineage to its parent stage."""

import json
import socket

import mlflow
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import DS_FP32
from tulip_pipelines.models import create_teacher, save_model
from tulip_pipelines.pipelines.distill.nodes import distill
from tulip_pipelines.pipelines.expand.nodes import expand
from tulip_pipelines.serving.pyfunc import log_embedding_model
from tulip_pipelines.serving.registry import resolve_bundle
from tulip_pipelines.tracking.results import (
    log_model_card,
    recall_at_1_tags,
    update_registered_versions,
)
from tulip_pipelines.tracking.stage_runs import flatten, lineage, stage_run

TRAIN = {
    "max_steps": 3,
    "batch_size": 4,
    "lr": 1e-3,
    "log_every": 1,
    "val_every": 0,
    "checkpoint_every": 0,
}


@pytest.fixture
def captions(tmp_path):
    colours = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
    for c in colours:
        Image.new("RGB", (48, 48), c).save(tmp_path / f"{c}.png")
    return pd.DataFrame({"id": colours, "image": [f"{c}.png" for c in colours],
                         "caption": [f"A {c} picture. It is plain {c} all over." for c in colours]})


def test_flatten_nests_keys_and_truncates_long_values():
    flat = flatten(
        {"expand": {"train": {"lr": 1e-5}, "towers": ["image", "text"]}, "note": "x" * 300}
    )
    assert flat == {
        "expand.train.lr": "1e-05",
        "expand.towers": "['image', 'text']",
        "note": "x" * 250,
    }


def test_without_tracking_a_stage_logs_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    with stage_run("distill", {"loss_type": "cosine"}, DS_FP32) as tracker:
        assert tracker.run_id is None
        tracker.log({"train/loss": 1.0}, step=1)
        tracker.log_model(teacher, registered_model_name="tulip-distilled")  # nor registers
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    assert update_registered_versions("0" * 32, {"r1/x/y": "1.00"}) == 0


def test_lineage_of_untracked_and_pretrained_models():
    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    assert lineage(teacher) == ({}, {"init_model": "TULIP-Tiny:untracked"})
    teacher.spec.extra = {"pretrained": "openai"}
    assert lineage(teacher) == ({}, {"init_model": "TULIP-Tiny:openai"})
    teacher.spec.extra = {"mlflow_run_id": "abc"}
    assert lineage(teacher) == ({"tulip.parent_run_id": "abc"}, {"init_model": "runs:/abc/model"})


def test_stage_runs_hold_params_metrics_model_and_lineage(tracking_uri, captions, tmp_path):
    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    distill_params = {"run_dir": str(tmp_path / "distill"), "train": TRAIN, "loss_type": "mse",
                      "teacher_embeddings": "live", "registered_model_name": None}
    expand_params = {"run_dir": str(tmp_path / "expand"), "train": TRAIN}
    no_val = captions.iloc[:0]
    with mlflow.start_run(run_name="kedro-run") as parent:  # what kedro-mlflow opens around a run
        distilled, _, _, _ = distill(teacher, None, captions, no_val, distill_params, DS_FP32,
                                  str(tmp_path))
        expanded, history, _, _ = expand(distilled, teacher, captions, no_val, expand_params,
                                      DS_FP32, str(tmp_path))

    runs = mlflow.search_runs(search_all_experiments=True)
    by_stage = {
        r["tags.tulip.stage"]: r for _, r in runs.dropna(subset=["tags.tulip.stage"]).iterrows()
    }
    assert set(by_stage) == {"distill", "expand"}
    dist, exp = by_stage["distill"], by_stage["expand"]
    assert dist["tags.mlflow.parentRunId"] == exp["tags.mlflow.parentRunId"] == parent.info.run_id
    assert exp["tags.mlflow.runName"] == "expand"

    # lineage: the distilled model names its run, and the expand run names it back
    assert distilled.spec.extra["mlflow_run_id"] == dist["run_id"]
    assert expanded.spec.extra["mlflow_run_id"] == exp["run_id"]
    assert exp["tags.tulip.parent_run_id"] == dist["run_id"]
    assert exp["params.init_model"] == f"runs:/{dist['run_id']}/model"
    assert dist["params.init_model"] == "TULIP-Tiny:untracked"
    assert "tags.tulip.parent_run_id" not in runs or pd.isna(dist["tags.tulip.parent_run_id"])

    # flattened parameters without the stage prefix (the same key in both stage runs), and the
    # DeepSpeed config
    assert dist["params.loss_type"] == "mse"
    assert exp["params.long_weight"] == "0.8"
    assert exp["params.train.batch_size"] == dist["params.train.batch_size"] == "4"
    assert not [c for c in runs.columns if c.startswith(("params.distill.", "params.expand."))]
    assert exp["params.deepspeed.zero_optimization.stage"] == "0"
    client = mlflow.MlflowClient()
    ds_path = client.download_artifacts(
        exp["run_id"], "deepspeed_config.json", str(tmp_path / "dl")
    )
    with open(ds_path) as f:
        assert json.load(f) == DS_FP32

    # per-step curves, the loss named after its kind (a distillation distance and a contrastive
    # loss never share a chart); no final/* copies of them
    losses = client.get_metric_history(exp["run_id"], "train/loss_contrastive")
    assert [m.step for m in losses] == [1, 2, 3]
    assert [m.value for m in losses] == pytest.approx(history["loss"].tolist())
    assert len(client.get_metric_history(dist["run_id"], "train/loss_distill_mse")) == 3
    assert (exp["tags.tulip.loss"], dist["tags.tulip.loss"]) == ("contrastive", "distill_mse")
    assert "metrics.train/loss" not in runs or runs["metrics.train/loss"].isna().all()
    assert {m.step for m in client.get_metric_history(exp["run_id"], "train/lr")} == {1, 2, 3}
    assert client.get_metric_history(exp["run_id"], "train/samples_per_s")[0].value > 0
    assert not [c for c in runs.columns if c.startswith("metrics.final")]

    # the model directory and the loss curve as artifacts
    artifacts = {a.path for a in client.list_artifacts(exp["run_id"])}
    assert {"model", "expand_loss.png", "deepspeed_config.json"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(exp["run_id"], "model")}
    assert {"model/model.safetensors", "model/config.json"} <= model_files
    config_path = client.download_artifacts(
        exp["run_id"], "model/config.json", str(tmp_path / "dl")
    )
    with open(config_path) as f:
        config = json.load(f)
    assert config["kind"] == "rope" and config["extra"]["mlflow_run_id"] == exp["run_id"]

    # the model card travels with the model: it names the parent run, the data and the losses
    assert "model/MODEL_CARD.md" in model_files
    assert exp["tags.tulip.model_card"] == "model/MODEL_CARD.md"
    card = open(client.download_artifacts(exp["run_id"], "model/MODEL_CARD.md",
                                          str(tmp_path / "dl"))).read()
    assert f"Parent model: the `distill` model (TULIP-Tiny) from MLflow run `{dist['run_id']}`" \
        in card
    assert f"MLflow run: `{exp['run_id']}`, within the `kedro run` MLflow run " \
           f"`{parent.info.run_id}`" in card
    assert "| train records | 8 |" in card and "| val records | 0 |" in card
    assert ("3 optimizer steps of 4 samples (global batch): 12 samples seen "
            "(1.5 x the train records)") in card
    assert f"| train/loss | {history['loss'].iloc[-1]:.4g} |" in card
    assert "| long_weight | 0.8 |" in card and "run_dir" not in card
    training = expanded.spec.extra["training"]
    assert training["records"] == {"train": 8, "val": 0} and training["steps"] == 3
    assert expanded.spec.extra["parent"]["mlflow_run_id"] == dist["run_id"]
    assert distilled.spec.extra["parent"]["source"] == "TULIP-Tiny:untracked"

    # both are pyfunc MLflow models; expand's is registered under its default name (version 1,
    # from the expand run, the card as its description); distill's name is null: not registered
    logged = mlflow.search_logged_models(experiment_ids=[exp["experiment_id"]],
                                         output_format="list")
    assert sorted((m.name, m.source_run_id) for m in logged) == [
        ("distill", dist["run_id"]), ("expand", exp["run_id"])]
    assert [m.name for m in client.search_registered_models()] == ["tulip-expanded"]
    (version,) = client.search_model_versions("name='tulip-expanded'")
    assert str(version.version) == "1" and version.run_id == exp["run_id"]
    assert version.description == card
    # the registered model says what it is; the experiment opens on its runs in the UI
    registered = client.get_registered_model("tulip-expanded")
    assert registered.tags == {"stage": "expand", "base_model": expanded.spec.model_name,
                               "context_length": "248"}
    assert "`expand` stage" in registered.description and "@champion" in registered.description
    assert client.get_experiment(exp["experiment_id"]).tags["mlflow.experimentKind"] == \
        "custom_model_development"
    # models:/ and runs:/ URIs load the same weights as the model directory
    for uri in ("models:/tulip-expanded/latest", "models:/tulip-expanded/1",
                f"runs:/{exp['run_id']}/model"):
        loaded = resolve_bundle(uri)
        assert loaded.spec.kind == "rope" and loaded.spec.context_length == 248
        state = loaded.model.state_dict()
        for key, value in expanded.model.state_dict().items():
            assert torch.equal(state[key], value), (uri, key)
    with pytest.raises(ValueError, match="no registered model 'tulip-distilled'.*"
                                         "registered: tulip-expanded"):
        resolve_bundle("models:/tulip-distilled/latest")
    with pytest.raises(ValueError, match=r"no version 2; versions: \[1\]"):
        resolve_bundle("models:/tulip-expanded/2")


def test_evaluation_tags_the_registered_version_with_its_r1_rows(tracking_uri, tmp_path,
                                                                 monkeypatch):
    torch.manual_seed(0)
    save_model(create_teacher("TULIP-Tiny"), tmp_path / "model")
    connect = socket.socket.connect

    def local_only(sock, address):  # logging and registering a model reach no network
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network connection to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    with mlflow.start_run(run_name="teacher") as run:
        log_embedding_model(tmp_path / "model", registered_model_name="tulip-teacher")
    with mlflow.start_run(run_name="other"):  # another run's version is left alone
        log_embedding_model(tmp_path / "model", registered_model_name="tulip-other")
    metrics = pd.DataFrame({
        "benchmark": ["urban1k_demo"] * 4 + ["flickr30k_demo"] * 2,
        "model": ["teacher"] * 6,
        "direction": ["text_to_image", "image_to_text"] * 3,
        "k": [1, 1, 5, 5, 1, 5],
        "recall": [23.456, 31.0, 70.0, 75.0, 12.5, 40.0],
    })
    tags = recall_at_1_tags(metrics)
    assert tags == {"r1/urban1k_demo/text_to_image": "23.46",
                    "r1/urban1k_demo/image_to_text": "31.00",
                    "r1/flickr30k_demo/text_to_image": "12.50"}
    assert update_registered_versions(run.info.run_id, tags, "card with retrieval rows") == 1
    client = mlflow.MlflowClient()
    version = client.get_model_version("tulip-teacher", "1")
    assert {k: v for k, v in version.tags.items() if k.startswith("r1/")} == tags
    assert version.description == "card with retrieval rows"
    assert not any(k.startswith("r1/") for k in client.get_model_version("tulip-other", "1").tags)
    assert update_registered_versions(None, tags) == 0


def test_an_updated_model_card_replaces_the_one_in_the_runs_model_artifact(
    tracking_uri, tmp_path, caplog
):
    with mlflow.start_run(run_name="expand") as run:
        mlflow.log_text("first card", "model/MODEL_CARD.md")
    card = tmp_path / "MODEL_CARD.md"
    card.write_text("card with retrieval rows")
    assert log_model_card(card, run.info.run_id)
    path = mlflow.MlflowClient().download_artifacts(run.info.run_id, "model/MODEL_CARD.md",
                                                    str(tmp_path / "dl"))
    assert open(path).read() == "card with retrieval rows"
    assert not log_model_card(card, None)
    assert not log_model_card(card, "0" * 32)  # not a run of this store: a log line, no error
    assert "not logged to run" in caplog.text


def test_a_stage_run_records_system_metrics_while_it_runs(tracking_uri, monkeypatch):
    """CPU and memory every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (GPU ones where
    nvidia-ml-py finds a GPU), with no code of the stage's own."""
    import time

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with stage_run("distill", {"lr": 1.0}) as tracker:
        time.sleep(1.5)
    metrics = mlflow.MlflowClient().get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert metrics["system/system_memory_usage_megabytes"] > 0
    history = mlflow.MlflowClient().get_metric_history(tracker.run_id,
                                                       "system/cpu_utilization_percentage")
    assert len(history) >= 2  # sampled over the run, not once


def test_logging_a_model_leaves_the_random_numbers_as_they_were(tracking_uri):
    """Tracking on or off, what runs after a stage draws the same random numbers (logging the
    MLflow model loads it, which initialises a model before reading its weights)."""
    bundle = create_teacher("TULIP-Tiny")
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with stage_run("teacher", {}) as tracker:
        tracker.log_model(bundle, registered_model_name="tulip-teacher")
    assert torch.equal(torch.rand(3), expected)
