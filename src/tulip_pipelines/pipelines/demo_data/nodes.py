"""Nodes of the demo_data pipeline."""

from __future__ import annotations

from typing import Any

import pandas as pd
from PIL import Image

from tulip_pipelines.data.demo import DemoDataParams, generate_demo_classes, generate_demo_data


def generate_demo(
    params: dict[str, Any],
) -> tuple[
    list[dict], dict[str, Image.Image], pd.DataFrame, pd.DataFrame,
    dict[str, Image.Image], dict[str, str], dict[str, Image.Image], str,
]:  # fmt: skip
    """Draw the demo dataset and its held-out benchmarks (one node: all on disk before ingest)."""
    data = generate_demo_data(DemoDataParams.from_params(params))
    return (
        data.records,
        data.images,
        data.shuffled_captions,
        data.manifest,
        data.long_benchmark_images,
        data.long_benchmark_captions,
        data.short_benchmark_images,
        data.short_benchmark_results_csv,
    )


def generate_demo_class_folder(params: dict[str, Any]) -> tuple[dict[str, Image.Image],
                                                                 dict[str, str]]:
    """Draw the zero-shot classification folder (``<colour>/<image>``) and its class names."""
    return generate_demo_classes(DemoDataParams.from_params(params))
