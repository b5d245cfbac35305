"""Nodes of the evaluate pipeline: every model on every benchmark, side by side."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from tulip_pipelines.data.images import ImageSource
from tulip_pipelines.evaluation.evaluate import (
    EvaluateParams,
    issues_table,
    load_benchmarks,
    prepare_dci_long,
    score,
    unreadable_images_table,
)
from tulip_pipelines.evaluation.report import (
    log_to_mlflow,
    report_figure,
    report_markdown,
    tokens_read_figure,
)
from tulip_pipelines.models import ModelBundle, stretch_position_embedding
from tulip_pipelines.models.card import add_retrieval
from tulip_pipelines.tracking import log_model_card, stage_run

logger = logging.getLogger(__name__)


def build_dci_long_csv(params: dict[str, Any]) -> pd.DataFrame:
    """Write dci_long.csv from the DCI annotation JSONs where configured (a no-op otherwise)."""
    return prepare_dci_long(EvaluateParams.from_params(params))


def evaluate_retrieval(
    teacher_model: ModelBundle,
    longclip_authors_model: ModelBundle,
    longclip_equal_budget_model: ModelBundle,
    distilled_model: ModelBundle,
    expanded_model: ModelBundle,
    val_captions: pd.DataFrame,
    dci_long_prepared: pd.DataFrame,
    params: dict[str, Any],
    prepared_images: ImageSource,
):
    """Score the teacher, Long-CLIP (stretched only; fine-tuned by its authors' recipe and at
    TULIP's budget) and TULIP (distilled / expanded).

    ShareGPT4V-format benchmarks read ``val_captions``' images from ``prepared_images``.
    Returns ``retrieval_metrics``, ``benchmark_issues``, ``retrieval_report`` (Markdown),
    ``retrieval_report_plot``, ``recall_by_tokens_read``, ``recall_by_caption_length`` and
    ``recall_by_tokens_read_plot`` and ``evaluate_skipped_samples`` (benchmark images that could
    not be read: left out with their texts, recall is over the rest); logs them to MLflow when
    tracking is on. The model card of
    every model loaded from a model directory gets its retrieval rows (there, and in the model
    artifact of the run that trained it).
    """
    cfg = EvaluateParams.from_params(params)
    benchmarks = load_benchmarks(cfg, val_captions, prepared_images)
    stretch = longclip_authors_model.spec
    models = {
        "teacher": teacher_model,
        "longclip_stretched": stretch_position_embedding(
            teacher_model, stretch.context_length, stretch.extra.get("keep", 20)),
        "longclip_authors": longclip_authors_model,
        "longclip_equal_budget": longclip_equal_budget_model,
        "tulip_distilled": distilled_model,
        "tulip_expanded": expanded_model,
    }
    parent = expanded_model.spec.extra.get("mlflow_run_id")
    with stage_run("evaluate", {"benchmarks": ",".join(benchmarks), "ks": list(cfg.ks)},
                   tags={"tulip.parent_run_id": parent} if parent else None) as tracker:
        scores = score(models, benchmarks, cfg)
        metrics, by_tokens, by_length = (
            scores.metrics, scores.by_tokens_read, scores.by_caption_length)
        issues = issues_table(scores.benchmarks)
        unreadable = unreadable_images_table(scores.benchmarks)
        report = report_markdown(metrics, issues, by_tokens, by_length)
        figure, tokens_figure = report_figure(metrics), tokens_read_figure(by_tokens)
        log_to_mlflow(tracker, metrics, report,
                      {"retrieval_report.png": figure, "recall_by_tokens_read.png": tokens_figure},
                      {"benchmark_issues": issues, "recall_by_tokens_read": by_tokens,
                       "recall_by_caption_length": by_length,
                       **({"skipped_samples": unreadable} if len(unreadable) else {})})
    for card, names in add_retrieval(models, metrics).items():
        log_model_card(card, models[names[0]].spec.extra.get("mlflow_run_id"))
    logger.info("retrieval results:\n%s", report)
    return metrics, issues, report, figure, by_tokens, by_length, tokens_figure, unreadable


def collect_skipped_samples(*tables: pd.DataFrame) -> pd.DataFrame:
    """Every unreadable sample the TULIP and Long-CLIP stages and the evaluation met, in one
    table (``skipped_samples``; the demo teacher's stays in ``teacher_skipped_samples``)."""
    frames = [t for t in tables if t is not None and len(t)]
    columns = list(tables[0].columns) if tables else []
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    if len(out):
        logger.warning("%d unreadable samples were skipped: %s", len(out),
                       out.groupby("stage").size().to_dict())
    return out
