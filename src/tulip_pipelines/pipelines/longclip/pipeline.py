"""longclip pipeline: the two Long-CLIP baselines, each fine-tuned from the stretched teacher."""

from kedro.pipeline import Node, Pipeline

from .nodes import finetune_longclip_authors, finetune_longclip_equal_budget

COMMON = ["teacher_model", "train_captions", "val_captions", "params:longclip"]


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            finetune_longclip_authors,
            inputs=[*COMMON, "params:deepspeed", "prepared_images"],
            outputs=["longclip_authors_model", "longclip_authors_history",
                     "longclip_authors_loss_plot", "longclip_authors_skipped_samples"],
            name="finetune_longclip_authors",
        ),
        Node(
            finetune_longclip_equal_budget,
            inputs=[*COMMON, "params:expand", "params:deepspeed", "prepared_images"],
            outputs=["longclip_equal_budget_model", "longclip_equal_budget_history",
                     "longclip_equal_budget_loss_plot", "longclip_equal_budget_skipped_samples"],
            name="finetune_longclip_equal_budget",
        ),
    ], tags="longclip")
