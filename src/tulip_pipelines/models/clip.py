"""CLIP models with absolute position embeddings, built with open_clip's factory: the base class of
every model here, and the teachers."""

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
