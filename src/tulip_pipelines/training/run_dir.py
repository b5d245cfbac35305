"""What a run dir holds beside its checkpoints: the lock that allows one run at a time
(``<run_dir>/.lock``, :func:`run_lock`), and the heartbeats: where each rank of a training run
is, with a warning when the run stops making steps.

Every rank records its last finished optimizer step and what it is doing now (``train``,
``validate``, ``checkpoint``, ``done``) in ``<run_dir>/heartbeat/rank<R>.json`` (at most once a
second, and at every change of phase). :class:`StallWatch`, a thread in the process that waits
for the training (the Kedro node), reads them and logs a warning when no rank finished a step for
``stall_minutes``: the last step and where each rank is. It only warns: a stalled collective is
for DeepSpeed's and torch's timeouts to end.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tulip_pipelines import atomic

logger = logging.getLogger(__name__)

HEARTBEAT_DIR = "heartbeat"


def heartbeat_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / HEARTBEAT_DIR


class Heartbeat:
    """One rank's record of its progress (see the module docstring)."""

    def __init__(self, run_dir: str | Path, rank: int, min_interval_s: float = 1.0):
        self.path = heartbeat_dir(run_dir) / f"rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.min_interval_s = rank, min_interval_s
        self.phase, self.step, self._since, self._written = "", -1, time.time(), 0.0

    def beat(self, step: int, phase: str = "train") -> None:
        now = time.time()
        changed = phase != self.phase
        if changed:
            self._since = now
        self.phase, self.step = phase, step
        if changed or now - self._written >= self.min_interval_s:
            record = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                      "step": step, "phase": phase, "phase_since": self._since, "time": now}
            atomic.write_text(self.path, json.dumps(record))
            self._written = now


def read_heartbeats(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every rank's last record, by rank (unreadable files left out)."""
    records = []
    for path in sorted(heartbeat_dir(run_dir).glob("rank*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(records, key=lambda r: r.get("rank", 0))


def clear_heartbeats(run_dir: str | Path) -> None:
    shutil.rmtree(heartbeat_dir(run_dir), ignore_errors=True)


def describe_ranks(records: list[dict[str, Any]], now: float | None = None) -> str:
    """``rank 0 (host, pid 12): step 120, checkpoint for 31.0 min; rank 1 ...``"""
    now = time.time() if now is None else now
    return "; ".join(
        f"rank {r['rank']} ({r.get('host')}, pid {r.get('pid')}): step {r['step']}, "
        f"{r['phase']} for {(now - r['phase_since']) / 60:.1f} min" for r in records
    ) or "no rank has reported yet"


class StallWatch:
    """A thread that warns when the run in ``run_dir`` made no optimizer step for
    ``stall_minutes`` (again after each further ``stall_minutes``); ``with StallWatch(...):``."""

    def __init__(self, run_dir: str | Path, run_name: str, stall_minutes: float,
                 poll_s: float | None = None):
        self.run_dir, self.run_name = run_dir, run_name
        self.stall_s = stall_minutes * 60
        self.poll_s = poll_s if poll_s is not None else min(30.0, max(0.2, self.stall_s / 10))
        self.warnings: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"stall-watch-{run_name}",
                                        daemon=True)

    def __enter__(self) -> StallWatch:
        if self.stall_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        last_step, last_change, warned_at = None, time.time(), None
        while not self._stop.wait(self.poll_s):
            records = read_heartbeats(self.run_dir)
            step = max((r["step"] for r in records), default=None)
            now = time.time()
            if step != last_step or any(r["phase"] == "done" for r in records):
                last_step, last_change, warned_at = step, now, None
                continue
            if now - max(last_change, warned_at or 0) >= self.stall_s:
                message = (f"{self.run_name}: no optimizer step for "
                           f"{(now - last_change) / 60:.1f} min (last finished step: "
                           f"{last_step if last_step is not None and last_step >= 0 else 'none'})"
                           f"; {describe_ranks(records, now)}")
                logger.warning(message)
                self.warnings.append(message)
                warned_at = now


# One run per run dir: an exclusive lock on <run_dir>/.lock, naming its holder

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
