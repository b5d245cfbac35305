"""`ingest` pipeline definition."""

from kedro.pipeline import Node, Pipeline

from tulip_pipelines.pipelines.ingest.nodes import ingest_annotations


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=ingest_annotations,
                inputs=["raw_annotations", "params:ingest", "params:image_root"],
                outputs=["captions", "rejected_captions"],
                name="ingest_annotations",
            )
        ],
        tags="ingest",
    )
