"""distill pipeline: TULIP stage 1, relative position distillation."""

from kedro.pipeline import Node, Pipeline

from .nodes import distill


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            distill,
            inputs=["teacher_model", "train_captions", "val_captions", "params:distill",
                    "params:deepspeed", "prepared_images"],
            outputs=["distilled_model", "distill_history", "distill_loss_plot"],
            name="distill_relative_positions",
            tags=["distill"],
        )
    ])
