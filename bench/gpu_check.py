"""``make gpu-check``: the whole ``tulip`` pipeline of ``conf/sharegpt4v`` on a generated tree in
ShareGPT4V's layout, on every GPU of this machine, then ``bench/gpu.py``.

The tree (``bench/lib/sharegpt4v_tree.py``): a few hundred real-size JPEGs (COCO 640x480, SAM
1500x2250) with long captions, Urban1k, COCO and Flickr30k layouts, and ViT-L-14 random weights
written to a file as ``teacher_pretrained``. It runs in a copy of the project's conf with only
``globals.yml`` filled in and the budgets cut to one epoch of this small tree (the environment's
own batches, accumulation, precision, ZeRO stage and schedules otherwise). Prints, per training
stage: steps, samples/s, wall time and peak device memory; then ``bench/gpu.py``'s step split,
MFU and peak memory. Fails if any stage trained, or the teacher text embeddings or the
evaluation ran, on the CPU while a GPU was present.

First, the CUDA paths of docs/gpu.md (``bench/lib/cuda_paths.py``): one amp_bf16 expand step of
the engine, whose gradient pass (inside DeepSpeed's ``engine(batch)``) and cache pass must run
the towers' Linear layers in bfloat16 (the count of each dtype is printed), the TF32 flags that
``train.tf32: true`` set, and a run checkpointed with every GPU visible and resumed with one
(with a single GPU: from an RNG file that lists 8 devices' generators). Fails if either check
does.

    .venv/bin/python bench/gpu_check.py            # on a GPU machine (make gpu-check)
    .venv/bin/python bench/gpu_check.py --tiny     # the CPU fallback CI runs: TULIP-Tiny, 1 process
                                                   # (what it runs anyway where there is no GPU)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "lib"))  # the helpers: the generated tree

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from cuda_paths import amp_bf16_step, resume_with_fewer_devices  # noqa: E402
from sharegpt4v_tree import write_teacher_weights, write_tree  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("distill", "expand", "longclip_authors", "longclip_equal_budget")


def project_copy(dest: Path, globals_yml: dict[str, str]) -> Path:
    """The project's conf (no conf/local) and pyproject.toml at ``dest``, globals filled in."""
    shutil.copytree(ROOT / "conf", dest / "conf", ignore=shutil.ignore_patterns("local"))
    (dest / "conf" / "local").mkdir()
    (dest / "src").mkdir()
    shutil.copy(ROOT / "pyproject.toml", dest)
    lines = [f"{key}: {value}" for key, value in globals_yml.items()]
    (dest / "conf" / "sharegpt4v" / "globals.yml").write_text("\n".join(lines) + "\n")
    return dest


def runtime_params(processes: int, workers: int, tiny: bool, val_size: int) -> str:
    """One epoch of the small tree at the environment's batches (warmups cut to fit)."""
    params = {"split.val_size": val_size, "evaluate.num_workers": workers,
              "evaluate.bootstrap_resamples": 200}
    for stage in ("distill", "expand", "longclip.authors"):
        params |= {f"{stage}.num_processes": processes, f"{stage}.train.num_workers": workers,
                   f"{stage}.train.warmup_steps": 1, f"{stage}.train.log_every": 1,
                   f"{stage}.train.val_every": 0, f"{stage}.train.checkpoint_every": 0}
    params |= {"distill.train.epochs": 1, "longclip.authors.train.epochs": 1}
    if tiny:  # the CPU fallback: a handful of steps, Long-CLIP's 2,048 a step shrunk to fit
        params |= {"longclip.authors.train.batch_size": 4, "distill.embedding_batch_size": 64}
    return ",".join(f"{key}={value}" for key, value in params.items())


