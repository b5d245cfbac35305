"""Kedro dataset for a ShareGPT4V annotation file (one JSON array of records)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from tulip_pipelines.data.annotations import AnnotationFile


class ShareGPT4VAnnotationsDataset(AbstractDataset[list[dict[str, Any]], AnnotationFile]):
    """``load()`` returns a streaming handle (the file is not read); ``save(records)`` writes them.

    The handle is only a path: with ``ingest.format: table`` or ``webdataset`` the same entry
    names a captions table or WebDataset shards, which the ingest node reads by that format.

    Example catalog entry::

        raw_annotations:
          type: tulip_pipelines.io.annotations.ShareGPT4VAnnotationsDataset
          filepath: ${globals:sharegpt4v_root}/share-captioner_coco_lcs_sam_1246k_1107.json
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> AnnotationFile:
        if not self._filepath.is_file():
            if self._filepath.is_dir():  # a folder of WebDataset shards (ingest.format)
                return AnnotationFile(self._filepath)
            raise DatasetError(
                f"ShareGPT4V annotation file {self._filepath} not found. Set `sharegpt4v_root` in "
                "conf/<env>/globals.yml (or `raw_annotations.filepath` in the catalog) to the "
                "folder holding share-captioner_coco_lcs_sam_1246k_1107.json, or run the "
                "`demo_data` pipeline for the embedded default."
            )
        return AnnotationFile(self._filepath)

    def save(self, data: list[dict[str, Any]]) -> None:
        if not isinstance(data, list):
            raise DatasetError(
                f"{self._filepath}: expected a list of record dicts, got {type(data).__name__}"
            )
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._filepath.with_name(self._filepath.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        tmp.replace(self._filepath)

    def _exists(self) -> bool:
        return self._filepath.is_file() or self._filepath.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
