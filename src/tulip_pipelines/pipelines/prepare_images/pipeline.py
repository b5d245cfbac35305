"""`prepare_images` pipeline definition."""

from kedro.pipeline import Node, Pipeline

from tulip_pipelines.pipelines.prepare_images.nodes import prepare_training_images


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=prepare_training_images,
                inputs=["train_captions", "val_captions", "params:prepare_images",
                        "params:image_root", "params:teacher_model_name"],
                outputs=["prepared_images", "rejected_images"],
                name="prepare_images",
            )
        ],
        tags="prepare_images",
    )
