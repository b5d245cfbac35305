"""Samples/s of a distill step and of an expand step for a tiny CLIP on the CPU, with the time of
one optimizer step split into data loading, forward, backward and optimizer step.

Runs through the training engine's own DeepSpeed setup (``initialize_engine``: AdamW, the
warmup/cosine schedule, ZeRO/bf16 from the DeepSpeed config), on a synthetic image/caption set
written to a temporary directory (48x48 PNGs, long multi-sentence captions) and loaded the way
training loads data (PIL -> open_clip preprocess; tokenising in the collate function).

The tasks are stand-ins of the same shape as the pipelines' (the models are plain open_clip CLIPs
of the tiny size; the student's text tower has an absolute position embedding, not RoPE):
  distill: a frozen 77-token teacher and the student's text tower read the same 77 tokens; the
           loss is 1 - cosine similarity of the text embeddings; only the student's text tower
           (token embedding frozen) trains.
  expand:  the student at 248 tokens; 0.8 x CLIP loss on (image, long caption) + 0.2 x CLIP loss
           on (image, first sentence); everything trains.

    DS_ACCELERATOR=cpu .venv/bin/python bench/train_step.py [--steps 20 --batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from tulip_pipelines.training.engine import (  # noqa: E402
    TrainConfig,
    compute_dtype,
    initialize_engine,
    to_device,
)

IMAGE_SIZE = 48
PHASES = ("data", "forward", "backward", "optimizer")
WORDS = ("red blue green small large round square cat dog tree house car sky river stone "
         "left right above below near far bright dark striped dotted").split()


def tiny_clip(context_length: int) -> open_clip.model.CLIP:
    """Width 64, 2 text layers, 3 vision layers, 48x48 images with 16x16 patches."""
    return open_clip.model.CLIP(
        embed_dim=64,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=3, width=64, head_width=32,
                                                 patch_size=16, image_size=IMAGE_SIZE),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=context_length, vocab_size=49408,
                                             width=64, heads=2, layers=2),
    )


def write_images(root: Path, n: int) -> list[tuple[str, str]]:
    """``n`` random PNGs with multi-sentence captions of about 100-200 tokens."""
    rng = random.Random(0)
    records = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        path = root / f"{i:05d}.png"
        Image.fromarray(pixels).save(path)
        sentences = [" ".join(rng.choices(WORDS, k=rng.randint(8, 16))).capitalize() + "."
                     for _ in range(rng.randint(6, 12))]
        records.append((str(path), " ".join(sentences)))
    return records


class ImageCaptions(Dataset):
    """(preprocessed image, long caption, first sentence) from image files."""

    def __init__(self, records: list[tuple[str, str]]):
        self.records = records
        self.preprocess = open_clip.image_transform(IMAGE_SIZE, is_train=False)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        path, caption = self.records[i]
        with Image.open(path) as image:
            pixels = self.preprocess(image.convert("RGB"))
        return pixels, caption, caption.split(". ")[0] + "."


class Collate:
    """Stack images; tokenise captions at ``context_length``."""

    def __init__(self, context_length: int):
        self.context_length = context_length

    def __call__(self, items):
        images, longs, shorts = zip(*items)
        return {"image": torch.stack(images),
                "long": open_clip.tokenize(list(longs), self.context_length),
                "short": open_clip.tokenize(list(shorts), self.context_length)}


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor):
    logits = scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels)) / 2


class DistillStandIn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.student = tiny_clip(77)
        self.student.requires_grad_(False)
        for module in (self.student.transformer, self.student.ln_final):
            module.requires_grad_(True)
        self.student.text_projection.requires_grad_(True)
        teacher = tiny_clip(77).eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # frozen, not a registered submodule

    def forward(self, batch):
        with torch.no_grad():
            target = self.teacher.encode_text(batch["long"])
        student = self.student.encode_text(batch["long"])
        return {"loss": 1 - F.cosine_similarity(student.float(), target.float()).mean()}


class ExpandStandIn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.student = tiny_clip(248)

    def forward(self, batch):
        image = self.student.encode_image(batch["image"])
        scale = self.student.logit_scale.exp()
        long = clip_loss(image, self.student.encode_text(batch["long"]), scale)
        short = clip_loss(image, self.student.encode_text(batch["short"]), scale)
        return {"loss": 0.8 * long + 0.2 * short}


def time_steps(task: torch.nn.Module, dataset: Dataset, context_length: int,
               args: argparse.Namespace, out_dir: str) -> dict[str, float]:
    """Median seconds per phase over ``args.steps`` optimizer steps after ``args.warmup``."""
    cfg = TrainConfig(run_name="bench", output_dir=out_dir, max_steps=args.steps + args.warmup,
                      batch_size=args.batch_size, lr=1e-4, num_workers=args.num_workers)
    ds_config = {"zero_optimization": {"stage": args.zero_stage},
                 "bf16": {"enabled": args.bf16}, "gradient_clipping": 1.0}
    engine = initialize_engine(task, cfg, ds_config)
    dtype = compute_dtype(engine)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=Collate(context_length), num_workers=args.num_workers,
                        persistent_workers=args.num_workers > 0)
    batches = iter(loader)
    phases: dict[str, list[float]] = {k: [] for k in PHASES}
    for i in range(args.steps + args.warmup):
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        batch = to_device(batch, engine.device, dtype)
        t1 = time.perf_counter()
        loss = engine(batch)["loss"]
        t2 = time.perf_counter()
        engine.backward(loss)
        t3 = time.perf_counter()
        engine.step()
        t4 = time.perf_counter()
        if i >= args.warmup:
            for key, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[key].append(seconds)
    engine.destroy()
    return {k: statistics.median(v) for k, v in phases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per task")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2))
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch_size}, "
          f"ZeRO {args.zero_stage}, {'bf16' if args.bf16 else 'fp32'}, "
          f"{args.num_workers} loader workers, median of {args.steps} steps")
    print(f"{'task':<8}{'samples/s':>10}{'step ms':>9}" + "".join(f"{k:>10}" for k in PHASES))
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        dataset = ImageCaptions(write_images(Path(tmp), 4 * args.batch_size))
        for name, task, context_length in (("distill", DistillStandIn(), 77),
                                           ("expand", ExpandStandIn(), 248)):
            phases = time_steps(task, dataset, context_length, args, f"{tmp}/{name}")
            total = sum(phases.values())
            shares = "".join(f"{100 * phases[k] / total:>9.0f}%" for k in PHASES)
            print(f"{name:<8}{args.batch_size / total:>10.1f}{1000 * total:>9.1f}{shares}")


if __name__ == "__main__":
    main()
