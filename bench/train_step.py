"""Training-step figures on the CPU, each comparison made in one run:

1. Samples/s of the distill and expand steps of a tiny CLIP (``TULIP-Tiny``, the RoPE student at
   248 tokens), with the time of one optimizer step split into data loading, forward, backward
   and optimizer step. The pipelines' own tasks, models and data code (``DistillTask``,
   ``ContrastiveTask``, ``CaptionImageDataset`` + ``Collate`` over demo images written to a
   temporary directory) run through the engine's DeepSpeed setup.
     distill (live):   the frozen teacher encodes the 77-token caption at every step.
     distill (cached): the teacher text embeddings come from their cache
                       (``training/teacher_embeddings.py``).
     expand:           0.8 x CLIP loss (image, long caption) + 0.2 x (image, first sentence).
2. The same distill comparison with a ViT-B-16-size text tower (``--no-vit-b16`` skips it).
3. The contrastive step through the engine's own loop (``train``): the loss over the global batch
   (each micro batch contrasted against the whole step's, one extra no-gradient forward per micro
   batch when accumulating) against the per-micro-batch loss (``contrastive_batch: micro``), at
   accumulation 1 and 4 (optimizer-step time).
4. ``--precision``: that loop in fp32, amp_bf16 and bf16; ``--mlflow``: that loop without and
   with live MLflow logging of every step (what a launched rank 0 does).

    DS_ACCELERATOR=cpu .venv/bin/python bench/train_step.py [--steps 20 --batch-size 32]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).parent / "lib"))  # the helpers: timing, images

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from timing import PHASES, cycle, make_engine, time_phases  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from tulip_pipelines.data.demo import DemoDataParams, generate_demo_data  # noqa: E402
from tulip_pipelines.models import build_student, create_teacher  # noqa: E402
from tulip_pipelines.training.datasets import CaptionImageDataset, Collate  # noqa: E402
from tulip_pipelines.training.engine import train  # noqa: E402
from tulip_pipelines.training.job import TrainParams  # noqa: E402
from tulip_pipelines.training.tasks import ContrastiveTask, DistillTask  # noqa: E402
from tulip_pipelines.training.teacher_embeddings import (  # noqa: E402
    WithTeacherTextEmbeddings,
    teacher_text_embeddings_of,
)


def demo_dataset(root: Path, n: int, preprocess, variants: bool = False) -> CaptionImageDataset:
    """``n`` demo images on disk with their long captions, read the way training reads them
    (with ``variants``, a shuffled-sentence caption drawn at random each read, as the teacher's)."""
    demo = generate_demo_data(DemoDataParams(n_groups=max(2, n // 4), n_benchmark_groups=0,
                                             n_short_benchmark_images=0))
    for key, image in demo.images.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / f"{key}.png")
    frame = pd.DataFrame({"id": [r["id"] for r in demo.records],
                          "image": [r["image"] for r in demo.records],
                          "caption": [r["conversations"][1]["value"] for r in demo.records]})
    drawn = demo.shuffled_captions.groupby("id")["caption"].apply(list).to_dict()
    return CaptionImageDataset(frame, root, preprocess, drawn if variants else None)


def time_steps(task: torch.nn.Module, dataset: Dataset, collate: Collate,
               args: argparse.Namespace, out_dir: str) -> dict[str, float]:
    """Median seconds per phase over ``args.steps`` optimizer steps after ``args.warmup``."""
    ds_config = {"zero_optimization": {"stage": args.zero_stage},
                 "bf16": {"enabled": args.bf16}, "gradient_clipping": 1.0}
    engine = make_engine(task, args.batch_size, args.steps + args.warmup, ds_config, out_dir)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate, num_workers=args.num_workers,
                        persistent_workers=args.num_workers > 0)
    phases = time_phases(engine, cycle(loader), args.steps, args.warmup)
    engine.destroy()
    return phases


def print_row(name: str, phases: dict[str, float], batch_size: int) -> float:
    total = sum(phases.values())
    shares = "".join(f"{100 * phases[k] / total:>9.0f}%" for k in PHASES)
    print(f"{name:<22}{batch_size / total:>10.1f}{1000 * total:>9.1f}{shares}")
    return total


