"""The project's CLIP models, built with open_clip's factory, by how the text tower knows where a
token is: :class:`AbsoluteCLIP` (learned absolute positions: the teachers, Long-CLIP) and
:class:`RopeCLIP` (rotary embeddings in every attention layer: the TULIP student)."""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.transformer import QuickGELU, text_global_pool
from torch import nn

from tulip_pipelines.models.configs import check_model_name, register_tiny_configs
from tulip_pipelines.models.pretrained import (
    OPENAI_SCALARS,
    is_weights_path,
    load_weights_file,
    quick_gelu_name,
    teacher_architecture,
    weights_file,
)
from tulip_pipelines.models.spec import ModelBundle, ModelSpec

logger = logging.getLogger(__name__)

ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


def get_tokenizer(model_name: str, context_length: int):
    """open_clip's tokenizer for ``model_name`` at ``context_length`` (truncates, keeps EOT)."""
    register_tiny_configs()
    return open_clip.get_tokenizer(model_name, context_length=context_length)


def _preprocess(model) -> object:
    """open_clip's eval transform for the model's image size and normalisation."""
    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)


def train_preprocess(model) -> object:
    """open_clip's train transform for the model's image size and normalisation:
    RandomResizedCrop (scale 0.9-1, bicubic) then the eval transform's tensor and normalisation
    (what TULIP's stage 2 trains with; its random draws come from torch's generator, which the
    engine seeds per sample)."""
    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=True)


def bundle(model: nn.Module, spec: ModelSpec) -> ModelBundle:
    model.eval()
    tokenizer = get_tokenizer(spec.model_name, spec.context_length)
    return ModelBundle(model, spec, _preprocess(model), tokenizer)


def set_text_activation(model: nn.Module, activation: str | None) -> None:
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
            raise ValueError(
                f"{text.shape[1]} tokens exceed the context length {self.context_length}"
            )
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


def new_clip(model_name: str, cls: type[AbsoluteCLIP] = AbsoluteCLIP,
             context_length: int | None = None, **cls_kwargs) -> AbsoluteCLIP:
    """A randomly initialised ``cls`` (:class:`AbsoluteCLIP` or a subclass) of open_clip's
    ``model_name`` config, built through its constructor as open_clip's ``create_model`` builds
    a plain CLIP, with the same preprocess config attached. ``context_length`` overrides the
    config's text context (e.g. a stretched position table); ``cls_kwargs`` go to ``cls``."""
    register_tiny_configs()
    config = copy.deepcopy(open_clip.get_model_config(model_name))
    if config is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    text_cfg, vision_cfg = config.get("text_cfg", {}), config.get("vision_cfg", {})
    if (config.pop("custom_text", False) or "hf_model_name" in text_cfg
            or "timm_model_name" in vision_cfg or "multimodal_cfg" in config):
        raise ValueError(f"{model_name} is not a plain open_clip CLIP; not supported")
    if context_length is not None:
        text_cfg["context_length"] = context_length
    preprocess = merge_preprocess_dict(asdict(PreprocessCfg()), config.pop("preprocess_cfg", {}))
    model = cls(**config, **cls_kwargs)
    preprocess["size"] = model.visual.image_size
    set_model_preprocess_cfg(model, preprocess)
    return model


def derived_clip(source: nn.Module, spec: ModelSpec, cls: type[AbsoluteCLIP] = AbsoluteCLIP,
                 state: dict[str, torch.Tensor] | None = None, **cls_kwargs) -> AbsoluteCLIP:
    """A ``cls`` of ``spec``'s architecture holding ``state`` (default: ``source``'s weights),
    with ``spec``'s text activation. Built without touching the global random state, so that
    deriving a model (a student, a stretched baseline) changes no later random draw."""
    with torch.random.fork_rng(devices=[]):
        model = new_clip(spec.model_name, cls, spec.context_length, **cls_kwargs)
    set_text_activation(model, spec.activation)
    model.load_state_dict(source.state_dict() if state is None else state, strict=True)
    return model

