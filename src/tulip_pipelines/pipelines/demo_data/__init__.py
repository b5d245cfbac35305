"""demo_data: draw the embedded long-caption dataset in ShareGPT4V's format."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
