"""Kedro datasets for models: model directories and pretrained teachers."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, NewType

from kedro.io import AbstractDataset

from tulip_pipelines.models.spec import ModelBundle

# kedro-viz shows a dataset's preview by the name of its return type: "TextPreview" is text (a
# Markdown table stays readable in its monospaced box)
TextPreview = NewType("TextPreview", str)


class ModelDataset(AbstractDataset[ModelBundle, ModelBundle]):
    """A model directory (``model.safetensors`` + ``config.json``).

    ``load`` returns a :class:`~tulip_pipelines.models.spec.ModelBundle`; ``save`` writes one.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = PurePosixPath(filepath)
        self.metadata = metadata

    def load(self) -> ModelBundle:
        from tulip_pipelines.models import load_bundle

        return load_bundle(Path(self._filepath))

    def save(self, data: ModelBundle) -> None:
        from tulip_pipelines.models import save_model

        save_model(data, Path(self._filepath))

    def _exists(self) -> bool:
        return (Path(self._filepath) / "config.json").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def preview(self) -> TextPreview:
        """The model card (kedro-viz ``--include-previews``)."""
        from tulip_pipelines.models.card import CARD

        card = Path(self._filepath) / CARD
        if not card.is_file():
            return TextPreview(f"no {CARD} in {self._filepath} (not trained yet)")
        return TextPreview(card.read_text(encoding="utf-8"))


class PretrainedCLIPDataset(AbstractDataset[None, ModelBundle]):
    """A load-only teacher: open_clip ``model_name`` with ``pretrained`` weights (a tag, from the
    local caches or downloaded and cached as open_clip does unless ``HF_HUB_OFFLINE=1`` or
    ``download: false``; or a file path). Used as ``teacher_model`` at real scale."""

    def __init__(
        self,
        model_name: str,
        pretrained: str,
        cache_dir: str | None = None,
        activation: str | None = None,
        download: bool = True,
        metadata: dict[str, Any] | None = None,
    ):
        self._model_name, self._pretrained = model_name, pretrained
        self._cache_dir, self._activation = cache_dir, activation
        self._download = download
        self.metadata = metadata

    def load(self) -> ModelBundle:
        from tulip_pipelines.models import create_teacher

        return create_teacher(
            self._model_name,
            self._pretrained,
            cache_dir=self._cache_dir,
            activation=self._activation,
            download=self._download,
        )

    def save(self, data: ModelBundle) -> None:
        raise NotImplementedError("a pretrained teacher is read-only; train one with `teacher`")

    def _exists(self) -> bool:
        pretrained = Path(self._pretrained)
        return pretrained.is_file() if pretrained.suffix else True

    def _describe(self) -> dict[str, Any]:
        return {
            "model_name": self._model_name,
            "pretrained": self._pretrained,
            "cache_dir": self._cache_dir,
        }
