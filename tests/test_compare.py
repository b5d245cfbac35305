"""tulip-compare reads real runs back from an MLflow store."""

import mlflow
import pandas as pd
import pytest

from tests.conftest import mlflow_store
from tulip_pipelines import compare


@pytest.fixture()
def store(tmp_path):
    uri = mlflow_store(tmp_path / "mlflow.db")
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("tulip_pipelines", artifact_location=str(tmp_path / "art"))
    for lr, r1 in (("1e-4", 40.0), ("5e-4", 55.0)):
        with mlflow.start_run(experiment_id=exp, run_name=f"run-lr{lr}"):
            if lr == "5e-4":  # a stage run that exported a model (StageTracker.log_model)
                mlflow.set_tag("tulip.model_card", "model/MODEL_CARD.md")
            mlflow.log_params({"distill.lr": lr, "distill.loss_type": "cosine"})
            mlflow.log_metric("final/distill_loss", float(lr) * 100)
            mlflow.log_metric("recall/urban1k_demo/tulip_expanded/i2t_r1", r1)
            mlflow.log_metric("recall/urban1k_demo/tulip_expanded/i2t_r5", r1 + 20)
            mlflow.log_metric("train/loss", 3.0)  # per-step metric: not compared
            mlflow.log_metric("eval/urban1k_demo/i2t_r1", r1 - 1)  # a stage run's own model
    yield uri
    mlflow.set_tracking_uri(None)


def test_compare_keeps_differing_params_and_results(store):
    runs = compare.search_runs(store, "tulip_pipelines", max_runs=10)
    result = compare.compare_runs(runs)
    cols = set(result.table.columns)
    assert "params.distill.lr" in cols
    assert "params.distill.loss_type" not in cols  # same in every run
    assert "train/loss" not in cols
    assert {"final/distill_loss", "recall/urban1k_demo/tulip_expanded/i2t_r1"} <= cols
    by_lr = result.table.set_index("params.distill.lr")
    assert by_lr.loc["5e-4", "recall/urban1k_demo/tulip_expanded/i2t_r1"] == 55.0
    assert by_lr.loc["1e-4", "eval/urban1k_demo/i2t_r1"] == 39.0
    assert list(result.recall_at_1.columns)[0] == "run_id"
    assert set(result.recall_at_1.columns[1:]) == {"eval/urban1k_demo/i2t_r1",
                                                   "urban1k_demo/tulip_expanded/i2t_r1"}
    card = by_lr.loc["5e-4", "model_card"]
    run_id = by_lr.loc["5e-4", "run_id"]
    assert card == f"{mlflow.get_run(run_id).info.artifact_uri}/model/MODEL_CARD.md"
    assert pd.isna(by_lr.loc["1e-4", "model_card"])


def test_cli_writes_markdown_csv_and_plot(store, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main(["--tracking-uri", store, "--out", str(out)]) == 0
    table = pd.read_csv(out / "run_comparison.csv")
    assert len(table) == 2
    assert "run-lr5e-4" in (out / "run_comparison.md").read_text()
    assert (out / "run_comparison_recall_at_1.png").read_bytes()[:4] == b"\x89PNG"
    assert "params.distill.lr" in capsys.readouterr().out


def test_missing_experiment_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no MLflow experiment named 'nope'"):
        compare.search_runs(mlflow_store(tmp_path / "x.db"), "nope", 5)
