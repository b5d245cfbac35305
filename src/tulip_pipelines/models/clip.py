"""Teachers, the RoPE student and the Long-CLIP baseline, all built with open_clip's factory."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import QuickGELU, text_global_pool
from torch import nn

from tulip_pipelines.models.rope import RopeSelfAttention, RotaryEmbedding, ntk_scaled_theta
from tulip_pipelines.models.spec import ModelBundle, ModelSpec

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


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
            f"{[m for m in open_clip.list_models() if m.startswith(('ViT-B', 'ViT-L', 'TULIP'))][:12]}"
        )


def get_tokenizer(model_name: str, context_length: int):
    """open_clip's tokenizer for ``model_name`` at ``context_length`` (truncates, keeps EOT)."""
    register_tiny_configs()
    return open_clip.get_tokenizer(model_name, context_length=context_length)


def _preprocess(model) -> object:
    """open_clip's eval transform for the model's image size and normalisation."""
    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)


def bundle(model: nn.Module, spec: ModelSpec) -> ModelBundle:
    model.eval()
    tokenizer = get_tokenizer(spec.model_name, spec.context_length)
    return ModelBundle(model, spec, _preprocess(model), tokenizer)


def _set_text_activation(model: nn.Module, activation: str | None) -> None:
    if activation is None:
        return
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; one of {sorted(ACTIVATIONS)}")
    for block in model.transformer.resblocks:
        block.mlp.gelu = ACTIVATIONS[activation]()


class AbsoluteCLIP(open_clip.CLIP):
    """open_clip's CLIP, reading any length up to ``context_length``: the position embedding and
    causal mask are cut to the input. Outputs equal open_clip's for padded input, since padding
    after the end-of-text token is invisible to a causal text tower pooled at that token."""

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if text.shape[1] > self.context_length:
            raise ValueError(f"{text.shape[1]} tokens exceed the context length {self.context_length}")
        x = self.text_transformer(self.token_embedding(text).to(self.transformer.get_cast_dtype()))
        eos_id = getattr(self, "text_eos_id", None)
        x = text_global_pool(self.ln_final(x), text, self.text_pool_type, eos_token_id=eos_id)
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def text_transformer(self, x: torch.Tensor) -> torch.Tensor:
        """Token embeddings [N, L, width] -> transformer output: absolute positions added, the
        causal mask cut to L."""
        length = x.shape[1]
        x = x + self.positional_embedding[:length].to(x.dtype)
        return self.transformer(x, attn_mask=self.attn_mask[:length, :length])


def _new_clip(model_name: str, **kwargs) -> AbsoluteCLIP:
    model = open_clip.create_model(model_name, **kwargs)
    if type(model) is not open_clip.CLIP:
        raise ValueError(
            f"{model_name} is not a plain open_clip CLIP ({type(model).__name__}); not supported"
        )
    model.__class__ = AbsoluteCLIP
    return model


# ---------------------------------------------------------------------------------------------
# Teachers


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


def cached_weights_file(model_name: str, tag: str, cache_dir: str | None = None) -> Path:
    """The local file of open_clip's ``tag`` weights, never downloading: the Hugging Face hub
    cache (``cache_dir``, then ``HF_HUB_CACHE``/``HF_HOME``) and open_clip's URL cache
    (``cache_dir`` or ``~/.cache/clip``)."""
    cfg = pretrained_config(model_name, tag)
    looked = []
    if cfg.get("hf_hub"):
        repo_id, filename = os.path.split(cfg["hf_hub"])
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for directory in _hf_cache_dirs(cache_dir):
            looked.append(f"{directory} (hub repo {repo_id}: {', '.join(names)})")
            for name in names:
                found = try_to_load_from_cache(repo_id, name, cache_dir=directory)
                if isinstance(found, str):
                    return Path(found)
    if cfg.get("url"):
        for directory in dict.fromkeys([cache_dir or os.path.expanduser("~/.cache/clip"),
                                        os.path.expanduser("~/.cache/clip")]):  # fmt: skip
            candidate = Path(directory) / os.path.basename(cfg["url"])
            looked.append(str(candidate))
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"weights for {model_name} pretrained={tag!r} are not in the local cache; looked in: "
        f"{'; '.join(looked)}. This project never downloads: copy the weights there (Hugging Face "
        "hub layout, or open_clip's URL cache), or set `pretrained` to the path of a weights file "
        f"(e.g. {cfg.get('url', 'the released checkpoint')})."
    )


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a weights file: safetensors, a ``torch.save`` dict (``weights_only``),
    or OpenAI's TorchScript archive. ``state_dict``/``model`` wrappers and ``module.`` prefixes go."""
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


