"""`split` pipeline definition."""

from kedro.pipeline import Node, Pipeline

from tulip_pipelines.pipelines.split.nodes import split_train_val


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=split_train_val,
                inputs=["captions", "params:split"],
                outputs=["train_captions", "val_captions"],
                name="split_train_val",
            )
        ],
        tags="split",
    )
