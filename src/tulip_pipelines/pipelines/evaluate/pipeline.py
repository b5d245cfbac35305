"""evaluate pipeline: long- and short-caption retrieval of every model, side by side."""

from kedro.pipeline import Node, Pipeline

from .nodes import evaluate


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            evaluate,
            inputs=["teacher_model", "longclip_model", "distilled_model", "expanded_model", "val_captions",
                    "params:evaluate", "params:ingest.image_root"],
            outputs=["retrieval_metrics", "retrieval_report", "retrieval_report_plot"],
            name="evaluate_retrieval",
            tags=["evaluate"],
        )
    ])
