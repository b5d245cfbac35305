"""`split`: `captions` -> `train_captions` + `val_captions` (first records are validation)."""

from tulip_pipelines.pipelines.split.pipeline import create_pipeline

__all__ = ["create_pipeline"]
