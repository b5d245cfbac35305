"""Split node."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tulip_pipelines.data.split import SplitParams, split_captions


def split_train_val(
    captions: pd.DataFrame, params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return ``(train_captions, val_captions)``."""
    return split_captions(captions, SplitParams.from_params(params))
