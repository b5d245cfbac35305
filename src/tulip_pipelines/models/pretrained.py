"""Pretrained weights: open_clip tags and weight files, resolved to a state dict.

Like open_clip's own ``pretrained.py``: a tag (``openai``, ``laion2b_s32b_b82k``, ...) names
weights on the Hugging Face hub or at a URL; a path names a file (an open_clip or OpenAI state
dict, OpenAI's TorchScript release, safetensors).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import open_clip
import torch
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from tulip_pipelines.models.configs import check_model_name

logger = logging.getLogger(__name__)


def _hf_cache_dirs(cache_dir: str | None) -> list[str]:
    dirs = [cache_dir] if cache_dir else []
    dirs.append(os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"))  # fmt: skip
    return dirs


def pretrained_config(model_name: str, tag: str) -> dict:
    """open_clip's pretrained config of ``tag`` (for ``X-quickgelu`` names also X's tags)."""
    for name in dict.fromkeys((model_name, model_name.removesuffix("-quickgelu"))):
        if tag in open_clip.list_pretrained_tags_by_model(name):
            return open_clip.get_pretrained_cfg(name, tag)
    raise ValueError(
        f"open_clip has no pretrained tag {tag!r} for {model_name}; known: "
        f"{open_clip.list_pretrained_tags_by_model(model_name.removesuffix('-quickgelu'))}, "
        "or give the path of a weights file"
    )


def offline() -> bool:
    """Whether downloads are off for this process (``HF_HUB_OFFLINE``, as huggingface_hub reads
    it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def weights_file(model_name: str, tag: str, cache_dir: str | None = None,
                 download: bool = True) -> Path:
    """The file of open_clip's ``tag`` weights, as open_clip resolves it: from the local caches
    first (:func:`cached_weights_file`), else downloaded and cached by open_clip (Hugging Face
    hub or URL, into ``cache_dir`` or the default caches), unless ``HF_HUB_OFFLINE=1`` or
    ``download=False``; then a clear error lists where it looked."""
    try:
        return cached_weights_file(model_name, tag, cache_dir)
    except FileNotFoundError as err:
        if offline() or not download:
            why = "HF_HUB_OFFLINE is set" if offline() else "downloads are off (download: false)"
            raise FileNotFoundError(f"{err} Not downloaded: {why}.") from None
    from open_clip.pretrained import download_pretrained

    logger.info("downloading %s pretrained=%r (open_clip's cache: %s)", model_name, tag,
                cache_dir or "default")
    path = download_pretrained(pretrained_config(model_name, tag), cache_dir=cache_dir)
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"open_clip could not download {model_name} pretrained={tag!r}")
    return Path(path)


def cached_weights_file(model_name: str, tag: str, cache_dir: str | None = None) -> Path:
    """The local file of open_clip's ``tag`` weights, without downloading: the Hugging Face hub
    cache (``cache_dir``, then ``HF_HUB_CACHE``/``HF_HOME``) and open_clip's URL cache
    (``cache_dir`` or ``~/.cache/clip``)."""
    where = pretrained_config(model_name, tag)
    looked = []
    if where.get("hf_hub"):
        repo_id, filename = os.path.split(where["hf_hub"])
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for directory in _hf_cache_dirs(cache_dir):
            looked.append(f"{directory} (hub repo {repo_id}: {', '.join(names)})")
            for name in names:
                found = try_to_load_from_cache(repo_id, name, cache_dir=directory)
                if isinstance(found, str):
                    return Path(found)
    if where.get("url"):
        for directory in dict.fromkeys([cache_dir or os.path.expanduser("~/.cache/clip"),
                                        os.path.expanduser("~/.cache/clip")]):  # fmt: skip
            candidate = Path(directory) / os.path.basename(where["url"])
            looked.append(str(candidate))
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"weights for {model_name} pretrained={tag!r} are not in the local cache; looked in: "
        f"{'; '.join(looked)}. Copy the weights there (Hugging Face hub layout, or open_clip's "
        "URL cache), allow downloads (unset HF_HUB_OFFLINE), or set `pretrained` to the path of "
        f"a weights file (e.g. {where.get('url', 'the released checkpoint')})."
    )


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a weights file: safetensors, a ``torch.save`` dict (``weights_only``),
    or OpenAI's TorchScript archive. ``state_dict``/``model`` wrappers and ``module.`` prefixes
    are removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError as err:
            if "TorchScript" not in str(err) and "constants.pkl" not in str(err):
                raise
            state = torch.jit.load(path, map_location="cpu").state_dict()  # OpenAI's JIT release
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items()}


def quick_gelu_name(model_name: str) -> str:
    """The open_clip config of ``model_name`` with QuickGELU in both towers (``X-quickgelu``)."""
    if open_clip.get_model_config(model_name).get("quick_gelu"):
        return model_name
    check_model_name(f"{model_name}-quickgelu")
    return f"{model_name}-quickgelu"


def teacher_architecture(model_name: str, pretrained: str | None) -> str:
    """The config that matches ``pretrained`` weights: QuickGELU ones (OpenAI's and others trained
    with it) need the ``-quickgelu`` variant; open_clip 3 only warns about the mismatch."""
    if pretrained and not is_weights_path(pretrained):
        if pretrained_config(model_name, pretrained).get("quick_gelu"):
            return quick_gelu_name(model_name)
    return model_name


OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")


def is_weights_path(pretrained: str) -> bool:
    """Whether ``pretrained`` names a file rather than an open_clip tag (tags have no / or .)."""
    return bool(Path(pretrained).suffix) or "/" in pretrained or os.sep in pretrained