def report(project: Path, log: str, gpu: bool, seconds: float) -> list[str]:
    """Print each stage's figures; return what ran on the CPU although a GPU was present."""
    problems = []
    print(f"\n`kedro run --env sharegpt4v --pipelines tulip`: {seconds:.0f} s")
    print(f"{'stage':<24}{'steps':>6}{'samples/s':>11}{'peak GPU GB':>13}")
    for stage in STAGES:
        path = project / "data" / "08_reporting" / f"{stage}_history.parquet"
        history = pd.read_parquet(path)
        rate = history["samples_per_s"].iloc[1:].median() if len(history) > 1 else float("nan")
        peak = history.get("peak_gpu_memory_gb", pd.Series(dtype=float)).max()
        print(f"{stage:<24}{int(history['step'].max()):>6}{rate:>11.1f}"
              f"{peak if pd.notna(peak) else float('nan'):>13.2f}")
        if gpu and not (pd.notna(peak) and peak > 0):
            problems.append(f"{stage} trained on the CPU")
    metrics = pd.read_parquet(project / "data" / "08_reporting" / "retrieval_metrics.parquet")
    print(f"evaluate: {metrics['benchmark'].nunique()} benchmarks x "
          f"{metrics['model'].nunique()} models scored")
    if gpu:
        for line, what in (("teacher text embeddings on cuda", "the teacher text embeddings"),
                           ("evaluation on cuda", "the evaluation")):
            if line not in log:
                problems.append(f"{what} did not run on the GPU")
    return problems


def cuda_paths(work: Path) -> list[str]:
    """Print the CUDA-path checks (bench/lib/cuda_paths.py); return what failed."""
    problems = []
    amp = amp_bf16_step(work)
    print(f"amp_bf16 expand step: Linear outputs, gradient pass {amp['gradient_pass']}, cache "
          f"pass {amp['cache_pass']}; TF32 after train.tf32: true: matmul "
          f"{amp['tf32_matmul']}, cuDNN {amp['tf32_cudnn']}")
    if not amp["ok"]:
        problems.append("the amp_bf16 step did not run its towers in bfloat16")
    if not (amp["tf32_matmul"] and amp["tf32_cudnn"]):
        problems.append("train.tf32: true did not set TF32")
    resume = resume_with_fewer_devices(work)
    print(f"resume: checkpoint written with {resume['saved_with']} visible device(s), resumed "
          f"with {resume['resumed_with']} ({resume['how']}): from step "
          f"{resume['resumed_from']} to {resume['final_step']}")
    if not resume["ok"]:
        problems.append("the run did not resume on fewer visible devices")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="CPU fallback: TULIP-Tiny, a smaller tree, one process")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it")
    parser.add_argument("--no-bench", dest="bench", action="store_false",
                        help="skip bench/gpu.py afterwards")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    args.tiny = args.tiny or not gpu  # ViT-L-14 on CPU cores would take hours
    processes = max(1, torch.cuda.device_count()) if not args.tiny else 1
    records = args.records or (100 if args.tiny else 400)
    model = "TULIP-Tiny" if args.tiny else "ViT-L-14"
    work = args.keep or Path(tempfile.mkdtemp(prefix="tulip-gpu-check-"))
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    problems = cuda_paths(work)
    started = time.perf_counter()
    tree = write_tree(work / "tree", records=records, benchmark_images=12 if args.tiny else 40)
    weights = write_teacher_weights(work / "tree" / f"{model}.safetensors", model)
    print(f"tree of {records} records and teacher weights ({model}, random) written in "
          f"{time.perf_counter() - started:.0f} s under {work}; {processes} training process(es) "
          f"on {'GPU' if gpu else 'CPU'}")
    project = project_copy(work / "project", {
        "sharegpt4v_root": tree["sharegpt4v_root"], "benchmarks_root": tree["benchmarks_root"],
        "teacher_model_name": model, "teacher_pretrained": weights,
        "teacher_cache_dir": "null", "teacher_download": "false"})
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    if not gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    workers = 0 if args.tiny else min(8, (os.cpu_count() or 2) // max(processes, 1))
    command = [str(Path(sys.executable).parent / "kedro"), "run", "--env", "sharegpt4v",
               "--pipelines", "tulip", "--params",
               runtime_params(processes, workers, args.tiny, 20 if args.tiny else 40)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = done.stdout + done.stderr
    (work / "kedro_run.log").write_text(log)
    if done.returncode != 0:
        sys.exit(f"kedro run failed ({done.returncode}); the log ends with:\n{log[-6000:]}")
    problems += report(project, log, gpu, seconds)
    if args.bench:
        bench = [sys.executable, str(ROOT / "bench" / "gpu.py")] + ([] if gpu else ["--smoke"])
        print("\n" + " ".join(bench), flush=True)
        subprocess.run(bench, check=True)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    if problems:
        sys.exit("GPU check failed: " + "; ".join(problems))
    print("\nGPU check passed" if gpu else "\nCPU fallback passed (no GPU here)")


if __name__ == "__main__":
    main()
