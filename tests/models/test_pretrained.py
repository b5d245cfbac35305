"""Pretrained tags behave like open_clip's: from the caches, else downloaded and cached, unless
HF_HUB_OFFLINE=1 (what the tests run with) or download=False. No network here: open_clip's
downloader is replaced by one that writes a weights file, as a download would."""


import logging

import open_clip
import pytest
import safetensors.torch
import torch
from open_clip.transformer import QuickGELU

from tulip_pipelines.models import (
    create_teacher,
    load_bundle,
    save_model,
)
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

    def download(entry, cache_dir=None, **kwargs):  # what open_clip's download leaves behind
        calls.append((entry["hf_hub"], cache_dir))
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


def test_missing_pretrained_weights_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not in the local cache") as err:
        create_teacher("ViT-B-32", "openai", cache_dir=str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value)
    with pytest.raises(FileNotFoundError, match="teacher weights file not found"):
        create_teacher("TULIP-Tiny", str(tmp_path / "missing.pt"))


def _tiny_gelu_configs(monkeypatch):
    """A GELU variant of TULIP-Tiny and its -quickgelu twin, registered for one test."""
    base = open_clip.get_model_config("TULIP-Tiny")
    monkeypatch.setitem(
        open_clip.factory._MODEL_CONFIGS, "Tiny-gelu", {**base, "quick_gelu": False}
    )
    monkeypatch.setitem(
        open_clip.factory._MODEL_CONFIGS, "Tiny-gelu-quickgelu", {**base, "quick_gelu": True}
    )


def test_pretrained_tag_resolves_from_hub_cache_offline(teacher, tmp_path, monkeypatch):
    _tiny_gelu_configs(monkeypatch)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "Tiny-gelu",
                        {"demo": {"url": "", "hf_hub": "tulip/tiny-demo/", "quick_gelu": True}})
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tulip--tiny-demo"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    safetensors.torch.save_file(
        teacher.model.state_dict(), repo / "snapshots" / commit / "open_clip_model.safetensors"
    )
    loaded = create_teacher("Tiny-gelu", "demo", cache_dir=str(tmp_path / "hub"))
    assert loaded.spec.model_name == "Tiny-gelu-quickgelu"  # the tag was trained with QuickGELU
    tok = teacher.tokenizer(["a blue square"])
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_text(tok), teacher.model.encode_text(tok))


def test_openai_state_dict_format_loads(teacher, tmp_path):
    state = dict(teacher.model.state_dict())
    state.update(
        input_resolution=torch.tensor(48),
        context_length=torch.tensor(77),
        vocab_size=torch.tensor(49408),
    )
    torch.save(state, tmp_path / "openai_format.pt")
    loaded = create_teacher("TULIP-Tiny", str(tmp_path / "openai_format.pt"))
    tok = teacher.tokenizer(["a blue square"])
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_text(tok), teacher.model.encode_text(tok))


def test_openai_format_selects_quick_gelu_in_both_towers(teacher, tmp_path, monkeypatch):
    _tiny_gelu_configs(monkeypatch)
    state = dict(teacher.model.state_dict(), input_resolution=torch.tensor(48))
    torch.save(state, tmp_path / "openai_format.pt")
    loaded = create_teacher("Tiny-gelu", str(tmp_path / "openai_format.pt"))
    assert loaded.spec.model_name == "Tiny-gelu-quickgelu"
    assert isinstance(loaded.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(loaded.model.transformer.resblocks[0].mlp.gelu, QuickGELU)
