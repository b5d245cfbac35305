"""The model card beside every model directory: rendered from the spec, ignored by loading,
rewritten with the model's retrieval rows by the evaluation."""

import dataclasses
import json
import logging

import pandas as pd
import pytest
import torch

from tulip_pipelines.models import build_student, create_teacher, load_bundle, save_model
from tulip_pipelines.models.card import CARD, add_retrieval, render_model_card

RUN, PARENT_RUN, KEDRO_RUN = "a" * 32, "b" * 32, "c" * 32


@pytest.fixture(scope="module")
def expanded():
    """A student whose spec carries what run_stage records for a tracked expand stage."""
    torch.manual_seed(0)
    student = build_student(create_teacher("TULIP-Tiny"), 248)
    extra = {**student.spec.extra, "stage": "expand", "mlflow_run_id": RUN,
             "kedro_run_id": KEDRO_RUN,
             "parent": {"stage": "distill", "mlflow_run_id": PARENT_RUN,
                        "model_name": "TULIP-Tiny", "source": f"runs:/{PARENT_RUN}/model"},
             "training": {"records": {"train": 2600, "val": 200},
                          "images": {"kind": "folder", "root": "data/imgs"}, "skipped_samples": 3,
                          "steps": 150, "global_batch": 64, "resumed_from": None,
                          "params": {"long_weight": "0.8", "train.lr": "0.0005"},
                          "final_metrics": {"train/loss": 0.123456, "val/loss": 0.5}}}
    return dataclasses.replace(student, spec=dataclasses.replace(student.spec, extra=extra))


def _metrics(models):
    rows = [(b, m, d, k, 50.0 + k, 200, 40.0, 60.0 + k)
            for b in ("urban", "flickr") for m in models for d in ("i2t", "t2i") for k in (1, 5)]
    return pd.DataFrame(rows, columns=["benchmark", "model", "direction", "k", "recall",
                                       "n_queries", "ci_low", "ci_high"])


def test_card_names_stage_runs_data_params_and_losses(expanded):
    card = render_model_card(expanded.spec)
    assert card.startswith("# Model card: TULIP-Tiny, expand stage")
    assert f"MLflow run: `{RUN}`" in card and KEDRO_RUN in card
    assert f"Parent model: the `distill` model (TULIP-Tiny) from MLflow run `{PARENT_RUN}`" in card
    assert f"Parent MLflow run: `{PARENT_RUN}`" in card
    assert "| train records | 2,600 |" in card and "| val records | 200 |" in card
    assert ("150 optimizer steps of 64 samples (global batch): 9,600 samples seen "
            "(3.7 x the train records)") in card
    assert "| long_weight | 0.8 |" in card and "| train/loss | 0.1235 |" in card
    assert "Images: the `folder` source `data/imgs`." in card
    assert "3 unreadable samples skipped" in card
    assert "| context length (tokens) | 248 |" in card and "RoPE" in card
    assert "Not evaluated yet" in card


def test_card_of_a_model_trained_from_scratch_or_not_trained_here():
    spec = create_teacher("TULIP-Tiny").spec
    assert "no MLflow run" in render_model_card(spec)
    scratch = dataclasses.replace(spec, extra={"stage": "teacher", "mlflow_run_id": RUN,
                                               "parent": None})
    card = render_model_card(scratch)
    assert "Parent model: none, trained from scratch. Parent MLflow run: none." in card


def test_save_model_writes_the_card_and_loading_ignores_it(expanded, tmp_path):
    save_model(expanded, tmp_path / "m")
    assert (tmp_path / "m" / CARD).read_text() == render_model_card(expanded.spec)
    (tmp_path / "m" / CARD).write_text("anything at all")
    loaded = load_bundle(tmp_path / "m")
    assert loaded.spec == expanded.spec and loaded.source_dir == tmp_path / "m"


def test_evaluation_adds_each_models_own_rows_to_its_card(expanded, tmp_path, caplog):
    save_model(expanded, tmp_path / "expanded")
    loaded = load_bundle(tmp_path / "expanded")
    in_memory = dataclasses.replace(loaded, source_dir=None)  # e.g. a stretch built in the node
    written = add_retrieval({"tulip_expanded": loaded, "other": in_memory},
                            _metrics(["tulip_expanded", "other"]))
    assert written == {tmp_path / "expanded" / CARD: ["tulip_expanded"]}
    card = (tmp_path / "expanded" / CARD).read_text()
    assert "Not evaluated yet" not in card
    row = "| urban       | tulip_expanded | i2t         | 51.0 [40.0, 61.0] | 55.0 [40.0, 65.0] |"
    assert row in card
    assert "| other" not in card
    assert f"Parent MLflow run: `{PARENT_RUN}`" in card  # the rest of the card stays

    # a directory whose model was replaced since it was loaded keeps its card
    other = json.loads((tmp_path / "expanded" / "config.json").read_text())
    other["extra"]["mlflow_run_id"] = "d" * 32
    (tmp_path / "expanded" / "config.json").write_text(json.dumps(other))
    with caplog.at_level(logging.WARNING):
        assert add_retrieval({"tulip_expanded": loaded}, _metrics(["tulip_expanded"])) == {}
    assert "changed since it was loaded" in caplog.text
