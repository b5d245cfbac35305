"""open_clip model configs: this package's own (``TULIP-Tiny``) and looking names up."""

from __future__ import annotations

from pathlib import Path

import open_clip

CONFIG_DIR = Path(__file__).parent / "configs"
KNOWN_PREFIXES = ("ViT-B", "ViT-L", "TULIP")  # what an unknown-name error lists


def register_tiny_configs() -> list[str]:
    """Register this package's open_clip configs (``TULIP-Tiny``); idempotent."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    if any(n not in open_clip.list_models() for n in names):
        open_clip.add_model_config(CONFIG_DIR)
    return names


def check_model_name(model_name: str) -> None:
    register_tiny_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {model_name!r}; known include "
            f"{[m for m in open_clip.list_models() if m.startswith(KNOWN_PREFIXES)][:12]}"
        )


def teacher_context_length(model_name: str) -> int:
    """The text context of open_clip's ``model_name`` config (77 for CLIP)."""
    register_tiny_configs()
    return open_clip.get_model_config(model_name)["text_cfg"].get("context_length", 77)


def image_input_size(model_name: str) -> int:
    """The image side open_clip's ``model_name`` config expects (224 for ViT-L-14, 48 for
    TULIP-Tiny); the larger side for a non-square input."""
    check_model_name(model_name)
    size = open_clip.get_model_config(model_name)["vision_cfg"]["image_size"]
    return max(size) if isinstance(size, (list, tuple)) else int(size)
