"""Model files: a model directory holds ``model.safetensors``, ``config.json``
(a :class:`ModelSpec`) and ``MODEL_CARD.md`` (for readers; loading ignores it).
:func:`load_bundle` also reads the TULIP authors' ``epoch_N.pt`` checkpoints (:mod:`.original`)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from tulip_pipelines import atomic
from tulip_pipelines.models.card import CARD, render_model_card
from tulip_pipelines.models.clip import (
    AbsoluteCLIP,
    RopeCLIP,
    bundle,
    new_clip,
    set_text_activation,
)
from tulip_pipelines.models.configs import check_model_name
from tulip_pipelines.models.original import load_original_checkpoint
from tulip_pipelines.models.spec import ModelBundle, ModelSpec

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_model(model_bundle: ModelBundle, path: str | Path) -> None:
    """Write ``path/`` atomically (a temporary sibling directory renamed into place): the
    weights, ``config.json`` and the model card ``MODEL_CARD.md`` (:mod:`.card`)."""
    with atomic.atomic_directory(path) as tmp:
        weights = model_bundle.model.state_dict()
        state = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        save_file(state, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(asdict(model_bundle.spec), indent=2) + "\n")
        (tmp / CARD).write_text(render_model_card(model_bundle.spec), encoding="utf-8")


def load_bundle(path: str | Path, device: str = "cpu", **original_kwargs) -> ModelBundle:
    """Load a model directory written by :func:`save_model` or an original TULIP file
    (``original_kwargs`` such as ``teacher="ViT-L-14"``, ``pretrained=...`` go to
    :func:`load_original_checkpoint`). MLflow URIs are resolved above this layer
    (:func:`tulip_pipelines.serving.registry.resolve_bundle`)."""
    path = Path(path)
    if path.is_file():
        return _to(load_original_checkpoint(path, **original_kwargs), device)
    if original_kwargs:
        raise TypeError(
            f"{sorted(original_kwargs)} only apply to original TULIP files, not to {path}"
        )
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"no model at {path}: expected {path / CONFIG} and {path / WEIGHTS} "
            "(written by tulip_pipelines.models.save_model) or a TULIP epoch_N.pt file"
        )
    spec = ModelSpec.from_dict(json.loads((path / CONFIG).read_text()))
    model = build_architecture(spec)
    model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    loaded = bundle(model, spec)
    loaded.source_dir = path
    return _to(loaded, device)


def load_model(path: str | Path, device: str = "cpu", **original_kwargs):
    """One call: ``(model, preprocess, tokenizer)`` from a model directory or epoch_N.pt (for a
    stage-1 file name its teacher: ``load_model(p, teacher="ViT-L-14", pretrained="openai")``)."""
    return load_bundle(path, device, **original_kwargs).as_tuple()


def _to(model_bundle: ModelBundle, device: str) -> ModelBundle:
    model_bundle.model.to(device)
    return model_bundle


def build_architecture(spec: ModelSpec) -> nn.Module:
    """A randomly initialised model of the architecture ``spec`` describes (for loading weights)."""
    check_model_name(spec.model_name)
    if spec.kind == "rope":
        model = new_clip(spec.model_name, RopeCLIP, spec.context_length,
                         rope_theta=spec.rope_theta)
    else:
        model = new_clip(spec.model_name, AbsoluteCLIP, spec.context_length)
    set_text_activation(model, spec.activation)
    return model
