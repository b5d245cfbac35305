"""A Markdown report as a catalog entry whose kedro-viz preview is its text."""

from __future__ import annotations

from kedro_datasets.text import TextDataset

from tulip_pipelines.io.models import TextPreview


class MarkdownDataset(TextDataset):
    """``text.TextDataset`` (a ``.md`` file) with a preview: the Markdown itself."""

    def preview(self) -> TextPreview:
        if not self._exists():
            return TextPreview(f"{self._filepath} not written yet")
        return TextPreview(self.load())
