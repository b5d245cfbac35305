"""GPU check: ViT-L-14 (random weights) distill and expand steps with DeepSpeed on one GPU, in bf16.

For each step: samples/s, the step time split into data / forward / backward / optimizer, model
FLOPs utilisation (FLOPs of one step counted with ``torch.utils.flop_counter`` over the device's
dense bf16 peak), and the peak device and host memory.
  distill: the RoPE student's text tower at 248 tokens learns cached teacher text embeddings (the
           teacher's forward is not in the step, as with ``teacher_embeddings: cached``).
  expand:  the whole student (ViT-L-14 image tower at 224 px, RoPE text tower at 248 tokens),
           0.8/0.2 long/short contrastive loss over the batch.
Batches are made in memory (random pixels, real tokenised captions), so that the step measures
the GPU. Then the data path: images/s per core of the prepared shards against the original files
(``bench/data_path.py``'s measurement, on ``--data-images`` generated JPEGs per size), and how
many cores per GPU would feed the expand step at that rate.

    .venv/bin/python bench/gpu.py [--batch-size 64 --steps 20]   # on a GPU machine
    .venv/bin/python bench/gpu.py --smoke                        # CPU: TULIP-Tiny, 2 steps
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).parent / "lib"))  # the helpers: timing, images

import data_path  # noqa: E402
from timing import PHASES, make_engine, time_phases  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from tulip_pipelines.models import build_student, create_teacher  # noqa: E402
from tulip_pipelines.training.tasks import ContrastiveTask, DistillTask  # noqa: E402

# dense bf16 peaks (TFLOP/s) by device name; --peak-tflops overrides
PEAKS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}
WORDS = ("red green blue yellow circle square triangle cross small large striped solid top "
         "bottom left right middle corner background image").split()


def captions(n: int, words: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(WORDS), (n, words), generator=gen).tolist()
    return [" ".join(WORDS[i] for i in row) + "." for row in picks]


def batches(kind: str, student, teacher, batch_size: int, device: str):
    """One in-memory micro batch of ``kind`` (returned by every call)."""
    if kind == "distill":
        texts = captions(batch_size, 60, 0)
        batch = {"teacher_long": teacher.tokenizer(texts), "long": student.tokenizer(texts),
                 "teacher_embedding": torch.randn(batch_size,
                                                  student.model.text_projection.shape[1])}
    else:
        size = student.model.visual.image_size
        size = size[0] if isinstance(size, tuple) else size
        batch = {"image": torch.randn(batch_size, 3, size, size),
                 "long": student.tokenizer(captions(batch_size, 200, 1)),
                 "short": student.tokenizer(captions(batch_size, 12, 2))}
    batch = {k: v.to(device) for k, v in batch.items()}
    return lambda: batch


def step_flops(task: torch.nn.Module, batch: dict) -> int:
    """FLOPs of one forward and backward of ``task`` on ``batch``."""
    counter = FlopCounterMode(display=False)
    with counter:
        task(batch)["loss"].backward()
    task.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-L-14")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak (default: from its name)")
    parser.add_argument("--data-images", type=int, default=50,
                        help="generated JPEGs per size for the data path's rate (0: skip)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU fallback: TULIP-Tiny, batch 4, 2 steps, fp32 (CI)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.model, args.batch_size, args.steps, args.warmup = "TULIP-Tiny", 4, 2, 1
        args.data_images = min(args.data_images, 4)
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in name), None)
    ds_config = {"zero_optimization": {"stage": 0 if not cuda else 1},
                 "bf16": {"enabled": cuda}, "gradient_clipping": 1.0}
    print(f"device {name}; {args.model} (random weights), batch {args.batch_size}, "
          f"{'bf16' if cuda else 'fp32'}, median of {args.steps} steps; "
          f"peak {peak or 'unknown'} TFLOP/s")
    print(f"{'step':<9}{'samples/s':>10}{'step ms':>9}" + "".join(f"{k:>10}" for k in PHASES)
          + f"{'TFLOP/s':>9}{'MFU':>7}{'GPU GiB':>9}{'host GiB':>9}")
    torch.manual_seed(0)
    teacher = create_teacher(args.model)
    rates = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for kind in ("distill", "expand"):
            student = build_student(teacher, 248)
            if kind == "distill":
                task = DistillTask(student.model, None, "cosine")
            else:
                task = ContrastiveTask(student.model, 0.8, 0.2)
            next_batch = batches(kind, student, teacher, args.batch_size, device)
            flops = step_flops(task.to(device), next_batch())
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            engine = make_engine(task, args.batch_size, args.steps + args.warmup, ds_config,
                                 f"{tmp}/{kind}")
            phases = time_phases(engine, next_batch, args.steps, args.warmup)
            engine.destroy()
            total = sum(phases.values())
            tflops = flops / total / 1e12
            mfu = f"{100 * tflops / peak:>6.1f}%" if peak and cuda else f"{'n/a':>7}"
            gpu_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
            host_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            shares = "".join(f"{100 * phases[k] / total:>9.0f}%" for k in PHASES)
            print(f"{kind:<9}{args.batch_size / total:>10.1f}{1000 * total:>9.1f}{shares}"
                  f"{tflops:>9.2f}{mfu}{gpu_gib:>9.2f}{host_gib:>9.2f}")
            rates[kind] = args.batch_size / total
            del task, engine, student
            if cuda:
                torch.cuda.empty_cache()
        if args.data_images:
            print("\ndata path:")
            table, prepare_rate = data_path.measure(args.data_images, Path(tmp) / "data")
            data_path.print_table(table, prepare_rate)
            need = rates["expand"] / table.loc[table.index[0]]
            print(f"\ncores to feed one GPU's expand step ({rates['expand']:.0f} images/s) with "
                  f"{table.index[0]} images: " + ", ".join(
                      f"{path} {cores:.1f}" for path, cores in need.items()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
