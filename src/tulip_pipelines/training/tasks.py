"""Training tasks: what each stage optimises, as modules the engine trains.

A task's ``forward(batch)`` returns ``{"loss": ..., <scalars to log>}``; only its parameters with
``requires_grad`` are trained. A frozen teacher is held outside the registered submodules, so it
is neither optimised nor written into training checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tulip_pipelines.training.accumulation import StepCache, share_gradient
from tulip_pipelines.training.deepspeed_setup import gather_with_grad

TOWERS = ("image", "text", "logit_scale")
TEACHER_INPUTS = ("tokens", "windows")


def _tower(name: str) -> str:
    if name.startswith("visual."):
        return "image"
    if name in ("logit_scale", "logit_bias"):
        return "logit_scale"
    return "text"


def freeze_towers(model: nn.Module, train_towers: Iterable[str]) -> None:
    """Train only the named towers of a CLIP (``image``, ``text``, ``logit_scale``). Parameters
    the model lists in ``frozen_parameters`` (Long-CLIP's kept positions) stay frozen."""
    train_towers = set(train_towers)
    unknown = train_towers - set(TOWERS)
    if unknown or not train_towers:
        raise ValueError(
            f"train_towers must be a non-empty subset of {TOWERS}, got {sorted(train_towers)}"
        )
    always_frozen = set(getattr(model, "frozen_parameters", ()))
    for name, param in model.named_parameters():
        param.requires_grad_(_tower(name) in train_towers and name not in always_frozen)


CONTRASTIVE_BATCHES = ("global", "micro")


class ContrastiveTask(nn.Module):
    """CLIP loss on (image, long caption), plus optionally (image, short caption), over the
    global batch of an optimizer step (every process, every accumulated micro batch: see
    :mod:`tulip_pipelines.training.accumulation`).

    ``loss = long_weight * L(image, long) + short_weight * L(image', short)``: TULIP's expansion
    stage (0.8/0.2), the Long-CLIP baselines, and the demo teacher (1/0). ``image'`` is the image
    features' primary components (``short_image_components``, Long-CLIP) or the features
    themselves. ``label_smoothing`` applies to every cross-entropy (Long-CLIP: 0.1).
    ``max_logit_scale`` bounds the temperature: the ``logit_scale`` parameter is clamped to
    ``[0, ln max_logit_scale]`` after every optimizer step (:meth:`parameter_bounds`, open_clip's
    rule; ``None``: Long-CLIP, no clamp). Features are float32 and the loss is computed outside
    any autocast (in float32 unless the weights themselves are bfloat16).
    ``contrastive_batch``: ``global`` contrasts the whole batch of an optimizer step (every
    process, every micro batch: the exact gradient of that batch); ``micro`` contrasts each micro
    batch of each process alone (fewer negatives; not open_clip's ``--local-loss``, which keeps
    every negative and gives the global gradient).
    """

    def __init__(self, model: nn.Module, long_weight: float = 0.8, short_weight: float = 0.2,
                 train_towers: Iterable[str] = TOWERS, *, label_smoothing: float = 0.0,
                 short_image_components: int | None = None,
                 max_logit_scale: float | None = 100.0, contrastive_batch: str = "global"):
        super().__init__()
        if long_weight < 0 or short_weight < 0 or long_weight + short_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got {long_weight}, "
                             f"{short_weight}")
        self.model = model
        self.long_weight, self.short_weight = float(long_weight), float(short_weight)
        self.label_smoothing = float(label_smoothing)
        self.short_image_components = short_image_components
        self.max_logit_scale = max_logit_scale
        if contrastive_batch not in CONTRASTIVE_BATCHES:
            raise ValueError(f"contrastive_batch must be one of {CONTRASTIVE_BATCHES}, got "
                             f"{contrastive_batch!r}")
        # global: the engine caches a step's features (accumulation.py)
        self.global_batch = contrastive_batch == "global"
        freeze_towers(model, train_towers)

    def features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """L2-normalised features of this micro batch (the part of the loss that is per sample),
        upcast to float32 when the towers ran under autocast."""
        image = upcast(self.model.encode_image(batch["image"], normalize=True))
        out = {"image": image,
               "long": upcast(self.model.encode_text(batch["long"], normalize=True))}
        if self.short_weight:
            out["short"] = upcast(self.model.encode_text(batch["short"], normalize=True))
            if self.short_image_components:
                with no_autocast(image):
                    out["image_short"] = primary_components(image, self.short_image_components)
        return out

    def parameter_bounds(self) -> dict[nn.Parameter, tuple[float, float]]:
        """``logit_scale`` in ``[0, ln max_logit_scale]`` (clamped by the engine after every
        optimizer step), when it trains and ``max_logit_scale`` is set."""
        scale = self.model.logit_scale
        if self.max_logit_scale is None or not scale.requires_grad:
            return {}
        return {scale: (0.0, math.log(self.max_logit_scale))}

    def forward(self, batch: dict[str, torch.Tensor],
                cache: StepCache | None = None) -> dict[str, torch.Tensor]:
        feats = self.features(batch)
        if cache is not None:
            feats = cache.assemble(feats)
        with no_autocast(feats["image"]):
            if self.global_batch and self.training:
                feats = {key: gather_with_grad(value) for key, value in feats.items()}
            scale = self.model.logit_scale.exp()
            logged_scale = scale.detach()
            if cache is not None:
                scale = share_gradient(scale, cache.n)
            out = {"loss_long": clip_loss(feats["image"], feats["long"], scale,
                                          self.label_smoothing)}
            loss = self.long_weight * out["loss_long"]
            if self.short_weight:
                image = feats.get("image_short", feats["image"])
                out["loss_short"] = clip_loss(image, feats["short"], scale, self.label_smoothing)
                loss = loss + self.short_weight * out["loss_short"]
        out["loss"] = loss
        out["logit_scale"] = logged_scale
        return out


