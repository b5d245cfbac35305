"""`ingest`: ShareGPT4V annotations -> `captions` + `rejected_captions` (Parquet, streamed)."""

from tulip_pipelines.pipelines.ingest.pipeline import create_pipeline

__all__ = ["create_pipeline"]
