"""The GPU checks' CPU fallbacks run (so that the scripts cannot rot between GPU runs); the
pipeline check is also the real-scale environment end to end on a tree in its layouts."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_gpu_bench_cpu_fallback_prints_both_steps(project_root):
    done = subprocess.run([sys.executable, str(project_root / "bench" / "gpu.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600, cwd=project_root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.strip()}
    for step in ("distill", "expand"):
        samples_per_s = float(rows[step][1])
        assert samples_per_s > 0, rows[step]


@pytest.mark.slow
def test_gpu_check_cpu_fallback_runs_the_real_scale_environment_end_to_end(project_root):
    """``make gpu-check`` on the CPU: ``kedro run --env sharegpt4v --pipelines tulip`` on a
    generated tree in ShareGPT4V's, Urban1k's, COCO's and Flickr30k's layouts, with a teacher
    weights file, every stage of the environment's recipe (amp_bf16, ZeRO-2, accumulation 4)."""
    done = subprocess.run([sys.executable, str(project_root / "bench" / "gpu_check.py"),
                           "--tiny", "--no-bench"], capture_output=True, text=True, timeout=600,
                          cwd=project_root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.strip()}
    for stage in ("distill", "expand", "longclip_authors", "longclip_equal_budget"):
        assert int(rows[stage][1]) >= 1 and float(rows[stage][2]) > 0, rows[stage]
    # DCI is absent from the tree and skipped; the other five benchmarks score all six models
    assert "evaluate: 5 benchmarks x 6 models scored" in done.stdout
