"""Exact gradient accumulation for losses over the whole batch of an optimizer step.

A contrastive loss couples the samples of a batch: with gradient accumulation, contrasting each
micro batch alone sees fewer negatives than the batch the optimizer steps on. open_clip's scheme
(which TULIP's scripts use) makes ``micro x accumulation x processes`` train like one batch:

1. every micro batch of the step is encoded once without gradient, and its features cached;
2. each micro batch is then encoded again with gradient, and the loss is computed on the whole
   step's features, the fresh ones in place of that micro batch's cached ones;
3. the gradients of the micro batches sum to the gradient of the whole batch's loss, so they are
   not divided by the accumulation steps (DeepSpeed's default), and a parameter that enters the
   loss directly (CLIP's ``logit_scale``) takes ``1/n`` of its gradient in each of the ``n``
   passes (:func:`share_gradient`).

Across processes the features are gathered with gradient (``deepspeed_setup.gather_with_grad``);
DeepSpeed's averaging of the gradients over the ranks then gives exactly the one-batch gradient.
A task opts in with ``global_batch = True`` and a ``features(batch)`` method; the engine builds
the :class:`StepCache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepCache:
    """The cached (no-gradient) features of every micro batch of an optimizer step on this
    process, and which micro batch is being recomputed with gradient."""

    features: list[dict[str, torch.Tensor]]
    index: int

    @property
    def n(self) -> int:
        return len(self.features)

    def assemble(self, fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The step's features on this process, micro batch after micro batch, with ``fresh`` (the
        gradient-carrying features of micro batch ``index``) in place of its cached ones."""
        return {key: torch.cat([fresh[key] if m == self.index else cached[key]
                                for m, cached in enumerate(self.features)])
                for key in fresh}


def share_gradient(value: torch.Tensor, n: int) -> torch.Tensor:
    """``value`` unchanged, with ``1/n`` of its gradient (used in each of ``n`` passes)."""
    if n == 1:
        return value
    detached = value.detach()
    return detached + (value - detached) / n