def create_teacher(
    model_name: str,
    pretrained: str | None = None,
    *,
    cache_dir: str | None = None,
    activation: str | None = None,
    download: bool = True,
) -> ModelBundle:
    """An open_clip CLIP with absolute position embeddings.

    ``pretrained``: ``None`` (random init, the embedded default trains it), an open_clip tag such
    as ``"openai"`` (from the local caches, else downloaded and cached as open_clip does unless
    ``HF_HUB_OFFLINE=1`` or ``download=False``), or a weights file path (open_clip or OpenAI
    state dict, OpenAI's TorchScript release, safetensors). Weights trained
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
            path = weights_file(model_name, pretrained, cache_dir, download)
        state = load_weights_file(path)
        if OPENAI_SCALARS[0] in state:  # OpenAI's format: QuickGELU everywhere
            name = quick_gelu_name(model_name)
        for key in OPENAI_SCALARS:
            state.pop(key, None)
    model = new_clip(name)
    if state is not None:
        model.load_state_dict(state, strict=True)
        logger.info("teacher %s: loaded %s", name, path)
    else:
        logger.info("teacher %s: random initialisation (to be trained from scratch)", name)
    set_text_activation(model, activation)
    extra = {"pretrained": pretrained} if pretrained else {}
    spec = ModelSpec(name, "absolute", model.context_length, activation=activation, extra=extra)
    return bundle(model, spec)


# The TULIP student: RoPE instead of learned absolute positions

class RopeCLIP(AbsoluteCLIP):
    """open_clip's CLIP whose text tower uses RoPE in every attention layer (one
    :class:`RotaryEmbedding` of base ``rope_theta`` shared by all), no absolute position
    embedding, and any input length up to ``context_length``."""

    def __init__(self, *args, rope_theta: float = 10000.0, **kwargs):
        super().__init__(*args, **kwargs)
        heads = self.transformer.resblocks[0].attn.num_heads
        self.rotary = RotaryEmbedding(self.transformer.width // heads, rope_theta)
        for block in self.transformer.resblocks:
            mha = block.attn
            block.attn = RopeSelfAttention(mha.embed_dim, mha.num_heads, self.rotary,
                                           batch_first=mha.batch_first)
        del self.positional_embedding
        self.attn_mask = torch.empty(0)

    def text_transformer(self, x: torch.Tensor) -> torch.Tensor:
        """No absolute positions: RoPE and the causal mask act inside every attention layer."""
        return self.transformer(x, attn_mask=None)


def rope_state(absolute: AbsoluteCLIP) -> dict[str, torch.Tensor]:
    """An absolute-position CLIP's weights as a :class:`RopeCLIP` holds them (the same tensors
    less the position table: attention keeps its projection weights)."""
    return {k: v for k, v in absolute.state_dict().items() if k != "positional_embedding"}


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
    spec = ModelSpec(
        teacher.spec.model_name, "rope", context_length, rope_theta,
        activation or teacher.spec.activation,
        extra={"teacher": asdict(teacher.spec)},
    )  # fmt: skip
    model = derived_clip(teacher.model, spec, RopeCLIP, rope_state(teacher.model),
                         rope_theta=rope_theta)
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


# Rotary position embeddings (RoPE) in the text tower's attention

def ntk_scaled_theta(
    theta: float, head_dim: int, old_len: int, new_len: int, scale: float
) -> float:
    """NTK-style RoPE base for a longer context:
    ``theta * (s * new/old - (s - 1)) ** (d / (d - 2))``."""
    if new_len <= old_len:
        return theta
    return theta * (scale * new_len / old_len - (scale - 1)) ** (head_dim / (head_dim - 2))


class RotaryEmbedding(nn.Module):
    """Interleaved RoPE with its cos/sin tables (one complex64 table, ``cos + i sin``) cached per
    (length, device, theta); the rotation is a complex multiplication in float32."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self._cache: dict[tuple, torch.Tensor] = {}

    def set_theta(self, theta: float) -> None:
        self.theta = float(theta)
        self._cache.clear()

    def table(self, length: int, device: torch.device) -> torch.Tensor:
        """``exp(i * pos * theta ** (-2j / head_dim))`` as complex64, shape
        [length, head_dim / 2]."""
        key = (length, device, self.theta)
        if key not in self._cache:
            channels = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64)
            positions = torch.arange(length, device=device, dtype=torch.float64)
            angles = torch.outer(positions, self.theta ** -(channels / self.head_dim))
            self._cache[key] = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
        return self._cache[key]

    def rotate(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate ``x`` of shape [..., L, head_dim]: channels (2j, 2j+1) at position p turn by
        ``p * theta ** (-2j / head_dim)``. Math in float32, result in x's dtype."""
        if positions is None:
            table = self.table(x.shape[-2], x.device)
        else:
            table = self.table(int(positions.max()) + 1, x.device)[positions]
        xf = x.float()
        if xf.stride(-1) != 1 or any(s % 2 for s in xf.stride()[:-1]):
            xf = xf.contiguous()  # view_as_complex needs (real, imag) pairs adjacent in memory
        rotated = torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * table
        return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


class RopeSelfAttention(nn.Module):
    """Causal self-attention with RoPE on q and k through ``scaled_dot_product_attention``.

    Called like ``nn.MultiheadAttention`` by open_clip's residual block; the block's additive mask
    is ignored in favour of SDPA's causal mode (the text tower is always causal).
    """

    def __init__(self, width: int, heads: int, rotary: RotaryEmbedding, batch_first: bool = True):
        super().__init__()
        self.width, self.heads, self.batch_first = width, heads, batch_first
        self.head_dim = width // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # shared by every layer; not a submodule so it appears once and holds no state to save
        object.__setattr__(self, "rotary", rotary)

    def project_qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (rotated) and v as [batch, heads, L, head_dim] from x [batch, L, width]."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k = self.rotary.rotate(qkv[:2]).unbind(0)  # q and k in one pass
        return q, k, qkv[2]

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        x = query if self.batch_first else query.transpose(0, 1)
        q, k, v = self.project_qk(x)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        return (out if self.batch_first else out.transpose(0, 1)), None
