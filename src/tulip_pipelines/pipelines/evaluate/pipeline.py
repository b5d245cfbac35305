"""evaluate pipeline: long- and short-caption retrieval of every model, side by side."""

from kedro.pipeline import Node, Pipeline

from .nodes import build_dci_long_csv, evaluate_retrieval


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
                ],
                name="evaluate_retrieval",
                tags=["evaluate"],
            ),
        ]
    )
