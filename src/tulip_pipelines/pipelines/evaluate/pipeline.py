"""evaluate pipeline: long- and short-caption retrieval of every model, side by side."""

from kedro.pipeline import Node, Pipeline

from .nodes import build_dci_long_csv, collect_skipped_samples, evaluate_retrieval

# Stages whose unreadable samples go into `skipped_samples` (the demo teacher is not one:
# at real scale it is loaded, not trained).
SKIPPED_FROM = ("distill", "expand", "longclip_authors", "longclip_equal_budget", "evaluate")


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                build_dci_long_csv,
                inputs="params:evaluate",
                outputs="dci_long_prepared",
                name="build_dci_long_csv",
                tags=["evaluate"],
            ),
            Node(
                evaluate_retrieval,
                inputs=[
                    "teacher_model",
                    "longclip_authors_model",
                    "longclip_equal_budget_model",
                    "distilled_model",
                    "expanded_model",
                    "val_captions",
                    "dci_long_prepared",
                    "params:evaluate",
                    "prepared_images",
                ],
                outputs=[
                    "retrieval_metrics",
                    "benchmark_issues",
                    "retrieval_report",
                    "retrieval_report_plot",
                    "recall_by_tokens_read",
                    "recall_by_caption_length",
                    "recall_by_tokens_read_plot",
                    "evaluate_skipped_samples",
                ],
                name="evaluate_retrieval",
                tags=["evaluate"],
            ),
            Node(
                collect_skipped_samples,
                inputs=[f"{stage}_skipped_samples" for stage in SKIPPED_FROM],
                outputs="skipped_samples",
                name="collect_skipped_samples",
                tags=["evaluate"],
            ),
        ]
    )
