"""Models of TULIP: teachers, the RoPE student, the Long-CLIP baseline, checkpoints (no Kedro)."""

from tulip_pipelines.models.checkpoint import (
    load_bundle,
    load_model,
    load_original_checkpoint,
    save_model,
)
from tulip_pipelines.models.clip import (
    RopeCLIP,
    build_architecture,
    build_student,
    check_model_name,
    create_teacher,
    expand_rope_context,
    get_tokenizer,
    register_tiny_configs,
    stretch_position_embedding,
    stretch_positions,
)
from tulip_pipelines.models.spec import ModelBundle, ModelSpec

register_tiny_configs()

__all__ = [
    "ModelBundle",
    "ModelSpec",
    "RopeCLIP",
    "build_architecture",
    "build_student",
    "check_model_name",
    "create_teacher",
    "expand_rope_context",
    "get_tokenizer",
    "load_bundle",
    "load_model",
    "load_original_checkpoint",
    "register_tiny_configs",
    "save_model",
    "stretch_position_embedding",
    "stretch_positions",
]
