"""Project pipelines.

Each package under ``pipelines/`` is registered under its folder name. Two composites:
``__default__`` is the whole method on the embedded default data; ``tulip`` is the same method
without the demo generator and the from-scratch teacher, for real-scale environments
(``kedro run --env sharegpt4v --pipelines tulip``) where the teacher is loaded from weights.

The registry is explicit rather than ``find_pipelines``: Kedro 1.7 loads only the pipelines a
command names, and a composite name has no module of its own, so ``find_pipelines`` cannot
resolve it (``kedro run --pipelines tulip`` would fail). Every name is built here.
"""

from __future__ import annotations

import importlib

from kedro.pipeline import Pipeline

# The order the method runs in; Kedro sorts nodes by their data dependencies anyway.
DEFAULT_ORDER = (
    "demo_data",
    "ingest",
    "split",
    "prepare_images",
    "teacher",
    "distill",
    "expand",
    "longclip",
    "evaluate",
)
# Pipelines that exist only to build the embedded default.
DEMO_ONLY = ("demo_data", "teacher")
COMPOSITES = {
    "__default__": DEFAULT_ORDER,
    "tulip": tuple(name for name in DEFAULT_ORDER if name not in DEMO_ONLY),
}


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = {
        name: importlib.import_module(f"tulip_pipelines.pipelines.{name}").create_pipeline()
        for name in DEFAULT_ORDER
    }
    for name, parts in COMPOSITES.items():
        pipelines[name] = sum((pipelines[part] for part in parts), Pipeline([]))
    return pipelines
