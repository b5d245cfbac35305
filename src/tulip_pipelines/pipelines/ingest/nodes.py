"""Ingest node (ShareGPT4V JSON, a captions table or WebDataset shards): a generator, so Kedro
saves each batch as it comes (bounded memory)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd

from tulip_pipelines.data.annotations import AnnotationFile
from tulip_pipelines.data.ingest import IngestParams, iter_ingest_batches


def ingest_annotations(
    raw_annotations: AnnotationFile, params: dict[str, Any], image_root: str
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Yield ``(captions, rejected_captions)`` batches; counts are reconciled at the end."""
    ingest_params = IngestParams.from_params(params)
    yield from iter_ingest_batches(
        raw_annotations.path,
        image_root=image_root,
        check_images=ingest_params.check_images,
        batch_size=ingest_params.batch_size,
        decode_workers=ingest_params.decode_workers,
        format=ingest_params.format,
        fields=ingest_params.fields(),
    )
