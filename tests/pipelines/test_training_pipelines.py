"""A few steps of teacher, distill, expand and longclip on tiny demo data prepared into shards
by prepare_images, tracked in MLflow."""

import mlflow
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner

from tests.conftest import DS_FP32, mlflow_store
from tulip_pipelines.data.demo import DemoDataParams, generate_demo_data
from tulip_pipelines.data.images import PreparedImages
from tulip_pipelines.io.images import ImageSourceDataset
from tulip_pipelines.io.models import ModelDataset
from tulip_pipelines.io.teacher_embeddings import (
    TeacherTextEmbeddingsDataset,
    TeacherTextEmbeddingsProgressDataset,
)
from tulip_pipelines.models import stretch_position_embedding
from tulip_pipelines.pipeline_registry import register_pipelines
from tulip_pipelines.pipelines.distill.nodes import distill
from tulip_pipelines.pipelines.expand.nodes import expand
from tulip_pipelines.pipelines.longclip.nodes import finetune_longclip_equal_budget

STAGES = ("teacher", "distill", "expand", "longclip_authors", "longclip_equal_budget")
registry = register_pipelines()


def _train(steps, lr):
    return {
        "max_steps": steps,
        "batch_size": 16,
        "lr": lr,
        "warmup_steps": 2,
        "log_every": 2,
        "val_every": 0,
        "checkpoint_every": 0,
        "seed": 0,
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo = generate_demo_data(
        DemoDataParams(n_groups=12, n_benchmark_groups=0, n_short_benchmark_images=0)
    )
    for key, image in demo.images.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / f"{key}.png")
    captions = pd.DataFrame({
        "id": [r["id"] for r in demo.records],
        "image": [r["image"] for r in demo.records],
        "caption": [r["conversations"][1]["value"] for r in demo.records],
    })
    return {"root": str(root), "train": captions.iloc[8:], "val": captions.iloc[:8],
            "shuffled": demo.shuffled_captions}


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    uri = mlflow_store(tmp_path_factory.mktemp('mlflow') / "mlflow.db")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mp.undo()
    mlflow.set_tracking_uri(None)


def _falls(history: pd.DataFrame) -> bool:
    first, last = history["loss"].iloc[0], history["loss"].iloc[-3:].mean()
    return last < first


