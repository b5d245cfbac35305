"""Kedro datasets of the teacher text embeddings (``training/teacher_embeddings.py``): the cache
itself, and what of it is written so far. Both only read and write; the distill pipeline's
``embed_teacher_texts`` node computes the embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError


class TeacherTextEmbeddingsDataset(AbstractDataset):
    """A cache folder. ``save`` stores one
    :class:`~tulip_pipelines.training.teacher_embeddings.TeacherTextEmbeddingsPart` (the node is a
    generator: Kedro saves each part as it is yielded); ``load`` returns the complete cache as
    :class:`~tulip_pipelines.training.teacher_embeddings.TeacherTextEmbeddings`."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self):
        from tulip_pipelines.training.teacher_embeddings import TeacherTextEmbeddings

        return TeacherTextEmbeddings(self._filepath)

    def save(self, data) -> None:
        from tulip_pipelines.training.teacher_embeddings import write_part

        write_part(data, self._filepath)

    def _exists(self) -> bool:
        return (self._filepath / "manifest.json").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class TeacherTextEmbeddingsProgressDataset(AbstractDataset):
    """What a cache folder holds so far, read-only: its manifest (``{}`` when there is none), so
    that ``embed_teacher_texts`` reuses a complete cache and resumes a partial one."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> dict[str, Any]:
        from tulip_pipelines.training.teacher_embeddings import read_manifest

        return read_manifest(self._filepath)

    def save(self, data) -> None:
        raise DatasetError(f"{self._filepath}: the embeddings' progress is read-only; "
                           f"teacher_text_embeddings writes the cache")

    def _exists(self) -> bool:
        return True  # an absent cache is progress too: nothing written yet

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
