"""Train/validation split of the ingested captions (no Kedro).

As in the TULIP paper, the first ``val_size`` records (1,000 by default: ShareGPT4V-1k) are held
out for validation and the rest is training data; file order is preserved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd

from tulip_pipelines.params import Params, Problems

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitParams(Params):
    """``params:split``.

    Attributes:
        val_size: number of leading records held out for validation.
        max_train: optional cap on the training records (the first ones after the validation
            block); ``None`` keeps them all.
    """

    section = "split"

    val_size: int = 1000
    max_train: int | None = None

    def __post_init__(self) -> None:
        p = Problems(self.section)
        p.int_at_least("val_size", self.val_size, 1)
        p.int_at_least("max_train", self.max_train, 1, optional=True)
        p.raise_if_any()


def split_captions(
    captions: pd.DataFrame, config: SplitParams
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return ``(train, val)``: the first ``val_size`` rows are validation, in file order."""
    n = len(captions)
    if config.val_size >= n:
        raise ValueError(
            f"split.val_size={config.val_size} leaves no training data: captions has only {n} "
            "records; lower val_size in parameters_split.yml"
        )
    val = captions.iloc[: config.val_size].reset_index(drop=True)
    train = captions.iloc[config.val_size :]
    if config.max_train is not None:
        train = train.iloc[: config.max_train]
    train = train.reset_index(drop=True)
    logger.info(
        "split %d captions: %d train, %d val%s",
        n,
        len(train),
        len(val),
        f" (train capped at {config.max_train})" if config.max_train is not None else "",
    )
    return train, val
