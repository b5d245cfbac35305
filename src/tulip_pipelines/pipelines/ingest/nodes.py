"""Ingest node: a generator, so Kedro saves each batch as it comes (bounded memory)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd

from tulip_pipelines.data.sharegpt4v import AnnotationFile, IngestConfig, iter_ingest_batches


def ingest_annotations(
    raw_annotations: AnnotationFile, params: dict[str, Any]
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Yield ``(captions, rejected_captions)`` batches; counts are reconciled at the end."""
    config = IngestConfig.from_params(params)
    yield from iter_ingest_batches(
        raw_annotations.path,
        image_root=config.image_root,
        check_images=config.check_images,
        batch_size=config.batch_size,
    )
