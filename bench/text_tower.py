"""Cost of RoPE in the text tower: forward+backward throughput at 248 tokens, the TULIP student
(RoPE in every attention layer) beside the same tower with an absolute position embedding (the
Long-CLIP stretch of the same teacher), on CPU. Target: RoPE costs at most 10% more.

Both towers come from one randomly initialised teacher through the project's own builders
(``build_student`` and ``stretch_position_embedding``), so they differ only in position handling.
Steps of the two towers alternate (A B A B ...) so that load from other processes hits both alike;
the figure is the median over the timed steps, after one warm-up step each.

A second table times one whole CLIP training step of the embedded default (``TULIP-Tiny``, CLIP
loss, forward+backward, batch 128): the teacher at 77 tokens, the student and Long-CLIP at 248.

    .venv/bin/python bench/text_tower.py [--models ViT-B-16 TULIP-Tiny --steps 3 --threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tulip_pipelines.models import build_student, create_teacher, stretch_position_embedding  # noqa: E402

CONTEXT = 248
DEFAULT_BATCH = {"ViT-B-16": 4, "ViT-L-14": 2, "TULIP-Tiny": 64}


def random_tokens(batch: int, length: int, vocab: int = 49408) -> torch.Tensor:
    """Token ids with the end-of-text token (the largest id) last, as in a full-length caption."""
    tokens = torch.randint(1, vocab - 2, (batch, length))
    tokens[:, 0], tokens[:, -1] = vocab - 2, vocab - 1
    return tokens


def text_step(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """Seconds for one forward+backward pass of the text tower."""
    start = time.perf_counter()
    model.encode_text(tokens).square().mean().backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def clip_step(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> float:
    """Seconds for one forward+backward pass of the whole CLIP with the symmetric CLIP loss."""
    start = time.perf_counter()
    image, text = (
        model.encode_image(images, normalize=True),
        model.encode_text(tokens, normalize=True),
    )
    logits = model.logit_scale.exp() * image @ text.T
    labels = torch.arange(len(tokens))
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def alternate(steps: int, runs: dict) -> dict[str, float]:
    """Median seconds per step of each callable in ``runs``, steps interleaved, one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(steps + 1):
        for name, run in runs.items():
            seconds = run()
            if step:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_text_tower(model_name: str, batch: int, steps: int) -> None:
    torch.manual_seed(0)
    teacher = create_teacher(model_name)
    absolute = stretch_position_embedding(teacher, CONTEXT).model.train()
    rope = build_student(teacher, CONTEXT).model.train()
    del teacher
    for model in (absolute, rope):
        model.visual.requires_grad_(False)
    tokens = random_tokens(batch, CONTEXT)
    median = alternate(steps, {"absolute": lambda: text_step(absolute, tokens),
                               "rope": lambda: text_step(rope, tokens)})
    width, layers = rope.transformer.width, len(rope.transformer.resblocks)
    for kind in ("absolute", "rope"):
        print(f"{model_name:<11} {f'{width}x{layers}':>6} {kind:<9} {batch:>5} "
              f"{median[kind]:>8.3f} {batch * CONTEXT / median[kind]:>10.0f}")
    print(
        f"{model_name:<11} RoPE overhead: {100 * (median['rope'] / median['absolute'] - 1):+.1f}%"
    )


def bench_tiny_clip(batch: int, steps: int) -> None:
    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    models = {
        "teacher 77": (teacher.model.train(), 77),
        "longclip 248": (stretch_position_embedding(teacher, CONTEXT).model.train(), CONTEXT),
        "student 248": (build_student(teacher, CONTEXT).model.train(), CONTEXT),
    }
    size = teacher.model.visual.image_size
    images = torch.randn(batch, 3, *size)
    runs = {name: (lambda m=m, t=random_tokens(batch, n): clip_step(m, images, t))
            for name, (m, n) in models.items()}
    for name, seconds in alternate(steps, runs).items():
        print(f"TULIP-Tiny  {name:<13} {batch:>5} {seconds:>8.3f} {batch / seconds:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-16", "TULIP-Tiny"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: per model size")
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per tower (after 1 warm-up)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clip-batch-size", type=int, default=128)
    parser.add_argument("--no-clip-step", action="store_true", help="skip the whole-CLIP table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} timed steps, CPU")
    print(f"\ntext tower forward+backward at {CONTEXT} tokens (median s/step)")
    print(f"{'model':<11} {'width':>6} {'position':<9} {'batch':>5} {'s/step':>8} {'tokens/s':>10}")
    for name in args.models:
        bench_text_tower(name, args.batch_size or DEFAULT_BATCH.get(name, 4), args.steps)
    if not args.no_clip_step:
        print("\nTULIP-Tiny whole-CLIP step, CLIP loss, forward+backward (median s/step)")
        print(f"{'model':<11} {'tower':<13} {'batch':>5} {'s/step':>8} {'samples/s':>10}")
        bench_tiny_clip(args.clip_batch_size, args.steps)


if __name__ == "__main__":
    main()
