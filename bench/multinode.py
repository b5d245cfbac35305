"""Figures of several nodes and of resuming on another number of processes (CPU, gloo on
127.0.0.1), each comparison in one run:

1. Time to the first optimizer step, and to the end, of the same 4-step job (TULIP-Tiny,
   contrastive, ZeRO-2) started as 1 node x 2 processes (``run_distributed``) and as a 2-task
   srun step x 1 process (``launcher: srun``: each task DeepSpeed's no-ssh launcher; the two
   tasks share this machine). Needs SLURM (``.ci/slurm-up``): outside an allocation the script
   runs itself under ``salloc -N1 -n2``; without SLURM the srun row says so.
2. The cost of converting a 2-process ZeRO-2 checkpoint to DeepSpeed's universal format
   (``ds_to_universal``, what a run resumed on another number of processes does once): seconds
   and disk, on TULIP-Tiny and on a ViT-B-16-size CLIP (``--no-vit-b16`` skips it).

    DS_ACCELERATOR=cpu .venv/bin/python bench/multinode.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
LIB = Path(__file__).parent / "lib"
sys.path.insert(0, str(LIB))
# the ranks import the builder (clip_jobs) and the package
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LIB), os.environ.get("PYTHONPATH")]))

from tulip_pipelines.training import checkpoints  # noqa: E402
from tulip_pipelines.training.multinode import Cluster  # noqa: E402
from tulip_pipelines.training.processes import run_distributed  # noqa: E402
from tulip_pipelines.training.run_dir import read_heartbeats  # noqa: E402


def plan(run_dir: Path, model: str, steps: int, batch: int) -> dict:
    return {"builder": "clip_jobs:build_job", "model": model, "n": 64, "node_timeout_s": 120,
            "train": dict(run_name=f"bench-{model}", run_dir=str(run_dir), max_steps=steps,
                          batch_size=batch, lr=1e-4, log_every=1, checkpoint_every=steps),
            "ds_config": {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}}


def first_step_watch(run_dir: Path, started: float, out: dict) -> threading.Thread:
    def watch():
        while "first_step_s" not in out:
            if any(r.get("step", 0) >= 1 for r in read_heartbeats(run_dir)):
                out["first_step_s"] = time.perf_counter() - started
            time.sleep(0.05)
            if out.get("done"):
                return
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def one_node(tmp: Path) -> dict:
    run_dir, out = tmp / "one", {}
    started = time.perf_counter()
    watch = first_step_watch(run_dir, started, out)
    run_distributed(plan(run_dir, "TULIP-Tiny", 4, 8), 2, run_dir=run_dir, timeout_s=600)
    out["total_s"], out["done"] = time.perf_counter() - started, True
    watch.join()
    return out


def srun_step(tmp: Path) -> dict:
    run_dir, out = tmp / "srun", {}
    started = time.perf_counter()
    watch = first_step_watch(run_dir, started, out)
    run_distributed(plan(run_dir, "TULIP-Tiny", 4, 8), 1, "srun", run_dir=run_dir,
                    cluster=Cluster.resolve(2, launcher="srun"), timeout_s=600)
    out["total_s"], out["done"] = time.perf_counter() - started, True
    watch.join()
    return out


def conversion(tmp: Path, model: str, batch: int) -> dict:
    run_dir = tmp / f"convert-{model}"
    run_distributed(plan(run_dir, model, 1, batch), 2, run_dir=run_dir, timeout_s=1200)
    root = checkpoints.checkpoints_dir(run_dir)
    tag = checkpoints.tag(1)
    source = sum(f.stat().st_size for f in (root / tag).iterdir() if f.is_file())
    started = time.perf_counter()
    import torch.distributed as dist

    if not dist.is_initialized():
        from tulip_pipelines.training.deepspeed_setup import init_distributed

        init_distributed()
    checkpoints.convert_to_universal(root, tag, 0)
    seconds = time.perf_counter() - started
    universal = checkpoints.folder_size(root / tag / checkpoints.UNIVERSAL_DIR)
    return {"model": model, "seconds": seconds, "checkpoint_mb": source / 1e6,
            "universal_mb": universal / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-vit-b16", dest="vit_b16", action="store_false")
    args = parser.parse_args()
    if not os.environ.get("SLURM_JOB_ID") and shutil.which("salloc"):  # an allocation of 2 tasks
        sys.exit(subprocess.call(["salloc", "-N1", "-n2", sys.executable, *sys.argv]))
    with tempfile.TemporaryDirectory(prefix="bench-multinode-") as tmp:
        tmp = Path(tmp)
        print("4 steps of TULIP-Tiny (contrastive, ZeRO-2, micro batch 8), 2 ranks in all")
        print(f"{'layout':<24}{'first step s':>14}{'total s':>10}")
        for name, fn in (("1 node x 2 processes", one_node),
                         ("srun 2 tasks x 1 process", srun_step)):
            if fn is srun_step and not os.environ.get("SLURM_JOB_ID"):
                print(f"{name:<24}  no SLURM here (.ci/slurm-up starts one)")
                continue
            figures = fn(tmp)
            print(f"{name:<24}{figures.get('first_step_s', float('nan')):>14.1f}"
                  f"{figures['total_s']:>10.1f}")
        print("\nconverting a 2-process ZeRO-2 checkpoint to the universal format")
        print(f"{'model':<14}{'seconds':>9}{'checkpoint MB':>15}{'universal MB':>14}")
        models = [("TULIP-Tiny", 8)] + ([("ViT-B-16", 2)] if args.vit_b16 else [])
        for model, batch in models:
            row = conversion(tmp, model, batch)
            print(f"{row['model']:<14}{row['seconds']:>9.1f}{row['checkpoint_mb']:>15.1f}"
                  f"{row['universal_mb']:>14.1f}")
            print(json.dumps(row))


if __name__ == "__main__":
    main()
