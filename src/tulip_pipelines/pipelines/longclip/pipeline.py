"""longclip pipeline: the Long-CLIP baseline, fine-tuned at expand's budget."""

from kedro.pipeline import Node, Pipeline

from .nodes import finetune_longclip


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                finetune_longclip,
                inputs=[
                    "teacher_model",
                    "train_captions",
                    "val_captions",
                    "params:longclip",
                    "params:expand",
                    "params:deepspeed",
                    "prepared_images",
                ],
                outputs=["longclip_model", "longclip_history", "longclip_loss_plot"],
                name="finetune_longclip",
                tags=["longclip"],
            )
        ]
    )
