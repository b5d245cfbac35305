"""teacher pipeline: a CLIP trained from scratch on the demo data (embedded default only)."""

from kedro.pipeline import Node, Pipeline

from .nodes import train_teacher


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            train_teacher,
            inputs=["train_captions", "val_captions", "demo_shuffled_captions", "params:teacher",
                    "params:deepspeed", "prepared_images"],
            outputs=["teacher_model", "teacher_history", "teacher_loss_plot",
                     "teacher_skipped_samples"],
            name="train_teacher",
        )
    ], tags="teacher")
