"""What a model *is*, independent of its weights: the contract shared by models, training and
evaluation code, and the JSON written in every model directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

PositionKind = Literal["absolute", "rope"]


@dataclass
class ModelSpec:
    """Architecture description saved as ``config.json`` in a model directory.

    Attributes:
        model_name: open_clip model config name (``"ViT-L-14"``, ``"TULIP-Tiny"``, ...).
        kind: ``"absolute"`` for an open_clip CLIP with a learned position embedding (teachers,
            Long-CLIP), ``"rope"`` for the TULIP student whose text tower uses rotary embeddings.
        context_length: number of text tokens the text tower reads (SOT and EOT included).
        rope_theta: RoPE base (``kind == "rope"`` only).
        activation: text-tower activation name (``"quick_gelu"`` or ``"gelu"``); ``None`` means
            the open_clip config's own.
        extra: free-form provenance (e.g. ``{"origin": "longclip-stretch", "keep": 20}``).
    """

    model_name: str
    kind: PositionKind = "absolute"
    context_length: int = 77
    rope_theta: float = 10000.0
    activation: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown ModelSpec field(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**data)


@dataclass
class ModelBundle:
    """A model with everything needed to use it: what catalog model entries load and save.

    ``model`` follows open_clip's CLIP interface: ``encode_image(images, normalize=False)``,
    ``encode_text(tokens, normalize=False)``, ``forward(image, text)`` and ``logit_scale``.
    ``tokenizer(list[str]) -> LongTensor[N, spec.context_length]``; ``preprocess(PIL.Image)``
    returns the image tensor the model expects. ``source_dir``: the model directory it was
    loaded from (where the evaluation adds its retrieval rows to the model card); ``None`` for a
    model built or trained in memory.
    """

    model: torch.nn.Module
    spec: ModelSpec
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    source_dir: Path | None = field(default=None, compare=False)

    def as_tuple(self):
        return self.model, self.preprocess, self.tokenizer
