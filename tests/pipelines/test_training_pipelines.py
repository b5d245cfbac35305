"""A few steps of teacher, distill, expand and longclip on tiny demo data, tracked in MLflow."""

import mlflow
import pandas as pd
import pytest

from tests.conftest import DS_FP32
from tulip_pipelines.data.demo import DemoDataParams, generate_demo_data
from tulip_pipelines.models import load_bundle, save_model
from tulip_pipelines.pipelines.distill.nodes import distill
from tulip_pipelines.pipelines.expand.nodes import expand
from tulip_pipelines.pipelines.longclip.nodes import finetune_longclip
from tulip_pipelines.pipelines.teacher.nodes import train_teacher


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
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
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
    def params(stage, train):
        return {"run_dir": str(tmp_path / "runs" / stage), "train": train}

    teacher, hist, fig = train_teacher(data["train"], data["val"], data["shuffled"],
                                       params("teacher", _train(24, 5e-4)), DS_FP32, data["root"])
    assert _falls(hist) and fig is not None
    save_model(teacher, tmp_path / "teacher_model")
    teacher = load_bundle(tmp_path / "teacher_model")

    student, hist, _ = distill(teacher, data["train"], data["val"],
                               params("distill", _train(16, 2e-3)), DS_FP32, data["root"])
    assert _falls(hist) and student.spec.kind == "rope" and student.spec.context_length == 248
    expand_params = params("expand", _train(12, 5e-4))
    expanded, hist, _ = expand(
        student, data["train"], data["val"], expand_params, DS_FP32, data["root"]
    )
    assert _falls(hist)
    longclip, hist_l, _ = finetune_longclip(teacher, data["train"], data["val"],
                                            {"run_dir": str(tmp_path / "runs" / "longclip")},
                                            expand_params, DS_FP32, data["root"])
    assert longclip.spec.kind == "absolute" and longclip.spec.context_length == 248
    assert hist_l["step"].max() == hist["step"].max()  # the same budget as expand
    save_model(expanded, tmp_path / "expanded_model")
    assert load_bundle(tmp_path / "expanded_model").spec.kind == "rope"

    runs = mlflow.search_runs(search_all_experiments=True)
    by_stage = {r["tags.tulip.stage"]: r for _, r in runs.iterrows()}
    assert set(by_stage) == {"teacher", "distill", "expand", "longclip"}
    exp = by_stage["expand"]
    assert exp["tags.tulip.parent_run_id"] == by_stage["distill"]["run_id"]  # lineage
    assert by_stage["distill"]["tags.tulip.parent_run_id"] == by_stage["teacher"]["run_id"]
    assert (
        exp["params.expand.long_weight"] == "0.8"
        and exp["params.deepspeed.zero_optimization.stage"] == "0"
    )
    assert exp["metrics.final/train/loss"] > 0
    client = mlflow.MlflowClient()
    history = client.get_metric_history(exp["run_id"], "train/loss")
    assert len(history) >= 5 and history[0].step < history[-1].step
    artifacts = {a.path for a in client.list_artifacts(exp["run_id"], "model")}
    assert {"model/model.safetensors", "model/config.json"} <= artifacts
    # the artifacts and params in detail: tests/test_mlflow_tracking.py


def test_bad_stage_parameters_fail_before_training(data):
    with pytest.raises(ValueError, match="unknown distill parameter"):
        distill(None, data["train"], data["val"], {"lossType": "cosine"}, DS_FP32, data["root"])
    with pytest.raises(ValueError, match="loss_type"):
        distill(None, data["train"], data["val"], {"loss_type": "kl"}, DS_FP32, data["root"])
    with pytest.raises(ValueError, match="unknown train parameter"):
        expand(None, data["train"], data["val"], {"train": {"steps": 3}}, DS_FP32, data["root"])
