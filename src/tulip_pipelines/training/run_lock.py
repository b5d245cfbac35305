"""One run per run dir at a time: an advisory lock file (``<run_dir>/.lock``) holding the owner's
pid, host and start time.

The lock is ``fcntl.flock`` on that file: the operating system releases it when the owner dies,
however it dies, so a lock file left by a dead process is simply taken over (with a log line
naming the dead owner). A live owner makes a second run stop at once with a message naming it.
Within one process the lock is re-entrant (the project hook takes every stage's lock before the
pipeline starts; the stage takes its own again). POSIX only; on a shared filesystem flock must be
supported across nodes (NFSv4 and Lustre with flock enabled do; otherwise use one run dir per
job). ``filelock`` was considered: it does not record or report the owner.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_held: dict[Path, tuple[int, int]] = {}  # run dir -> (file descriptor, depth) in this process


class RunDirBusy(RuntimeError):
    """Another live process holds the run dir's lock."""


def acquire(run_dir: str | Path) -> None:
    """Take ``run_dir``'s lock (or deepen this process's hold on it); :class:`RunDirBusy` if a
    live process holds it."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        fd, depth = _held[run_dir]
        _held[run_dir] = (fd, depth + 1)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _read_owner(fd)
        os.close(fd)
        raise RunDirBusy(
            f"{run_dir} is in use by another run: pid {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}, started {owner.get('started', '?')} "
            f"({owner.get('command', '?')}). Wait for it to finish, stop it, or give this run "
            f"another run_dir."
        ) from None
    previous = _read_owner(fd)
    if previous:
        logger.warning("%s: took over the lock of pid %s on %s (started %s), which is gone",
                       run_dir, previous.get("pid"), previous.get("host"), previous.get("started"))
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": time.strftime("%Y-%m-%d %H:%M:%S"),
             "command": " ".join(sys.argv)[:200]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    _held[run_dir] = (fd, 1)


def release(run_dir: str | Path) -> None:
    run_dir = Path(run_dir).resolve()
    fd, depth = _held[run_dir]
    if depth > 1:
        _held[run_dir] = (fd, depth - 1)
        return
    del _held[run_dir]
    os.ftruncate(fd, 0)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


def _read_owner(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
