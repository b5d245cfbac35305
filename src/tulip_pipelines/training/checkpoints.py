"""Training checkpoints: DeepSpeed's training state, trusted only once complete.

A stage's checkpoints live under ``<run_dir>/checkpoints/step_XXXXXXXX/`` in DeepSpeed's own
layout. A checkpoint counts only once rank 0 has written ``COMPLETE`` (JSON: step, fingerprint)
after every rank finished writing; the training history up to that step is stored beside it in
``history.json``. A rerun resumes from the newest complete checkpoint whose fingerprint matches;
a mismatch (other parameters, data or model) moves the old checkpoints aside and starts fresh.

The fingerprint leaves out the run's *layout* (micro batch, accumulation, processes): a run
continues on another number of processes or nodes as long as the global batch is the same. A
checkpoint whose optimizer state DeepSpeed sharded over another number of processes (ZeRO-1/2,
bf16) is first converted to DeepSpeed's *universal* format (``ds_to_universal``, into
``step_XXXXXXXX/universal/``) and loaded from there. A changed global batch stops the run with
a message saying how to continue: the data order and the schedule are counted in global batches.

(Exported *models* — safetensors weights for users — are another thing: ``models/files.py``.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tulip_pipelines import atomic
from tulip_pipelines.training.datasets import DataPosition
from tulip_pipelines.training.job import TrainParams

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
HISTORY_FILE = "history.json"
RNG_FILE = "rng_rank{rank}.json"
_TAG_RE = re.compile(r"^step_(\d{8})$")
UNIVERSAL_DIR = "universal"
# DeepSpeed keys left out of fingerprints: what only changes what is printed, and the layout
# (micro batch, accumulation, processes: the global batch is compared on its own, see Layout)
_DS_IGNORED_KEYS = ("steps_per_print", "wall_clock_breakdown", "dump_state", "flops_profiler",
                    "checkpoint", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "train_batch_size")


@dataclass(frozen=True)
class Layout:
    """How a run spreads its global batch: ``micro_batch`` samples per forward on each of
    ``processes`` processes, ``accumulation`` forwards per optimizer step."""

    micro_batch: int
    accumulation: int
    processes: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.processes

    def describe(self) -> str:
        return (f"{self.global_batch} = micro batch {self.micro_batch} x accumulation "
                f"{self.accumulation} x {self.processes} process(es)")


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from, and the layout it was written with (None for a
    checkpoint that does not record it: it was written by the same layout or not at all)."""

    tag: str
    layout: Layout | None


