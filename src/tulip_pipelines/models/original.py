"""The TULIP authors' own checkpoints (``epoch_N.pt``), loaded ``weights_only``."""

from __future__ import annotations

import logging
from pathlib import Path

from tulip_pipelines.models.clip import build_student, bundle, create_teacher, new_clip
from tulip_pipelines.models.pretrained import load_weights_file, teacher_architecture
from tulip_pipelines.models.spec import ModelBundle, ModelSpec

logger = logging.getLogger(__name__)

# Keys that only the text tower of an original stage-1 (distillation) checkpoint holds.
TEXT_PREFIXES = ("token_embedding.", "transformer.", "ln_final.", "text_projection")


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
        base = bundle(new_clip(name), ModelSpec(name))
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