class DistillTask(nn.Module):
    """Relative position distillation: the RoPE student's text embedding follows the teacher's.

    ``teacher_input="tokens"``: both read the caption tokenised at the teacher's context (77).
    ``teacher_input="windows"``: the teacher embeds overlapping windows of the long caption and
    their mean is the target for the student reading the whole caption at its own context.
    The student's token embedding, image tower and logit scale stay frozen. A batch that
    carries ``teacher_embedding`` (the cached teacher text embeddings,
    ``training/teacher_embeddings.py``) needs no teacher.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, loss_type: str = "cosine",
                 teacher_input: str = "tokens"):
        super().__init__()
        if loss_type not in DISTILL_LOSSES:
            raise ValueError(f"unknown loss_type {loss_type!r}; one of {DISTILL_LOSSES}")
        if teacher_input not in TEACHER_INPUTS:
            raise ValueError(f"teacher_input must be 'tokens' or 'windows', got {teacher_input!r}")
        self.student = student
        self.loss_type, self.teacher_input = loss_type, teacher_input
        if teacher is not None:  # None: every batch carries its cached embedding
            teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # frozen, not a submodule: not checkpointed
        for name, param in student.named_parameters():
            param.requires_grad_(_tower(name) == "text" and not name.startswith("token_embedding."))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = batch["teacher_long"] if self.teacher_input == "tokens" else batch["long"]
        student = self.student.encode_text(tokens).float()
        if "teacher_embedding" in batch:  # cached (training/teacher_embeddings.py)
            target = batch["teacher_embedding"].float()
        else:
            self.teacher.to(tokens.device)
            target = teacher_text_embedding(self.teacher, batch, self.teacher_input)
        with no_autocast(student):
            loss = distill_loss(student, target, self.loss_type)
            cosine = torch.nn.functional.cosine_similarity(student.detach(), target, dim=-1)
        return {"loss": loss, "cosine": cosine.mean()}


@torch.no_grad()
def teacher_text_embedding(teacher: nn.Module, batch: dict[str, torch.Tensor],
                           teacher_input: str) -> torch.Tensor:
    """The frozen teacher's text embedding (float32): of ``teacher_long`` tokens, or the mean
    over the windows a caption fills (``windows``/``window_mask``)."""
    if teacher_input == "tokens":
        return teacher.encode_text(batch["teacher_long"]).float()
    windows, mask = batch["windows"], batch["window_mask"]
    flat = teacher.encode_text(windows[mask]).float()
    sums = torch.zeros(mask.shape[0], flat.shape[-1], device=flat.device)
    sums.index_add_(0, mask.nonzero()[:, 0].to(flat.device), flat)
    return sums / mask.sum(1, keepdim=True).clamp(min=1).to(flat.device)


def upcast(features: torch.Tensor) -> torch.Tensor:
    """Features computed under autocast (bfloat16) as float32; float32 ones as they are."""
    return features.float() if features.dtype in (torch.bfloat16, torch.float16) else features


def no_autocast(like: torch.Tensor):
    """A region without autocast on ``like``'s device: where logits and losses are computed."""
    return torch.autocast(like.device.type, enabled=False)


# The losses: the contrastive loss over long and short captions, distillation's cosine / MSE / L2

DISTILL_LOSSES = ("cosine", "mse", "l2")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor,
                 loss_type: str = "cosine") -> torch.Tensor:
    """Loss between student and teacher text embeddings [batch, dim].

    ``cosine``: 1 - mean cosine similarity; ``mse``: mean squared error over all entries;
    ``l2``: mean over the batch of the L2 norm of the difference.
    """
    if loss_type == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1).mean()
    if loss_type == "mse":
        return F.mse_loss(student, teacher)
    if loss_type == "l2":
        return (student - teacher).norm(dim=-1).mean()
    raise ValueError(f"unknown distillation loss_type {loss_type!r}; one of {DISTILL_LOSSES}")


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """CLIP's symmetric contrastive loss on L2-normalised features of matching pairs: the mean of
    the image-to-text and text-to-image cross-entropies (optionally label-smoothed, as Long-CLIP
    trains), each averaged over the batch."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2


def primary_components(features: torch.Tensor, k: int) -> torch.Tensor:
    """Long-CLIP's *primary component matching* of image features [batch, dim]: centred over the
    batch, projected on their first ``k`` principal directions (exact SVD, float32) and back into
    the feature space, the mean added back; not renormalised. With ``k`` at least the batch's rank
    the features come back unchanged (and the SVD, whose gradient is undefined for repeated
    singular values, is skipped)."""
    if k >= min(features.shape):
        return features
    mean = features.mean(dim=0, keepdim=True)
    centred = (features - mean).float()
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    basis = vh[:k].T
    return ((centred @ basis) @ basis.T).to(features.dtype) + mean
