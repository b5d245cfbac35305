"""Models of TULIP: teachers, the RoPE student, the Long-CLIP baseline, model files (no Kedro)."""

from tulip_pipelines.models.clip import create_teacher, get_tokenizer
from tulip_pipelines.models.configs import (
    check_model_name,
    register_tiny_configs,
    teacher_context_length,
)
from tulip_pipelines.models.files import build_architecture, load_bundle, load_model, save_model
from tulip_pipelines.models.longclip import stretch_position_embedding, stretch_positions
from tulip_pipelines.models.original import load_original_checkpoint
from tulip_pipelines.models.spec import ModelBundle, ModelSpec
from tulip_pipelines.models.student import RopeCLIP, build_student, expand_rope_context

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
    "teacher_context_length",
]
