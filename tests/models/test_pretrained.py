"""Pretrained tags behave like open_clip's: from the caches, else downloaded and cached, unless
HF_HUB_OFFLINE=1 (what the tests run with) or download=False. No network here: open_clip's
downloader is replaced by one that writes a weights file, as a download would."""

import logging

import open_clip
import pytest
import safetensors.torch
import torch

from tulip_pipelines.models import create_teacher, load_bundle, save_model
from tulip_pipelines.models.pretrained import offline


@pytest.fixture
def tiny_tag(monkeypatch):
    """A pretrained tag "demo" for TULIP-Tiny whose weights are not in any cache."""
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "TULIP-Tiny",
                        {"demo": {"url": "", "hf_hub": "tulip/tiny-demo/"}})


def test_offline_never_downloads_and_says_so(tiny_tag, tmp_path, monkeypatch):
    assert offline()  # tests run with HF_HUB_OFFLINE=1 (conftest)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained",
                        lambda *a, **k: pytest.fail("downloaded although offline"))
    with pytest.raises(FileNotFoundError, match="not in the local cache.*HF_HUB_OFFLINE is set"):
        create_teacher("TULIP-Tiny", "demo", cache_dir=str(tmp_path / "cache"))


def test_online_downloads_and_caches_through_open_clip(tiny_tag, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    torch.manual_seed(1)
    weights = create_teacher("TULIP-Tiny").model.state_dict()
    calls = []

    def download(cfg, cache_dir=None, **kwargs):  # what open_clip's download leaves behind
        calls.append((cfg["hf_hub"], cache_dir))
        path = tmp_path / "cache" / "open_clip_model.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(weights, path)
        return str(path)

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", download)
    loaded = create_teacher("TULIP-Tiny", "demo", cache_dir=str(tmp_path / "cache"))
    assert calls == [("tulip/tiny-demo/", str(tmp_path / "cache"))]
    for key, value in weights.items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="downloads are off"):
        create_teacher("TULIP-Tiny", "demo", cache_dir=str(tmp_path / "other"), download=False)


def test_loading_an_exported_model_does_not_warn_of_random_weights(tmp_path, caplog):
    torch.manual_seed(0)
    save_model(create_teacher("TULIP-Tiny"), tmp_path / "model")
    with caplog.at_level(logging.WARNING):
        load_bundle(tmp_path / "model")
    assert "initialized randomly" not in caplog.text
