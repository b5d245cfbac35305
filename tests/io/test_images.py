"""ImageSourceDataset: the prepared_images catalog entry."""

import json

import pytest
from kedro.io import DatasetError

from tulip_pipelines.data.images import FolderImages, PreparedImages
from tulip_pipelines.io.images import ImageSourceDataset


def test_saves_and_loads_either_source(tmp_path):
    ds = ImageSourceDataset(str(tmp_path / "sub" / "prepared_images.json"))
    assert not ds.exists()
    ds.save(PreparedImages(tmp_path / "shards", {"size": 48, "complete": True}))
    loaded = ds.load()
    assert isinstance(loaded, PreparedImages) and loaded.folder == tmp_path / "shards"
    assert loaded.info == {"size": 48, "complete": True}
    assert json.loads(ds.preview())["kind"] == "prepared"
    ds.save(FolderImages("data/01_raw/images"))
    assert repr(ds.load()) == "FolderImages('data/01_raw/images')"


def test_an_unfinished_multi_node_preparation_is_a_clear_error(tmp_path):
    ds = ImageSourceDataset(str(tmp_path / "prepared_images.json"))
    ds.save(PreparedImages(tmp_path / "shards", {"complete": False}))
    with pytest.raises(DatasetError, match="not complete.*num_nodes: 1"):
        ds.load()
    with pytest.raises(DatasetError, match="expected an ImageSource"):
        ds.save(str(tmp_path))
