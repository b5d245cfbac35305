"""A retrieval benchmark as the readers return it and the evaluation scores it: images, texts,
the image of every text, and every entry that was left out with its reason."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tulip_pipelines.data.images import ImageSource

logger = logging.getLogger(__name__)


ISSUE_COLUMNS = ["benchmark", "item", "reason", "detail"]  # benchmark_issues and the like


class IssueReason(str, Enum):
    MISSING_IMAGE = "missing_image"
    CAPTION_WITHOUT_IMAGE = "caption_without_image"
    IMAGE_WITHOUT_CAPTION = "image_without_caption"
    EMPTY_CAPTION = "empty_caption"
    MALFORMED_ROW = "malformed_row"
    UNREADABLE_IMAGE = "unreadable_image"  # found at scoring time: it would not open or decode
    UNSAFE_IMAGE_PATH = "unsafe_image_path"  # table: an absolute path or one escaping the root
    CLASS_WITHOUT_IMAGES = "class_without_images"  # imagefolder: still a candidate label
    NOT_AN_IMAGE = "not_an_image"  # imagefolder: a file without an image suffix


@dataclass(frozen=True)
class BenchmarkIssue:
    """One entry left out of a benchmark: ``item`` names it (file, row), ``detail`` says why."""

    item: str
    reason: IssueReason
    detail: str = ""


@dataclass
class RetrievalBenchmark:
    """Images, texts and ``text_to_image[t]`` (the image of text ``t``); ``kind`` is long/short.

    ``image_paths`` are image files, or, with ``image_source``, descriptions of the images that
    ``image_handles`` locate in that source (ShareGPT4V-1k)."""

    name: str
    kind: str
    image_paths: list[str]
    texts: list[str]
    text_to_image: np.ndarray
    issues: list[BenchmarkIssue] = field(default_factory=list)
    image_source: ImageSource | None = None
    image_handles: list[Any] | None = None

    def __post_init__(self) -> None:
        self.text_to_image = np.asarray(self.text_to_image, dtype=np.int64)
        if len(self.texts) != len(self.text_to_image):
            raise ValueError(
                f"{self.name}: {len(self.texts)} texts but {len(self.text_to_image)} links"
            )
        links = self.text_to_image
        if len(links) and not (0 <= links.min() and links.max() < len(self.image_paths)):
            raise ValueError(
                f"{self.name}: text_to_image points outside the {len(self.image_paths)} images"
            )

    def without_images(self, unreadable: dict[int, str]) -> "RetrievalBenchmark":
        """This benchmark less the images ``unreadable`` (index -> error) and their texts, each
        image recorded as an ``unreadable_image`` issue."""
        keep = np.array([i not in unreadable for i in range(len(self.image_paths))], dtype=bool)
        new_index = np.cumsum(keep) - 1
        kept_texts = keep[self.text_to_image]
        issues = self.issues + [
            BenchmarkIssue(self.image_paths[i], IssueReason.UNREADABLE_IMAGE,
                           f"{error} ({int((self.text_to_image == i).sum())} texts left out)")
            for i, error in sorted(unreadable.items())
        ]
        handles = self.image_handles
        return RetrievalBenchmark(
            self.name, self.kind, [p for p, k in zip(self.image_paths, keep) if k],
            [t for t, k in zip(self.texts, kept_texts) if k],
            new_index[self.text_to_image[kept_texts]], issues, self.image_source,
            None if handles is None else [h for h, k in zip(handles, keep) if k])

    def issues_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "benchmark": [self.name] * len(self.issues),
                "item": [i.item for i in self.issues],
                "reason": [i.reason.value for i in self.issues],
                "detail": [i.detail for i in self.issues],
            },
            columns=ISSUE_COLUMNS,
        )

    def log_summary(self) -> None:
        counts = (
            pd.Series([i.reason.value for i in self.issues], dtype=object).value_counts().to_dict()
        )
        logger.info(
            "benchmark %s (%s): %d images, %d texts; %d entries left out %s",
            self.name, self.kind, len(self.image_paths), len(self.texts), len(self.issues),
            counts or "",
        )  # fmt: skip


class BenchmarkMissing(FileNotFoundError):
    """The benchmark's files are not where the configuration says."""

    def __init__(self, name: str, path: Path):
        super().__init__(f"{name}: {path} not found")
        self.name, self.path = name, path