class GlobalBatchChanged(RuntimeError):
    """The checkpoints of a run were trained with another global batch than this run's."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag(step: int) -> str:
    return f"step_{step:08d}"


def run_fingerprint(params: TrainParams, ds_config: Mapping[str, Any], n_train: int,
                    fingerprint_inputs: Mapping[str, Any] | None) -> str:
    """Short hash of everything that determines the trained weights, except the layout (the
    global batch is checked separately, :func:`select_resume`)."""
    fields = {k: v for k, v in params.fingerprint_fields().items() if k != "batch_size"}
    payload = {
        "config": fields,
        "deepspeed": {k: v for k, v in ds_config.items() if k not in _DS_IGNORED_KEYS},
        "n_train": n_train,
        "extra": dict(fingerprint_inputs or {}),  # the key's name is part of existing hashes
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


def select_resume(root: Path, fingerprint: str, layout: Layout, params: TrainParams,
                  rank: int) -> Resume | None:
    """The newest complete, matching checkpoint; moves non-matching checkpoints aside (rank 0).
    Raises :class:`GlobalBatchChanged` when the matching one was trained with another global
    batch (nothing is moved: the run can continue with the old global batch)."""
    complete = complete_checkpoints(root)
    matching = [(t, info) for _, t, info in complete if info.get("fingerprint") == fingerprint]
    reason = None
    if complete and not params.resume:
        reason = "resume is off"
    elif complete and not matching:
        reason = (f"their fingerprint {complete[-1][2].get('fingerprint')} differs from this "
                  f"run's {fingerprint} (parameters, data or model changed)")
    dist.barrier()  # every rank has looked before anything moves
    if reason is not None:
        if rank == 0:
            aside = _unused_sibling(root, f".old-{time.strftime('%Y%m%d-%H%M%S')}")
            logger.warning("%s: not resuming from %s because %s; moved them to %s",
                           params.run_name, root, reason, aside)
            root.rename(aside)
        dist.barrier()
        return None
    if not matching:
        return None
    step_tag, info = matching[-1]
    then = Layout(**info["layout"]) if info.get("layout") else None
    if then is not None and then.global_batch != layout.global_batch:
        raise GlobalBatchChanged(
            f"{params.run_name}: checkpoint {root / step_tag} was trained with global batch "
            f"{then.describe()}; this run's is {layout.describe()}. The data order and the "
            f"schedule are counted in global batches, so the run cannot continue with another. "
            f"To continue, keep the global batch: set gradient_accumulation_steps (params:"
            f"deepspeed) to {_accumulation_for(then.global_batch, layout)}. To start this "
            f"stage afresh instead, set <stage>.train.resume=false (the old checkpoints are "
            f"moved aside, not deleted).")
    return Resume(step_tag, then)


def _accumulation_for(global_batch: int, layout: Layout) -> str:
    per_step = layout.micro_batch * layout.processes
    if global_batch % per_step:
        return (f"a value that makes micro batch x accumulation x processes = {global_batch} "
                f"(not possible with micro batch {layout.micro_batch} on {layout.processes} "
                f"process(es))")
    return str(global_batch // per_step)


def needs_universal(root: Path, resume: Resume, layout: Layout) -> bool:
    """Whether the checkpoint's optimizer state is sharded over another number of processes
    than this run's (ZeRO-1/2 or bf16 write one ``*_optim_states.pt`` per data-parallel rank)."""
    if resume.layout is None or resume.layout.processes == layout.processes:
        return False
    return any((root / resume.tag).glob("*zero_pp_rank_*_optim_states.pt"))


def convert_to_universal(root: Path, step_tag: str, rank: int,
                         poll_s: float = 1.0) -> Path:
    """DeepSpeed's universal checkpoint of ``step_tag`` (``ds_to_universal``), written once by
    rank 0 into ``<tag>/universal`` (through a temporary folder); every rank waits for it.
    Returns the folder to give ``engine.load_checkpoint`` as ``load_dir`` with tag
    ``universal``.

    The other ranks wait on the shared filesystem (``universal/`` or rank 0's
    ``universal.failed``, every ``poll_s``), not in a collective: a conversion of a large ZeRO-2
    state can outlast the process group's collective timeout (10 minutes for NCCL), which would
    abort the job while it converts. They meet in a barrier only once the folder is there."""
    tag_dir = root / step_tag
    out, failed = tag_dir / UNIVERSAL_DIR, tag_dir / f"{UNIVERSAL_DIR}.failed"
    if rank == 0:
        failed.unlink(missing_ok=True)  # an earlier attempt's
    dist.barrier()  # short: every rank comes from select_resume's barrier
    if rank == 0 and not out.is_dir():
        started = time.perf_counter()
        with atomic.atomic_directory(out) as tmp:
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                   "--input_folder", str(tag_dir), "--output_folder", str(tmp),
                   "--inject_missing_state", "--num_extract_workers", "2",
                   "--num_merge_workers", "1"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                message = (f"converting checkpoint {tag_dir} to DeepSpeed's universal format "
                           f"failed ({' '.join(cmd)}):\n{(done.stdout + done.stderr)[-3000:]}")
                atomic.write_text(failed, message)  # the other ranks stop waiting and say so
                raise RuntimeError(message)
        logger.info("checkpoint %s converted to the universal format in %.1f s (%.1f MB)",
                    tag_dir, time.perf_counter() - started, folder_size(out) / 1e6)
    elif rank != 0:
        _wait_for_conversion(out, failed, rank, poll_s)
    dist.barrier()
    if not out.is_dir():
        raise RuntimeError(f"rank {rank} does not see {out} that rank 0 wrote: the run dir must "
                           f"be on a filesystem every node shares")
    return tag_dir


