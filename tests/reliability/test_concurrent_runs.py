"""One run per run dir at a time: a second run stops at once naming the first; a lock left by a
dead process is taken over with a log line; the project hook takes the locks before any node."""

import logging
import subprocess
import sys
import time

import pytest
from kedro.framework.session import KedroSession

from tulip_pipelines.training import run_dir as run_lock

HOLDER = """
import sys, time
from tulip_pipelines.training import run_dir as run_lock
run_lock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path, project_root):
    """Another live process holding the lock of ``tmp_path / 'run'``."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")],
                             cwd=project_root, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    yield child
    child.kill()
    child.wait()


def test_a_second_run_stops_at_once_naming_the_first(holder, tmp_path):
    started = time.monotonic()
    with pytest.raises(run_lock.RunDirBusy, match=f"pid {holder.pid}"):
        run_lock.acquire(tmp_path / "run")
    assert time.monotonic() - started < 1.0


def test_a_stale_lock_of_a_dead_process_is_taken_over(holder, tmp_path, caplog):
    holder.kill()
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="tulip_pipelines.training.run_dir"):
        with run_lock.run_lock(tmp_path / "run"):
            with run_lock.run_lock(tmp_path / "run"):  # re-entrant within a process
                pass
    assert f"took over the lock of pid {holder.pid}" in caplog.text


def test_kedro_run_on_busy_run_dirs_stops_before_any_node(project_copy, tmp_path, project_root):
    run_dir = project_copy / "data/06_models/runs/teacher"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=project_root,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with KedroSession.create(project_path=project_copy) as session:
            with pytest.raises(run_lock.RunDirBusy, match=f"pid {child.pid}"):
                session.run()
    finally:
        child.kill()
        child.wait()
    assert not (project_copy / "data/01_raw/sharegpt4v_demo").exists()  # nothing ran
    assert not run_lock._held  # the hook released what it had taken
