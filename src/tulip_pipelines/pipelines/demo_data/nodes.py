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
    dict[str, Image.Image], dict[str, str],
]:  # fmt: skip
    """Draw the demo dataset, its held-out benchmarks and the zero-shot class folder (one node:
    all on disk before ingest; the class folder from a random stream of its own)."""
    config = DemoDataParams.from_params(params)
    data = generate_demo_data(config)
    class_images, class_names = generate_demo_classes(config)
    return (
        data.records,
        data.images,
        data.shuffled_captions,
        data.manifest,
        data.long_benchmark_images,
        data.long_benchmark_captions,
        data.short_benchmark_images,
        data.short_benchmark_results_csv,
        class_images,
        class_names,
    )
