"""evaluate pipeline: long- and short-caption retrieval and zero-shot classification of every
model, side by side."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    add_retrieval_to_model_cards,
    build_dci_long_csv,
    collect_skipped_samples,
    gather_models,
    load_retrieval_benchmarks,
    load_zero_shot_benchmarks,
    log_evaluation,
    report_retrieval,
    score_retrieval,
    score_zero_shot,
)

# Stages whose unreadable samples go into `skipped_samples` (the demo teacher is not one:
# at real scale it is loaded, not trained).
SKIPPED_FROM = ("distill", "expand", "longclip_authors", "longclip_equal_budget", "evaluate")


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(build_dci_long_csv, "params:evaluate", "dci_long_prepared",
                 name="build_dci_long_csv"),
            Node(gather_models,
                 ["teacher_model", "longclip_authors_model", "longclip_equal_budget_model",
                  "distilled_model", "expanded_model"],
                 "evaluated_models", name="gather_models"),
            Node(load_retrieval_benchmarks,
                 ["val_captions", "dci_long_prepared", "params:evaluate", "prepared_images"],
                 "retrieval_benchmarks", name="load_retrieval_benchmarks"),
            Node(score_retrieval,
                 ["evaluated_models", "retrieval_benchmarks", "params:evaluate"],
                 ["retrieval_metrics", "recall_by_tokens_read", "recall_by_caption_length",
                  "benchmark_issues", "evaluate_skipped_samples"],
                 name="score_retrieval"),
            Node(load_zero_shot_benchmarks, ["evaluated_models", "params:evaluate"],
                 "classification_benchmarks",
                 name="load_classification_benchmarks"),
            Node(score_zero_shot,
                 ["evaluated_models", "classification_benchmarks", "params:evaluate"],
                 ["classification_metrics", "classification_issues"],
                 name="score_classification"),
            Node(report_retrieval,
                 ["retrieval_metrics", "benchmark_issues", "recall_by_tokens_read",
                  "recall_by_caption_length", "classification_metrics",
                  "classification_issues"],
                 ["retrieval_report", "retrieval_report_plot", "recall_by_tokens_read_plot"],
                 name="report_retrieval"),
            Node(log_evaluation,
                 ["params:evaluate", "retrieval_metrics", "retrieval_report", "benchmark_issues",
                  "recall_by_tokens_read", "recall_by_caption_length",
                  "evaluate_skipped_samples", "expanded_model", "classification_metrics"],
                 None, name="log_evaluation"),
            Node(add_retrieval_to_model_cards,
                 ["evaluated_models", "retrieval_metrics", "params:evaluate",
                  "classification_metrics"], None,
                 name="add_retrieval_to_model_cards"),
            Node(collect_skipped_samples,
                 [f"{stage}_skipped_samples" for stage in SKIPPED_FROM], "skipped_samples",
                 name="collect_skipped_samples"),
        ],
        tags="evaluate",
    )
