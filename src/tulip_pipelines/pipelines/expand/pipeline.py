"""expand pipeline: TULIP stage 2, relative position expansion."""

from kedro.pipeline import Node, Pipeline

from .nodes import expand


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            expand,
            inputs=["distilled_model", "teacher_model", "train_captions", "val_captions",
                    "params:expand", "params:deepspeed", "prepared_images"],
            outputs=["expanded_model", "expand_history", "expand_loss_plot",
                     "expand_skipped_samples"],
            name="expand_context",
        )
    ], tags="expand")
