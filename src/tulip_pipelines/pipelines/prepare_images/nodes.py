"""Prepare-images node."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tulip_pipelines.data.images import ImageSource
from tulip_pipelines.data.prepare import PrepareImagesParams, prepare_images


def prepare_training_images(train_captions: pd.DataFrame, val_captions: pd.DataFrame,
                            params: dict[str, Any], image_root: str,
                            teacher_model_name: str | None) -> tuple[ImageSource, pd.DataFrame]:
    """Return ``(prepared_images, rejected_images)``: the source training and evaluation read
    (the shards, or the original folder when ``enabled`` is false) and the images left out."""
    prepare_params = PrepareImagesParams.from_params(params)
    encoding = prepare_params.encoding(teacher_model_name) if prepare_params.enabled else None
    result = prepare_images(train_captions, val_captions, image_root, prepare_params, encoding)
    return result.source, result.rejected
