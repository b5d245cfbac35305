"""Kedro dataset for the cached teacher targets of distillation (``teacher_text_embeddings``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset


class TeacherTargetsDataset(AbstractDataset):
    """A folder of teacher targets (``training/targets.py``).

    ``save`` takes the node's :class:`~tulip_pipelines.training.targets.TargetsRequest` and writes
    it lazily, chunk by chunk: a matching complete cache is reused, a matching partial one
    resumed, a stale one rebuilt. ``load`` returns
    :class:`~tulip_pipelines.training.targets.TeacherTargets`.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self):
        from tulip_pipelines.training.targets import TeacherTargets

        return TeacherTargets(self._filepath)

    def save(self, data) -> None:
        from tulip_pipelines.training.targets import write_targets

        write_targets(data, self._filepath)

    def _exists(self) -> bool:
        return (self._filepath / "manifest.json").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
