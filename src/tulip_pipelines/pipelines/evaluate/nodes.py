"""Nodes of the evaluate pipeline: every model on every benchmark, side by side."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from tulip_pipelines.data.images import ImageSource
from tulip_pipelines.evaluation.classification import (
    load_classification_benchmarks,
    score_classification,
)
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
from tulip_pipelines.tracking.results import (
    LONG_R1_TAG,
    log_eval_to_stage_run,
    log_headline,
    log_model_card,
    long_r1,
    move_champion,
    recall_at_1_tags,
    update_registered_versions,
)
from tulip_pipelines.tracking.stage_runs import stage_run, tracking_enabled

logger = logging.getLogger(__name__)


def build_dci_long_csv(params: dict[str, Any]) -> pd.DataFrame:
    """Write dci_long.csv from the DCI annotation JSONs where configured (a no-op otherwise)."""
    return prepare_dci_long(EvaluateParams.from_params(params))


def gather_models(teacher_model: ModelBundle, longclip_authors_model: ModelBundle,
                  longclip_equal_budget_model: ModelBundle, distilled_model: ModelBundle,
                  expanded_model: ModelBundle) -> dict[str, ModelBundle]:
    """The scored models by name, side by side: the teacher, Long-CLIP (stretched only, as the
    authors' run stretched it; fine-tuned by its authors' recipe and at TULIP's budget) and
    TULIP (distilled / expanded)."""
    stretch = longclip_authors_model.spec
    return {
        "teacher": teacher_model,
        "longclip_stretched": stretch_position_embedding(
            teacher_model, stretch.context_length, stretch.extra.get("keep", 20)),
        "longclip_authors": longclip_authors_model,
        "longclip_equal_budget": longclip_equal_budget_model,
        "tulip_distilled": distilled_model,
        "tulip_expanded": expanded_model,
    }


def load_retrieval_benchmarks(val_captions: pd.DataFrame, dci_long_prepared: pd.DataFrame,
                              params: dict[str, Any], prepared_images: ImageSource):
    """Every configured benchmark that is present (ShareGPT4V-format ones read ``val_captions``'
    images from ``prepared_images``); ``dci_long_prepared`` only orders this after the DCI-long
    file is built."""
    return load_benchmarks(EvaluateParams.from_params(params), val_captions, prepared_images)


def score_retrieval(evaluated_models: dict[str, ModelBundle], retrieval_benchmarks,
                    params: dict[str, Any]):
    """Every model on every benchmark. Returns ``retrieval_metrics``,
    ``recall_by_tokens_read``, ``recall_by_caption_length``, ``benchmark_issues`` and
    ``evaluate_skipped_samples`` (benchmark images that could not be read: left out with their
    texts, recall is over the rest)."""
    scores = score(evaluated_models, retrieval_benchmarks, EvaluateParams.from_params(params))
    return (scores.metrics, scores.by_tokens_read, scores.by_caption_length,
            issues_table(scores.benchmarks), unreadable_images_table(scores.benchmarks))


def load_zero_shot_benchmarks(evaluated_models: dict[str, ModelBundle], params: dict[str, Any]):
    """Every configured ``imagefolder`` benchmark that is present; ``evaluated_models`` only
    orders this after the models, so after the demo data that the default run draws first."""
    return load_classification_benchmarks(EvaluateParams.from_params(params))


def score_zero_shot(evaluated_models: dict[str, ModelBundle], classification_benchmarks,
                    params: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Top-k zero-shot accuracy of every model on every image folder
    (``classification_metrics``) and the entries left out or reported
    (``classification_issues``)."""
    return score_classification(evaluated_models, classification_benchmarks,
                                EvaluateParams.from_params(params))


def report_retrieval(retrieval_metrics: pd.DataFrame, benchmark_issues: pd.DataFrame,
                     recall_by_tokens_read: pd.DataFrame,
                     recall_by_caption_length: pd.DataFrame,
                     classification_metrics: pd.DataFrame | None = None,
                     classification_issues: pd.DataFrame | None = None):
    """The report (Markdown) and its two charts: recall@1 of every model, R@1 against the
    tokens read. The zero-shot classification table follows the retrieval ones."""
    report = report_markdown(retrieval_metrics, benchmark_issues, recall_by_tokens_read,
                             recall_by_caption_length, classification_metrics,
                             classification_issues)
    logger.info("retrieval results:\n%s", report)
    return report, report_figure(retrieval_metrics), tokens_read_figure(recall_by_tokens_read)


def log_evaluation(params: dict[str, Any], retrieval_metrics: pd.DataFrame,
                   retrieval_report: str, benchmark_issues: pd.DataFrame,
                   recall_by_tokens_read: pd.DataFrame, recall_by_caption_length: pd.DataFrame,
                   evaluate_skipped_samples: pd.DataFrame, expanded_model: ModelBundle,
                   classification_metrics: pd.DataFrame | None = None) -> None:
    """The evaluation's MLflow run (nested in the ``kedro run``'s, child of the expand run): the
    report, both charts and the tables (the full recall table and the zero-shot classification
    accuracies among them). The parent run (the
    ``kedro run``'s) gets the headline: each model's long-caption R@1 (``long_r1/<model>``),
    the report and the charts. (The charts are drawn again from the tables: a catalogued figure
    is a PNG that Kedro cannot load back.)"""
    evaluate_params = EvaluateParams.from_params(params)
    parent = expanded_model.spec.extra.get("mlflow_run_id")
    tables = {"benchmark_issues": benchmark_issues,
              "recall_by_tokens_read": recall_by_tokens_read,
              "recall_by_caption_length": recall_by_caption_length}
    if len(evaluate_skipped_samples):
        tables["skipped_samples"] = evaluate_skipped_samples
    if classification_metrics is not None and len(classification_metrics):
        tables["classification_metrics"] = classification_metrics
    order = list(evaluate_params.benchmarks)
    benchmarks = sorted(set(retrieval_metrics["benchmark"]), key=order.index)
    figures = {"retrieval_report.png": report_figure(retrieval_metrics),
               "recall_by_tokens_read.png": tokens_read_figure(recall_by_tokens_read)}
    with stage_run("evaluate", {"benchmarks": ",".join(benchmarks), "ks": list(evaluate_params.ks)},
                   tags={"tulip.parent_run_id": parent} if parent else None,
                   datasets={}) as tracker:
        log_to_mlflow(tracker, retrieval_metrics, retrieval_report, figures, tables)
    if tracker.parent_run_id:
        log_headline(tracker.parent_run_id,
                     long_r1(retrieval_metrics, evaluate_params.long_benchmarks()),
                     retrieval_report, figures)


def add_retrieval_to_model_cards(evaluated_models: dict[str, ModelBundle],
                                 retrieval_metrics: pd.DataFrame, params: dict[str, Any],
                                 classification_metrics: pd.DataFrame | None = None) -> None:
    """The card of every model loaded from a model directory gets its retrieval rows, there and
    in the model artifact of the run that trained it; that run gets the model's recalls as
    metrics (``eval/<benchmark>/<direction>_r<k>``) and its zero-shot accuracies
    (``eval/<benchmark>/top<k>``); the model version it registered gets the
    card as its description, its R@1 rows as tags (``r1/<benchmark>/<direction>``) and its
    long-caption R@1 (``long_r1``), and the ``champion`` alias goes to the best such version."""
    headline = long_r1(retrieval_metrics, EvaluateParams.from_params(params).long_benchmarks())
    for card, names in add_retrieval(evaluated_models, retrieval_metrics).items():
        run_id = evaluated_models[names[0]].spec.extra.get("mlflow_run_id")
        log_model_card(card, run_id)
        # the run's own model (a directory's first name: the one trained there)
        accuracy = None if classification_metrics is None else classification_metrics[
            classification_metrics["model"] == names[0]]
        log_eval_to_stage_run(run_id, retrieval_metrics[retrieval_metrics["model"] == names[0]],
                              accuracy)
        rows = retrieval_metrics[retrieval_metrics["model"].isin(names)]
        tags = recall_at_1_tags(rows)
        if names[0] in headline:
            tags[LONG_R1_TAG] = f"{headline[names[0]]:.2f}"
        update_registered_versions(run_id, tags, card.read_text(encoding="utf-8"))
    if tracking_enabled():
        move_champion()


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
