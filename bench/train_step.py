"""Samples/s of a distill step and of an expand step for a tiny CLIP on the CPU, with the time of
one optimizer step split into data loading, forward, backward and optimizer step.

Runs the pipelines' own tasks, models and data code (``DistillTask`` and ``ContrastiveTask`` on
``TULIP-Tiny``, the RoPE student at 248 tokens, ``CaptionImageDataset`` + ``Collate`` over demo
images written to a temporary directory) through the engine's DeepSpeed setup
(``initialize_engine``: AdamW, the warmup/cosine schedule, ZeRO/bf16 from the DeepSpeed config).
  distill: frozen teacher and student read the same 77-token caption; cosine loss; the student's
           text tower trains (token embedding frozen).
  expand:  the student at 248 tokens; 0.8 x CLIP loss (image, long caption) + 0.2 x (image, first
           sentence); everything trains.

Then the contrastive step through the engine's own loop (``train``), in one run: the loss over the
global batch (each micro batch contrasted against the whole step's, with one extra no-gradient
forward per micro batch when accumulating) against the per-micro-batch loss (``local_loss``), at
accumulation 1 and 4 (optimizer-step time; micro batch ``--batch-size``).

    DS_ACCELERATOR=cpu .venv/bin/python bench/train_step.py [--steps 20 --batch-size 32]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from tulip_pipelines.data.demo import DemoDataParams, generate_demo_data  # noqa: E402
from tulip_pipelines.models import build_student, create_teacher  # noqa: E402
from tulip_pipelines.training.batches import to_device  # noqa: E402
from tulip_pipelines.training.config import TrainParams  # noqa: E402
from tulip_pipelines.training.data import CaptionImageDataset, Collate  # noqa: E402
from tulip_pipelines.training.deepspeed_setup import (  # noqa: E402
    compute_dtype,
    initialize_engine,
    prepare_ds_config,
)
from tulip_pipelines.training.distributed import init_distributed  # noqa: E402
from tulip_pipelines.training.engine import train  # noqa: E402
from tulip_pipelines.training.tasks import ContrastiveTask, DistillTask  # noqa: E402

PHASES = ("data", "forward", "backward", "optimizer")


def demo_dataset(root: Path, n: int, preprocess) -> CaptionImageDataset:
    """``n`` demo images on disk with their long captions, read the way training reads them."""
    demo = generate_demo_data(DemoDataParams(n_groups=max(2, n // 4), n_benchmark_groups=0,
                                             n_short_benchmark_images=0))
    for key, image in demo.images.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / f"{key}.png")
    frame = pd.DataFrame({"id": [r["id"] for r in demo.records],
                          "image": [r["image"] for r in demo.records],
                          "caption": [r["conversations"][1]["value"] for r in demo.records]})
    return CaptionImageDataset(frame, root, preprocess)


def time_steps(task: torch.nn.Module, dataset: Dataset, collate: Collate,
               args: argparse.Namespace, out_dir: str) -> dict[str, float]:
    """Median seconds per phase over ``args.steps`` optimizer steps after ``args.warmup``."""
    params = TrainParams(run_name="bench", run_dir=out_dir, max_steps=args.steps + args.warmup,
                         batch_size=args.batch_size, lr=1e-4, num_workers=args.num_workers)
    ds_config = {"zero_optimization": {"stage": args.zero_stage},
                 "bf16": {"enabled": args.bf16}, "gradient_clipping": 1.0}
    _, world_size = init_distributed()
    engine, _ = initialize_engine(task, params, prepare_ds_config(ds_config, params, world_size))
    dtype = compute_dtype(engine)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate, num_workers=args.num_workers,
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
    teacher = create_teacher("TULIP-Tiny")
    student = build_student(teacher, 248)
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        images = demo_dataset(Path(tmp), 4 * args.batch_size, student.preprocess)
        texts = CaptionImageDataset(pd.DataFrame({"id": images.ids, "image": images.images,
                                                  "caption": images.captions}), tmp, None)
        jobs = (
            ("distill", DistillTask(student.model, teacher.model, "cosine"), texts,
             Collate(student.tokenizer, teacher_tokenizer=teacher.tokenizer)),
            ("expand", ContrastiveTask(student.model, 0.8, 0.2), images,
             Collate(student.tokenizer, student.tokenizer)),
        )
        for name, task, dataset, collate in jobs:
            phases = time_steps(task, dataset, collate, args, f"{tmp}/{name}")
            total = sum(phases.values())
            shares = "".join(f"{100 * phases[k] / total:>9.0f}%" for k in PHASES)
            print(f"{name:<8}{args.batch_size / total:>10.1f}{1000 * total:>9.1f}{shares}")
        compare_contrastive_losses(student, images, Collate(student.tokenizer, student.tokenizer),
                                   args, tmp)


def time_contrastive(model_bundle, dataset, collate, args, accumulation: int, local_loss: bool,
                     out_dir: str) -> float:
    """Median seconds per optimizer step of the engine's own loop (``train``)."""
    model = copy.deepcopy(model_bundle.model)
    task = ContrastiveTask(model, 0.8, 0.2, local_loss=local_loss)
    params = TrainParams(run_name="bench", run_dir=out_dir, max_steps=args.steps + args.warmup,
                         batch_size=args.batch_size, lr=1e-4, log_every=1,
                         num_workers=args.num_workers)
    ds_config = {"zero_optimization": {"stage": args.zero_stage}, "bf16": {"enabled": args.bf16},
                 "gradient_clipping": 1.0, "gradient_accumulation_steps": accumulation}
    history = train(task, dataset, params, ds_config, collate_fn=collate).history
    per_step = (accumulation * args.batch_size) / history["samples_per_s"].iloc[args.warmup:]
    return statistics.median(per_step)


def compare_contrastive_losses(student, images, collate, args, tmp: str) -> None:
    print(f"\ncontrastive step (engine loop), micro batch {args.batch_size}, 1 process")
    print(f"{'accumulation':<14}{'per-micro s':>12}{'global s':>10}{'global/per-micro':>18}")
    for accumulation in (1, 4):
        seconds = {local: time_contrastive(student, images, collate, args, accumulation, local,
                                           f"{tmp}/c{accumulation}{local}")
                   for local in (True, False)}
        print(f"{accumulation:<14}{seconds[True]:>12.3f}{seconds[False]:>10.3f}"
              f"{seconds[False] / seconds[True]:>17.2f}x")


if __name__ == "__main__":
    main()