def create_teacher(
    model_name: str,
    pretrained: str | None = None,
    *,
    cache_dir: str | None = None,
    activation: str | None = None,
) -> ModelBundle:
    """An open_clip CLIP with absolute position embeddings.

    ``pretrained``: ``None`` (random init, the embedded default trains it), an open_clip tag such
    as ``"openai"`` resolved from the local cache only (never downloaded), or a weights file path
    (open_clip or OpenAI state dict, OpenAI's TorchScript release, safetensors). Weights trained
    with QuickGELU (OpenAI's) select the ``-quickgelu`` config, recorded in ``spec.model_name``.
    ``activation`` overrides the text tower's activation only.
    """
    check_model_name(model_name)
    name, state = teacher_architecture(model_name, pretrained), None
    if pretrained:
        if is_weights_path(pretrained):
            if not Path(pretrained).is_file():
                raise FileNotFoundError(f"teacher weights file not found: {pretrained}")
            path = Path(pretrained)
        else:
            path = cached_weights_file(model_name, pretrained, cache_dir)
        state = load_weights_file(path)
        if OPENAI_SCALARS[0] in state:  # OpenAI's format: QuickGELU everywhere
            name = quick_gelu_name(model_name)
        for key in OPENAI_SCALARS:
            state.pop(key, None)
    model = _new_clip(name)
    if state is not None:
        model.load_state_dict(state, strict=True)
        logger.info("teacher %s: loaded %s", name, path)
    _set_text_activation(model, activation)
    extra = {"pretrained": pretrained} if pretrained else {}
    spec = ModelSpec(name, "absolute", model.context_length, activation=activation, extra=extra)
    return bundle(model, spec)


# ---------------------------------------------------------------------------------------------
# The TULIP student


class RopeCLIP(AbsoluteCLIP):
    """open_clip's CLIP whose text tower uses RoPE in every attention layer, no absolute
    position embedding, and any input length up to ``context_length``."""

    def text_transformer(self, x: torch.Tensor) -> torch.Tensor:
        """No absolute positions: RoPE and the causal mask act inside every attention layer."""
        return self.transformer(x, attn_mask=None)


