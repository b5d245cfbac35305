"""distill pipeline: TULIP stage 1, relative position distillation (the teacher text embeddings
computed once and cached, then the student trained on them)."""

from kedro.pipeline import Node, Pipeline

from .nodes import distill, embed_teacher_texts


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            embed_teacher_texts,
            inputs=["teacher_model", "train_captions", "val_captions", "params:distill",
                    "teacher_text_embeddings_progress"],
            outputs="teacher_text_embeddings",
            name="embed_teacher_texts",
        ),
        Node(
            distill,
            inputs=["teacher_model", "teacher_text_embeddings", "train_captions", "val_captions",
                    "params:distill", "params:deepspeed", "prepared_images"],
            outputs=["distilled_model", "distill_history", "distill_loss_plot",
                     "distill_skipped_samples"],
            name="distill_relative_positions",
        ),
    ], tags="distill")
