"""The cost of exact resume's random-state work, each figure beside what it is added to:

1. Reading a training sample with its draws seeded from ``(seed, epoch, index)``
   (``SeededSamples``: fork torch's RNG, seed it, read, restore) against reading it plainly, on
   the demo's images with shuffled-caption variants (``CaptionImageDataset`` at 48 px).
2. Writing every rank's RNG states with a checkpoint (``rng_state`` + an atomic JSON write)
   against the DeepSpeed checkpoint of TULIP-Tiny it goes with (``save_checkpoint``).

One process, one torch thread; medians of ``--repeats`` timings.

    DS_ACCELERATOR=cpu .venv/bin/python bench/rng_state.py [--samples 2000 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).parent / "lib"))  # the helpers: timing, images

import torch  # noqa: E402
from timing import make_engine  # noqa: E402
from train_step import demo_dataset  # noqa: E402

from tulip_pipelines.atomic import write_text as atomic_write  # noqa: E402
from tulip_pipelines.models import create_teacher  # noqa: E402
from tulip_pipelines.training.checkpoints import (  # noqa: E402
    RNG_FILE,
    rng_state,
)
from tulip_pipelines.training.datasets import SeededSamples  # noqa: E402
from tulip_pipelines.training.tasks import ContrastiveTask  # noqa: E402


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    with tempfile.TemporaryDirectory(prefix="bench-rng-") as tmp:
        plain = demo_dataset(Path(tmp) / "images", args.samples, teacher.preprocess,
                             variants=True)
        seeded = SeededSamples(plain, seed=0)
        n = len(plain)
        t_plain = median_seconds(lambda: [plain[i] for i in range(n)], args.repeats) / n
        t_seeded = median_seconds(lambda: [seeded[(i, 0)] for i in range(n)], args.repeats) / n
        print(f"sample read ({n} demo samples with caption variants, 48 px):")
        print(f"  plain                         {1e6 * t_plain:9.1f} us")
        print(f"  seeded from (seed, epoch, i)  {1e6 * t_seeded:9.1f} us   "
              f"({100 * (t_seeded / t_plain - 1):+.1f}%)")

        engine = make_engine(ContrastiveTask(teacher.model, 1.0, 0.0), 8, 10,
                             {"zero_optimization": {"stage": 0}}, f"{tmp}/run")
        counter = iter(range(10**6))

        def deepspeed_save() -> None:
            engine.save_checkpoint(f"{tmp}/ckpt", tag=f"step_{next(counter):08d}",
                                   client_state={})

        def rng_save() -> None:
            atomic_write(Path(tmp) / "ckpt" / RNG_FILE.format(rank=0), json.dumps(rng_state()))

        t_ds = median_seconds(deepspeed_save, args.repeats)
        t_rng = median_seconds(rng_save, args.repeats)
        size = (Path(tmp) / "ckpt" / RNG_FILE.format(rank=0)).stat().st_size
        print("checkpoint write (TULIP-Tiny, ZeRO 0, fp32):")
        print(f"  DeepSpeed save_checkpoint     {1e3 * t_ds:9.1f} ms")
        print(f"  + RNG states ({size:,} bytes)  {1e3 * t_rng:9.1f} ms   "
              f"({100 * t_rng / t_ds:+.1f}%)")
        engine.destroy()


if __name__ == "__main__":
    main()
