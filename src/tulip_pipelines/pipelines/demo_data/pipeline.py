"""demo_data pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import generate_demo


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=generate_demo,
                inputs="params:demo_data",
                outputs=[
                    "raw_annotations",
                    "demo_images",
                    "demo_shuffled_captions",
                    "demo_manifest",
                    "demo_long_benchmark_images",
                    "demo_long_benchmark_captions",
                    "demo_short_benchmark_images",
                    "demo_short_benchmark_index",
                    "demo_class_images",
                    "demo_class_names",
                ],
                name="generate_demo_data",
            )
        ],
        tags="demo_data",
    )