@pytest.mark.slow
def test_stages_train_reduce_loss_save_and_track(data, tmp_path, tracking):
    """The four training pipelines through Kedro's runner, as ``kedro run`` wires them: catalog
    inputs and parameters in, images read from the shards of prepare_images, models saved and
    loaded through their catalog datasets."""
    pipeline = sum((registry[name] for name in ("prepare_images", "teacher", "distill", "expand",
                                                "longclip")), Pipeline([]))
    catalog = DataCatalog(datasets={
        f"{name}_model": ModelDataset(str(tmp_path / f"{name}_model"))
        for name in ("teacher", "distilled", "expanded", "longclip_authors",
                     "longclip_equal_budget")})
    catalog["prepared_images"] = ImageSourceDataset(str(tmp_path / "prepared_images.json"))
    cache = str(tmp_path / "teacher_text_embeddings")
    catalog["teacher_text_embeddings"] = TeacherTextEmbeddingsDataset(cache)
    catalog["teacher_text_embeddings_progress"] = TeacherTextEmbeddingsProgressDataset(cache)
    catalog["train_captions"] = data["train"]
    catalog["val_captions"] = data["val"]
    catalog["demo_shuffled_captions"] = data["shuffled"]
    catalog["params:image_root"] = data["root"]
    catalog["params:teacher_model_name"] = "TULIP-Tiny"
    catalog["params:prepare_images"] = {"output_dir": str(tmp_path / "prepared"),
                                        "shard_size": 16, "num_workers": 0}
    catalog["params:deepspeed"] = DS_FP32
    for stage, train in (("teacher", _train(24, 5e-4)), ("distill", _train(16, 2e-3)),
                         ("expand", _train(12, 5e-4))):
        catalog[f"params:{stage}"] = {"run_dir": str(tmp_path / "runs" / stage), "train": train}
    catalog["params:longclip"] = {
        "authors": {"run_dir": str(tmp_path / "runs" / "longclip_authors"),
                    "short_image_components": 8, "label_smoothing": 0.1,
                    "init_logit_scale": 4.6052, "max_logit_scale": None,
                    "train": {**_train(12, 5e-4), "weight_decay": 0.01,
                              "decay_biases_and_norms": True}},
        "equal_budget": {"run_dir": str(tmp_path / "runs" / "longclip_equal_budget")}}
    outputs = SequentialRunner().run(pipeline, catalog)  # name -> dataset

    histories = {stage: outputs[f"{stage}_history"].load() for stage in STAGES}
    assert all(_falls(h) for h in histories.values())
    budget = histories["expand"]["step"].max()
    assert histories["longclip_equal_budget"]["step"].max() == budget
    student = ModelDataset(str(tmp_path / "distilled_model")).load()
    assert student.spec.kind == "rope" and student.spec.context_length == 248
    teacher = ModelDataset(str(tmp_path / "teacher_model")).load()
    stretched = stretch_position_embedding(teacher, 248, 20).model.positional_embedding
    for name in ("longclip_authors", "longclip_equal_budget"):
        longclip = ModelDataset(str(tmp_path / f"{name}_model")).load()
        assert longclip.spec.kind == "absolute" and longclip.spec.context_length == 248
        positions = longclip.model.positional_embedding
        assert torch.equal(positions[:20], stretched[:20])  # kept rows frozen, bit for bit
        assert not torch.equal(positions[20:], stretched[20:])  # the others trained
    assert ModelDataset(str(tmp_path / "expanded_model")).load().spec.kind == "rope"
    prepared = catalog.load("prepared_images")
    assert isinstance(prepared, PreparedImages) and prepared.info["n_samples"] == 48
    assert outputs["rejected_images"].load().empty

    runs = mlflow.search_runs(search_all_experiments=True)
    by_stage = {r["tags.tulip.stage"]: r for _, r in runs.iterrows()}
    assert set(by_stage) == set(STAGES)
    exp = by_stage["expand"]
    assert exp["tags.tulip.parent_run_id"] == by_stage["distill"]["run_id"]  # lineage
    assert by_stage["distill"]["tags.tulip.parent_run_id"] == by_stage["teacher"]["run_id"]
    assert (
        exp["params.long_weight"] == "0.8"
        and exp["params.deepspeed.zero_optimization.stage"] == "0"
    )
    assert not [c for c in runs.columns if c.startswith("metrics.final")]
    client = mlflow.MlflowClient()
    history = client.get_metric_history(exp["run_id"], "train/loss_contrastive")
    assert len(history) >= 5 and history[0].step < history[-1].step
    artifacts = {a.path for a in client.list_artifacts(exp["run_id"], "model")}
    assert {"model/model.safetensors", "model/config.json"} <= artifacts
    # the artifacts and params in detail: tests/test_tracking.py


def test_bad_stage_parameters_fail_before_training(data):
    with pytest.raises(ValueError, match="unknown distill parameter"):
        distill(None, None, data["train"], data["val"], {"lossType": "cosine"}, DS_FP32,
                data["root"])
    with pytest.raises(ValueError, match="loss_type"):
        distill(None, None, data["train"], data["val"], {"loss_type": "kl"}, DS_FP32,
                data["root"])
    with pytest.raises(ValueError, match="unknown train parameter"):
        expand(None, None, data["train"], data["val"], {"train": {"steps": 3}}, DS_FP32,
               data["root"])
    with pytest.raises(ValueError, match="come from expand"):
        finetune_longclip_equal_budget(None, data["train"], data["val"],
                                       {"equal_budget": {"train": {"max_steps": 3}}}, {}, DS_FP32,
                                       data["root"])
