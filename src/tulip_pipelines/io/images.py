"""Kedro dataset for an image source: where training and evaluation read images from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError
from kedro_datasets._typing import JSONPreview

from tulip_pipelines.data.images import ImageSource, image_source_from_dict


class ImageSourceDataset(AbstractDataset[ImageSource, ImageSource]):
    """A small JSON file describing an image source (``prepared_images``): the prepared shards
    (``{"kind": "prepared", "folder": ..., sizes and counts}``) or the original folder
    (``{"kind": "folder", "root": ...}``, when ``prepare_images.enabled`` is false).

    ``load`` returns the :class:`~tulip_pipelines.data.images.ImageSource` (nothing is read
    until an image is opened); a preparation that some node of a multi-node run has not finished
    is an error that says so.

    Example catalog entry::

        prepared_images:
          type: tulip_pipelines.io.images.ImageSourceDataset
          filepath: data/05_model_input/prepared_images.json
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> ImageSource:
        data = json.loads(self._filepath.read_text(encoding="utf-8"))
        if data.get("complete") is False:
            raise DatasetError(
                f"{self._filepath}: the image preparation under {data.get('folder')} is not "
                "complete (a multi-node run whose other nodes have not finished); once they "
                "have, run prepare_images with num_nodes: 1 to write the index")
        return image_source_from_dict(data)

    def save(self, data: ImageSource) -> None:
        if not isinstance(data, ImageSource):
            raise DatasetError(f"{self._filepath}: expected an ImageSource, got "
                               f"{type(data).__name__}")
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._filepath.with_name(self._filepath.name + ".tmp")
        tmp.write_text(json.dumps(data.to_dict(), indent=2), encoding="utf-8")
        tmp.replace(self._filepath)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def preview(self) -> JSONPreview:
        """The description (kind, folder, image size, counts) for kedro-viz."""
        return JSONPreview(self._filepath.read_text(encoding="utf-8"))
