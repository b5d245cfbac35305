"""Models of TULIP: teachers, the RoPE student, the Long-CLIP baseline, model files (no Kedro).

The names below are imported on first use (PEP 562), so that importing a light module such as
:mod:`.spec` does not pull in open_clip; this package's open_clip configs (``TULIP-Tiny``) are
registered by the functions that look model names up (:mod:`.configs`), not at import.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "create_teacher": "clip",
    "get_tokenizer": "clip",
    "check_model_name": "configs",
    "register_tiny_configs": "configs",
    "teacher_context_length": "configs",
    "build_architecture": "files",
    "load_bundle": "files",
    "load_model": "files",
    "save_model": "files",
    "stretch_position_embedding": "longclip",
    "stretch_positions": "longclip",
    "load_original_checkpoint": "original",
    "ModelBundle": "spec",
    "ModelSpec": "spec",
    "RopeCLIP": "clip",
    "build_student": "clip",
    "expand_rope_context": "clip",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
