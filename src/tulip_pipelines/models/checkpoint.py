"""Checkpoints: a directory with ``model.safetensors`` and ``config.json`` (a :class:`ModelSpec`),
plus the published TULIP ``epoch_N.pt`` files."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from tulip_pipelines.models.clip import (
    build_architecture,
    build_student,
    bundle,
    create_teacher,
    load_weights_file,
    teacher_architecture,
)
from tulip_pipelines.models.spec import ModelBundle, ModelSpec

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# Keys that only the text tower of an original stage-1 (distillation) checkpoint holds.
TEXT_PREFIXES = ("token_embedding.", "transformer.", "ln_final.", "text_projection")


def save_model(model_bundle: ModelBundle, path: str | Path) -> None:
    """Write ``path/`` atomically: a temporary sibling directory renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        weights = model_bundle.model.state_dict()
        state = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        save_file(state, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(model_bundle.spec.to_dict(), indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load_bundle(path: str | Path, device: str = "cpu", **original_kwargs) -> ModelBundle:
    """Load a checkpoint directory written by :func:`save_model`, or an original TULIP file
    (``original_kwargs`` such as ``teacher="ViT-L-14"``, ``pretrained=...`` go to
    :func:`load_original_checkpoint`)."""
    path = Path(path)
    if path.is_file():
        return _to(load_original_checkpoint(path, **original_kwargs), device)
    if original_kwargs:
        raise TypeError(f"{sorted(original_kwargs)} only apply to original TULIP files, not to {path}")
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected {path / CONFIG} and {path / WEIGHTS} "
            "(written by tulip_pipelines.models.save_model) or a TULIP epoch_N.pt file"
        )
    spec = ModelSpec.from_dict(json.loads((path / CONFIG).read_text()))
    model = build_architecture(spec)
    model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    return _to(bundle(model, spec), device)


def load_model(path: str | Path, device: str = "cpu", **original_kwargs):
    """One call: ``(model, preprocess, tokenizer)`` from a checkpoint directory or epoch_N.pt
    (for a stage-1 file name its teacher: ``load_model(p, teacher="ViT-L-14",
    pretrained="openai")``)."""
    return load_bundle(path, device, **original_kwargs).as_tuple()


def _to(model_bundle: ModelBundle, device: str) -> ModelBundle:
    model_bundle.model.to(device)
    return model_bundle


def load_original_checkpoint(
    path: str | Path,
    *,
    teacher: str = "ViT-L-14",
    pretrained: str | None = "openai",
    context_length: int = 248,
    rope_theta: float = 10000.0,
    activation: str | None = "gelu",
    cache_dir: str | None = None,
) -> ModelBundle:
    """A checkpoint published by the TULIP authors (``epoch_N.pt``, loaded ``weights_only``).

    ``teacher`` is the open_clip model name the student was distilled from (its architecture);
    ``pretrained`` the teacher's weights (an open_clip tag from the local cache, or a file).
    Stage 1 (distillation) files hold only the student's text tower; its image tower comes from
    that teacher. Stage 2 files hold a whole CLIP, whose leftover ``positional_embedding`` is
    unused by a RoPE text tower and dropped; ``pretrained`` then only picks the image tower's
    activation (QuickGELU for OpenAI's). The original student's text tower used plain GELU
    (``activation``) and, in the authors' evaluation, RoPE base 10000 (``rope_theta``).
    """
    state = load_weights_file(path)
    if not any(k.startswith("transformer.resblocks.") for k in state):
        raise ValueError(f"{path} holds no text transformer (keys: {sorted(state)[:5]}...)")
    whole = any(k.startswith("visual.") for k in state)
    state.pop("positional_embedding", None)
    if whole:
        name = teacher_architecture(teacher, pretrained)
        base = bundle(build_architecture(ModelSpec(name)), ModelSpec(name))
    else:
        base = create_teacher(teacher, pretrained, cache_dir=cache_dir)
    student = build_student(base, context_length, rope_theta, activation)
    if whole:
        missing, unexpected = student.model.load_state_dict(state, strict=False)
        problems = [k for k in missing if k != "logit_bias"] + list(unexpected)
    else:
        text_keys = {k for k in student.model.state_dict() if k.startswith(TEXT_PREFIXES)}
        unexpected = sorted(set(state) - text_keys)
        missing = sorted(text_keys - set(state))
        student.model.load_state_dict(state, strict=False)
        problems = missing + unexpected
    if problems:
        raise ValueError(f"{path} does not match a {teacher} TULIP student: {problems[:8]}")
    student.spec.extra = {"origin": f"tulip-original-stage{2 if whole else 1}", "file": str(path)}
    logger.info("loaded original TULIP stage-%d checkpoint %s", 2 if whole else 1, path)
    return student

