"""The GPU check's CPU fallback runs (so that the script cannot rot between GPU runs)."""

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