def _wait_for_conversion(out: Path, failed: Path, rank: int, poll_s: float) -> None:
    """Until rank 0's universal folder (or its failure note) appears; a log line a minute."""
    started = last_said = time.monotonic()
    while not out.is_dir():
        if failed.is_file():
            raise RuntimeError(f"rank {rank}: rank 0 could not convert the checkpoint: "
                               f"{failed.read_text()[-1000:]}")
        if time.monotonic() - last_said >= 60:
            last_said = time.monotonic()
            logger.info("rank %d: waiting for rank 0 to convert %s (%.0f s)", rank, out.parent,
                        last_said - started)
        time.sleep(poll_s)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_checkpoint(engine, root: Path, step: int, client_state: dict[str, Any],
                    history: list[dict[str, float]], keep: int, rank: int) -> Path:
    """DeepSpeed checkpoint of ``step`` and every rank's RNG states, then (after every rank is
    done) the history and the ``COMPLETE`` marker, and pruning to the newest ``keep`` complete
    checkpoints. A process killed before the marker leaves the previous checkpoint in use."""
    step_tag = tag(step)
    engine.save_checkpoint(str(root), tag=step_tag, client_state=client_state)
    tag_dir = root / step_tag
    atomic.write_text(tag_dir / RNG_FILE.format(rank=rank), json.dumps(rng_state()))
    dist.barrier()
    if rank == 0:
        atomic.write_text(tag_dir / HISTORY_FILE, json.dumps(history))
        atomic.write_text(tag_dir / COMPLETE_MARKER,
                     json.dumps({"step": step, "fingerprint": client_state.get("fingerprint"),
                                 "layout": client_state.get("layout")}))
        prune(root, keep)
        logger.info("checkpoint %s complete", tag_dir)
    dist.barrier()
    return tag_dir


def rng_state() -> dict[str, Any]:
    """This process's random number generators (torch CPU, its own CUDA device's, numpy, python)
    as JSON.

    Only the generator of this process's current CUDA device is kept (``cuda_device``): a rank
    draws on its own GPU only, and a run resumed with fewer visible GPUs (elastic resume) has no
    device to put the others' states on (``set_rng_state_all`` would raise IndexError)."""
    def encode(tensor: torch.Tensor) -> str:
        return base64.b64encode(tensor.numpy().tobytes()).decode()

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": encode(torch.get_rng_state()),
        "cuda_device": encode(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "python": [version, list(internal), gauss],
    }


def restore_rng_state(root: Path, step_tag: str, rank: int) -> bool:
    """Put back the RNG states this rank saved with checkpoint ``step_tag``; False when the
    checkpoint has none for this rank (written by fewer processes)."""
    path = root / step_tag / RNG_FILE.format(rank=rank)
    if not path.is_file():
        return False
    state = json.loads(path.read_text())

    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch"]))
    if torch.cuda.is_available():
        local = state.get("cuda_device")
        if local is None and state.get("cuda"):  # written with every visible device's state
            index = torch.cuda.current_device()
            local = state["cuda"][index] if index < len(state["cuda"]) else None
        if local is not None:  # this process's device (the current one) only
            torch.cuda.set_rng_state(decode(local))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    return True


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


def data_position(client_state: Mapping[str, Any], layout: Layout) -> DataPosition:
    """Where a resumed run continues in the data order: the checkpoint's epoch, and the global
    samples consumed in it turned into this layout's micro batches per process (a checkpoint
    is written at a step boundary, so they divide evenly when the global batch is the same)."""
    epoch = int(client_state["epoch"])
    if "samples" not in client_state:  # written before checkpoints recorded the layout
        return DataPosition(epoch, int(client_state["batch_offset"]))
    per_micro = layout.micro_batch * layout.processes
    samples = int(client_state["samples"])
    if samples % per_micro:
        raise RuntimeError(f"the checkpoint stopped {samples} samples into epoch {epoch}, not a "
                           f"whole number of micro batches of {layout.micro_batch} on "
                           f"{layout.processes} process(es)")
    return DataPosition(epoch, samples // per_micro)
