"""Training checkpoints: DeepSpeed's training state, trusted only once complete.

A stage's checkpoints live under ``<run_dir>/checkpoints/step_XXXXXXXX/`` in DeepSpeed's own
layout. A checkpoint counts only once rank 0 has written ``COMPLETE`` (JSON: step, fingerprint)
after every rank finished writing; the training history up to that step is stored beside it in
``history.json``. A rerun resumes from the newest complete checkpoint whose fingerprint matches;
a mismatch (other parameters, data or model) moves the old checkpoints aside and starts fresh.

(Exported *models* — safetensors weights for users — are another thing: ``models/files.py``.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tulip_pipelines.training.train_params import TrainParams

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
HISTORY_FILE = "history.json"
RNG_FILE = "rng_rank{rank}.json"
_TAG_RE = re.compile(r"^step_(\d{8})$")
# DeepSpeed keys that only change what is printed, not what is trained (left out of fingerprints)
_DS_LOGGING_KEYS = ("steps_per_print", "wall_clock_breakdown", "dump_state", "flops_profiler")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag(step: int) -> str:
    return f"step_{step:08d}"


def run_fingerprint(params: TrainParams, ds_config: Mapping[str, Any], world_size: int,
                       n_train: int, extra: Mapping[str, Any] | None) -> str:
    """Short hash of everything that determines the trained weights."""
    payload = {
        "config": params.fingerprint_fields(),
        "deepspeed": {k: v for k, v in ds_config.items() if k not in _DS_LOGGING_KEYS},
        "world_size": world_size,
        "n_train": n_train,
        "extra": dict(extra or {}),
    }
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def complete_checkpoints(root: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """``(step, tag, marker)`` of every complete checkpoint under ``root``, oldest first.
    Tag directories without a readable ``COMPLETE`` marker (half written) are left out."""
    found = []
    if not root.is_dir():
        return found
    for tag_dir in root.iterdir():
        match = _TAG_RE.match(tag_dir.name)
        marker = tag_dir / COMPLETE_MARKER
        if not (match and tag_dir.is_dir() and marker.is_file()):
            continue
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("unreadable checkpoint marker %s; ignoring that checkpoint", marker)
            continue
        found.append((int(match.group(1)), tag_dir.name, info))
    return sorted(found)


def select_resume_tag(root: Path, run_hash: str, params: TrainParams, rank: int) -> str | None:
    """The newest complete, matching tag; moves non-matching checkpoints aside (rank 0)."""
    complete = complete_checkpoints(root)
    matching = [t for _, t, info in complete if info.get("fingerprint") == run_hash]
    reason = None
    if complete and not params.resume:
        reason = "resume is off"
    elif complete and not matching:
        reason = (f"their fingerprint {complete[-1][2].get('fingerprint')} differs from this "
                  f"run's {run_hash} (parameters, data or model changed)")
    dist.barrier()  # every rank has looked before anything moves
    if reason is not None:
        if rank == 0:
            aside = _unused_sibling(root, f".old-{time.strftime('%Y%m%d-%H%M%S')}")
            logger.warning("%s: not resuming from %s because %s; moved them to %s",
                           params.run_name, root, reason, aside)
            root.rename(aside)
        dist.barrier()
        return None
    return matching[-1] if matching else None


def save_checkpoint(engine, root: Path, step: int, client_state: dict[str, Any],
                    history: list[dict[str, float]], keep: int, rank: int) -> Path:
    """DeepSpeed checkpoint of ``step`` and every rank's RNG states, then (after every rank is
    done) the history and the ``COMPLETE`` marker, and pruning to the newest ``keep`` complete
    checkpoints. A process killed before the marker leaves the previous checkpoint in use."""
    step_tag = tag(step)
    engine.save_checkpoint(str(root), tag=step_tag, client_state=client_state)
    tag_dir = root / step_tag
    atomic_write(tag_dir / RNG_FILE.format(rank=rank), json.dumps(rng_state()))
    dist.barrier()
    if rank == 0:
        atomic_write(tag_dir / HISTORY_FILE, json.dumps(history))
        atomic_write(tag_dir / COMPLETE_MARKER,
                     json.dumps({"step": step, "fingerprint": client_state.get("fingerprint")}))
        prune(root, keep)
        logger.info("checkpoint %s complete", tag_dir)
    dist.barrier()
    return tag_dir


def rng_state() -> dict[str, Any]:
    """This process's random number generators (torch CPU and CUDA, numpy, python) as JSON."""
    def encode(tensor: torch.Tensor) -> str:
        return base64.b64encode(tensor.numpy().tobytes()).decode()

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": encode(torch.get_rng_state()),
        "cuda": [encode(s) for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "python": [version, list(internal), gauss],
    }


def restore_rng_state(root: Path, step_tag: str, rank: int) -> None:
    """Put back the RNG states this rank saved with checkpoint ``step_tag``."""
    path = root / step_tag / RNG_FILE.format(rank=rank)
    state = json.loads(path.read_text())

    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def read_history(root: Path, step_tag: str) -> list[dict[str, float]]:
    return json.loads((root / step_tag / HISTORY_FILE).read_text())


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and stale partial tags."""
    keep_tags = {t for _, t, _ in complete_checkpoints(root)[-keep:]}
    for tag_dir in root.iterdir():
        if _TAG_RE.match(tag_dir.name) and tag_dir.is_dir() and tag_dir.name not in keep_tags:
            shutil.rmtree(tag_dir)


def _unused_sibling(path: Path, suffix: str) -> Path:
    """``<path><suffix>-<n>`` with the smallest n that does not exist yet."""
    n = 0
    while (candidate := path.with_name(f"{path.name}{suffix}-{n}")).exists():
        n += 1
    return candidate


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
