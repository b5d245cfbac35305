"""Node of the evaluate pipeline: every model on every benchmark, side by side."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from tulip_pipelines.evaluation.evaluate import (
    EvaluateConfig,
    load_benchmarks,
    report_figure,
    report_markdown,
    score,
)
from tulip_pipelines.models import ModelBundle, stretch_position_embedding
from tulip_pipelines.tracking import stage_run

logger = logging.getLogger(__name__)


def evaluate(teacher_model: ModelBundle, longclip_model: ModelBundle, distilled_model: ModelBundle,
             expanded_model: ModelBundle, val_captions: pd.DataFrame, params: dict[str, Any], image_root: str):
    """Score the teacher, Long-CLIP (stretched only / fine-tuned) and TULIP (distilled / expanded)."""
    cfg = EvaluateConfig.from_params(params)
    benchmarks = load_benchmarks(cfg, val_captions, image_root)
    models = {
        "teacher": teacher_model,
        "longclip_stretched": stretch_position_embedding(
            teacher_model, longclip_model.spec.context_length, cfg.longclip_keep),
        "longclip_finetuned": longclip_model,
        "tulip_distilled": distilled_model,
        "tulip_expanded": expanded_model,
    }
    with stage_run("evaluate", {"benchmarks": list(benchmarks), "ks": cfg.ks},
                   tags={"tulip.expanded_run_id": str(expanded_model.spec.extra.get("mlflow_run_id"))}) as tracker:
        metrics = score(models, benchmarks, cfg.ks, cfg.batch_size, cfg.chunk_size)
        report, figure = report_markdown(metrics), report_figure(metrics)
        tracker.log({f"recall/{r.benchmark}/{r.model}/{r.direction}_r{r.k}": r.recall
                     for r in metrics.itertuples()}, step=0)
        tracker.log_text(report, "retrieval_report.md")
        tracker.log_figure(figure, "retrieval_report.png")
        tracker.log_table(metrics, "retrieval_metrics.json")
    logger.info("retrieval results:\n%s", report)
    return metrics, report, figure