def _to_rope(model: AbsoluteCLIP, context_length: int, rope_theta: float) -> RopeCLIP:
    """Turn a CLIP into a RopeCLIP in place (shared weights): swap attention, drop positions."""
    heads = model.transformer.resblocks[0].attn.num_heads
    rotary = RotaryEmbedding(model.transformer.width // heads, rope_theta)
    for block in model.transformer.resblocks:
        block.attn = RopeSelfAttention.from_multihead(block.attn, rotary)
    del model.positional_embedding
    model.attn_mask = torch.empty(0)
    model.context_length = context_length
    model.__class__ = RopeCLIP
    model.rotary = rotary
    return model


def build_student(
    teacher: ModelBundle,
    context_length: int = 248,
    rope_theta: float = 10000.0,
    activation: str | None = None,
) -> ModelBundle:
    """The TULIP student: a copy of the teacher (token embedding, transformer blocks, final norm,
    text projection, image tower, logit scale) with RoPE instead of the position embedding."""
    if context_length < teacher.spec.context_length:
        raise ValueError(
            f"student context_length {context_length} is shorter than the teacher's "
            f"{teacher.spec.context_length}; TULIP only lengthens the context"
        )
    model = _to_rope(copy.deepcopy(teacher.model), context_length, rope_theta)
    _set_text_activation(model, activation)
    spec = ModelSpec(
        teacher.spec.model_name, "rope", context_length, rope_theta,
        activation or teacher.spec.activation,
        extra={"teacher": teacher.spec.to_dict()},
    )  # fmt: skip
    return bundle(model, spec)


def expand_rope_context(
    student: ModelBundle, new_context_length: int, ntk_scale: float | None = None
) -> ModelBundle:
    """Lengthen a student's context; with ``ntk_scale`` also rescale the RoPE base NTK-style."""
    if student.spec.kind != "rope":
        raise ValueError("expand_rope_context needs a RoPE student")
    model = copy.deepcopy(student.model)
    theta = student.spec.rope_theta
    if ntk_scale is not None:
        old_length, head_dim = student.spec.context_length, model.rotary.head_dim
        theta = ntk_scaled_theta(theta, head_dim, old_length, new_context_length, ntk_scale)
    model.rotary.set_theta(theta)
    model.context_length = new_context_length
    spec = copy.deepcopy(student.spec)
    spec.context_length, spec.rope_theta = new_context_length, theta
    return bundle(model, spec)


# ---------------------------------------------------------------------------------------------
# Long-CLIP


def stretch_positions(pos: torch.Tensor, new_length: int = 248, keep: int = 20) -> torch.Tensor:
    """Long-CLIP's knowledge-preserved stretching of an absolute position embedding.

    Rule (Zhang et al., "Long-CLIP: Unlocking the Long-Text Capability of CLIP", ECCV 2024,
    Sec. 3.1; beichenzbc/Long-CLIP): the first ``keep`` positions, which CLIP trained well, stay
    as they are; every later gap between consecutive positions ``i`` and ``i+1`` is filled by
    linear interpolation with ``ratio - 1`` new points (ratio 4 for 77 -> 248), and the last
    trained position is extrapolated along its last difference to fill the tail.
    """
    old_length, _ = pos.shape
    rest = new_length - keep
    ratio = rest // (old_length - keep)
    if ratio < 1 or keep >= old_length:
        raise ValueError(f"cannot stretch {old_length} positions to {new_length} keeping {keep}")
    out = torch.empty(new_length, pos.shape[1], dtype=pos.dtype)
    out[:keep] = pos[:keep]
    for j in range(rest):
        src = keep + j / ratio
        lo = min(int(src), old_length - 2)
        frac = src - lo
        out[keep + j] = (1 - frac) * pos[lo] + frac * pos[lo + 1]
    return out


def stretch_position_embedding(
    teacher: ModelBundle, new_length: int = 248, keep: int = 20
) -> ModelBundle:
    """The Long-CLIP baseline: the teacher with its position embedding stretched to ``new_length``."""
    if teacher.spec.kind != "absolute":
        raise ValueError("Long-CLIP stretching needs a model with absolute position embeddings")
    model = copy.deepcopy(teacher.model)
    with torch.no_grad():
        stretched = stretch_positions(model.positional_embedding.detach().float(), new_length, keep)
    model.positional_embedding = nn.Parameter(stretched.to(model.positional_embedding.dtype))
    mask = torch.full((new_length, new_length), float("-inf")).triu_(1)
    model.attn_mask = mask
    model.context_length = new_length
    spec = ModelSpec(
        teacher.spec.model_name, "absolute", new_length, activation=teacher.spec.activation,
        extra={"origin": "longclip-stretch", "keep": keep, "teacher": teacher.spec.to_dict()},
    )  # fmt: skip
    return bundle(model, spec)


def build_architecture(spec: ModelSpec) -> nn.Module:
    """A randomly initialised model of the architecture ``spec`` describes (for loading weights)."""
    check_model_name(spec.model_name)
    model = _new_clip(spec.model_name)
    _set_text_activation(model, spec.activation)
    if spec.kind == "rope":
        return _to_rope(model, spec.context_length, spec.rope_theta)
    if spec.context_length != model.context_length:
        base_spec = ModelSpec(spec.model_name, context_length=model.context_length)
        base = ModelBundle(model, base_spec, None, None)
        return stretch_position_embedding(base, spec.context_length).model
    return model
