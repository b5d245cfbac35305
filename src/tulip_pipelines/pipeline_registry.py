"""Project pipelines.

Every package under ``pipelines/`` that exposes ``create_pipeline()`` is registered under its
folder name. ``__default__`` is the whole method on the embedded default data; ``tulip`` is the
same method without the demo generator and the from-scratch teacher, for real-scale environments
(``kedro run --env sharegpt4v --pipeline tulip``) where the teacher is loaded from weights.
"""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

# The order the method runs in; Kedro sorts nodes by their data dependencies anyway.
DEFAULT_ORDER = (
    "demo_data",
    "ingest",
    "split",
    "teacher",
    "distill",
    "expand",
    "longclip",
    "evaluate",
)
# Pipelines that exist only to build the embedded default.
DEMO_ONLY = ("demo_data", "teacher")


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    in_default = [pipelines[name] for name in DEFAULT_ORDER if name in pipelines]
    pipelines["__default__"] = sum(in_default, Pipeline([]))
    pipelines["tulip"] = sum(
        (pipelines[n] for n in DEFAULT_ORDER if n in pipelines and n not in DEMO_ONLY),
        Pipeline([]),
    )
    return pipelines