def distill_live_vs_cached(label: str, teacher, texts: CaptionImageDataset,
                           args: argparse.Namespace, tmp: str) -> None:
    """The distill step with the live teacher and with the cached teacher text embeddings,
    same student start."""
    student = build_student(teacher, 248)
    embeddings = teacher_text_embeddings_of(teacher.model.eval(), teacher.tokenizer,
                                            texts.captions).half()
    collate = Collate(student.tokenizer, teacher_tokenizer=teacher.tokenizer)
    totals = {}
    for mode in ("live", "cached"):
        model = copy.deepcopy(student.model)
        task = DistillTask(model, teacher.model if mode == "live" else None, "cosine")
        dataset = texts if mode == "live" else WithTeacherTextEmbeddings(texts, embeddings)
        totals[mode] = print_row(f"{label} distill ({mode})",
                                 time_steps(task, dataset, collate, args, f"{tmp}/{label}{mode}"),
                                 args.batch_size)
    print(f"{'':<22}cached embeddings: {totals['live'] / totals['cached']:.2f}x the live "
          f"teacher's speed")


def time_contrastive(model_bundle, dataset, collate, args, accumulation: int, micro: bool,
                     out_dir: str, precision: str | None = None, log_fn=None) -> float:
    """Median seconds per optimizer step of the engine's own loop (``train``); ``precision``
    (train.precision) replaces ``--bf16``; ``log_fn`` receives every step's metrics."""
    task = ContrastiveTask(copy.deepcopy(model_bundle.model), 0.8, 0.2,
                           contrastive_batch="micro" if micro else "global")
    params = TrainParams(run_name="bench", run_dir=out_dir, max_steps=args.steps + args.warmup,
                         batch_size=args.batch_size, lr=1e-4, log_every=args.log_every,
                         num_workers=args.num_workers, precision=precision)
    ds_config = {"zero_optimization": {"stage": args.zero_stage},
                 "gradient_clipping": 1.0, "gradient_accumulation_steps": accumulation}
    if precision is None:
        ds_config["bf16"] = {"enabled": args.bf16}
    history = train(task, dataset, params, ds_config, collate_fn=collate, log_fn=log_fn).history
    # a row per log_every steps: skip the rows of the warmup steps
    per_step = (accumulation * args.batch_size) / history["samples_per_s"].iloc[
        -(args.steps // args.log_every):]
    return statistics.median(per_step)


def compare_contrastive_losses(student, images, args, tmp: str) -> None:
    collate = Collate(student.tokenizer, student.tokenizer)
    print(f"\ncontrastive optimizer step (engine loop), micro batch {args.batch_size}, 1 process")
    print(f"{'accumulation':<14}{'per-micro s':>12}{'global s':>10}{'global/per-micro':>18}")
    for accumulation in (1, 4):
        seconds = {local: time_contrastive(student, images, collate, args, accumulation, local,
                                           f"{tmp}/c{accumulation}{local}")
                   for local in (True, False)}
        print(f"{accumulation:<14}{seconds[True]:>12.3f}{seconds[False]:>10.3f}"
              f"{seconds[False] / seconds[True]:>17.2f}x")


def compare_precisions(student, images, args, tmp: str) -> None:
    """The contrastive step of the engine's loop in fp32, amp_bf16 and bf16 (train.precision),
    one after the other on this machine, the same data and start."""
    collate = Collate(student.tokenizer, student.tokenizer)
    print(f"\nprecision (engine loop, contrastive, micro batch {args.batch_size}, accumulation 1)")
    print(f"{'precision':<14}{'step s':>9}{'vs fp32':>9}")
    seconds = {}
    for precision in ("fp32", "amp_bf16", "bf16"):
        seconds[precision] = time_contrastive(student, images, collate, args, 1, False,
                                              f"{tmp}/p-{precision}", precision)
        print(f"{precision:<14}{seconds[precision]:>9.3f}"
              f"{seconds[precision] / seconds['fp32']:>8.2f}x")


def compare_live_logging(student, images, args, tmp: str) -> None:
    """The contrastive step of the engine's loop without MLflow and with every row's metrics
    logged to an MLflow run as they come (what a launched rank 0 does; a local sqlite store),
    alternating five times each; also the time spent inside the logging calls themselves (the
    direct cost, free of the run-to-run spread of the whole step)."""
    import time

    import mlflow

    from tulip_pipelines.tracking.stage_runs import StageTracker

    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("bench")
    collate = Collate(student.tokenizer, student.tokenizer)
    seconds: dict[str, list[float]] = {"off": [], "live": []}
    in_calls, calls = 0.0, 0
    for round_ in range(5):
        for mode in ("off", "live"):
            log_fn = None
            if mode == "live":
                tracker = StageTracker(client.create_run(experiment).info.run_id)

                def log_fn(metrics, step, tracker=tracker):
                    nonlocal in_calls, calls
                    started = time.perf_counter()
                    tracker.log(metrics, step)
                    in_calls, calls = in_calls + time.perf_counter() - started, calls + 1
            seconds[mode].append(time_contrastive(student, images, collate, args, 1, False,
                                                  f"{tmp}/m-{mode}-{round_}", log_fn=log_fn))
            if mode == "live":
                tracker.flush()
    off, live = statistics.median(seconds["off"]), statistics.median(seconds["live"])
    spread = (max(seconds["off"]) - min(seconds["off"])) / off
    direct = in_calls / calls / args.log_every  # seconds per step
    print(f"\nlive MLflow logging (engine loop, contrastive, micro batch {args.batch_size}, a "
          f"row every {args.log_every} step(s), sqlite store, sent every "
          f"{tracker.send_every_s:.0f} s)")
    print(f"{'':<14}{'step s':>9}")
    print(f"{'no logging':<14}{off:>9.4f}\n{'live':<14}{live:>9.4f}")
    print(f"whole step: {100 * (live - off) / off:+.1f}% (the no-logging runs alone spread over "
          f"{100 * spread:.1f}%)")
    print(f"inside the logging calls: {1000 * direct:.2f} ms per step "
          f"({100 * direct / off:.2f}% of a step here)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per task")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2))
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no-vit-b16", dest="vit_b16", action="store_false",
                        help="skip the ViT-B-16-size distill comparison")
    parser.add_argument("--precision", action="store_true",
                        help="only compare train.precision fp32 / amp_bf16 / bf16")
    parser.add_argument("--mlflow", action="store_true",
                        help="only compare the step without and with live MLflow logging")
    parser.add_argument("--log-every", type=int, default=1,
                        help="a history row (and an MLflow row) every this many steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch_size}, "
          f"ZeRO {args.zero_stage}, {'bf16' if args.bf16 else 'fp32'}, "
          f"{args.num_workers} loader workers, median of {args.steps} steps")
    print(f"{'task':<22}{'samples/s':>10}{'step ms':>9}" + "".join(f"{k:>10}" for k in PHASES))
    teacher = create_teacher("TULIP-Tiny")
    student = build_student(teacher, 248)
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        images = demo_dataset(Path(tmp), 4 * args.batch_size, student.preprocess)
        if args.precision:
            compare_precisions(student, images, args, tmp)
            return
        if args.mlflow:
            compare_live_logging(student, images, args, tmp)
            return
        # the same records as text only (no preprocess: no image is located or read)
        texts = CaptionImageDataset(pd.DataFrame({"id": images.ids, "image": images.ids,
                                                  "caption": images.captions}), tmp, None)
        distill_live_vs_cached("tiny", teacher, texts, args, tmp)
        print_row("tiny expand", time_steps(ContrastiveTask(student.model, 0.8, 0.2), images,
                                            Collate(student.tokenizer, student.tokenizer), args,
                                            f"{tmp}/expand"), args.batch_size)
        if args.vit_b16:
            distill_live_vs_cached("ViT-B-16", create_teacher("ViT-B-16"), texts, args, tmp)
        compare_contrastive_losses(build_student(teacher, 248), images, args, tmp)


if __name__ == "__main__":
    main()
