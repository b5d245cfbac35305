"""`prepare_images` pipeline: every training and validation image decoded once, resized and
written into WebDataset shards that training and evaluation read (``prepared_images``)."""

from tulip_pipelines.pipelines.prepare_images.pipeline import create_pipeline

__all__ = ["create_pipeline"]
