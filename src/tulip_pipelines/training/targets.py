"""Cached teacher targets for distillation: the frozen teacher's text embedding of every row the
student distils from, computed once instead of at every step of every epoch.

A cache is a folder: ``manifest.json`` (fingerprint, dtype, rows per role, chunks written) and
``<role>-NNNNN.safetensors`` chunks. Writing is batched and resumable: a chunk is written under a
temporary name and renamed, and the manifest records it, so a killed write continues with the
next chunk. The fingerprint ties the cache to what determines its values: the teacher's text
tower weights and architecture, the texts of every row, the teacher's input (tokens or windows)
and the dtype. A cache whose fingerprint differs is rebuilt, never reused, and the distill stage
refuses targets whose fingerprint is not the one it expects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from tulip_pipelines.models.spec import ModelBundle
from tulip_pipelines.progress import progress
from tulip_pipelines.training.data import window_tokens
from tulip_pipelines.training.tasks import teacher_target

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
# teacher parameters that do not change its text embedding (left out of the fingerprint)
_IMAGE_TOWER = ("visual.", "logit_scale", "logit_bias")


@dataclass
class TargetsRequest:
    """What to cache: the teacher, the texts per role (``train``, ``val``), how the teacher reads
    them and in which dtype. ``None`` texts means "no cache" (targets computed live)."""

    teacher: ModelBundle | None
    texts: Mapping[str, Sequence[str]] | None
    teacher_input: str = "tokens"
    window_overlap: int = 20
    max_windows: int = 5
    dtype: str = "float16"
    batch_size: int = 256

    def fingerprint(self) -> str:
        return targets_fingerprint(self.teacher, self.texts or {}, self.teacher_input,
                                   self.window_overlap, self.max_windows, self.dtype)


def targets_fingerprint(teacher: ModelBundle, texts: Mapping[str, Sequence[str]],
                        teacher_input: str, window_overlap: int, max_windows: int,
                        dtype: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"spec": teacher.spec.to_dict(), "input": teacher_input,
                              "overlap": window_overlap, "windows": max_windows,
                              "dtype": dtype}, sort_keys=True, default=str).encode())
    for key, tensor in sorted(teacher.model.state_dict().items()):
        if not key.startswith(_IMAGE_TOWER):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                          .numpy().tobytes())
    for role in sorted(texts):
        digest.update(f"\0{role}\0{len(texts[role])}".encode())
        for text in texts[role]:
            digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:16]


def write_targets(request: TargetsRequest, folder: str | Path) -> None:
    """Compute and write the cache into ``folder``: reuse a complete matching cache, resume a
    partial matching one, rebuild anything else (with a log line saying which)."""
    folder = Path(folder)
    if request.texts is None:  # live targets: an empty cache that says so
        _reset(folder)
        _write_manifest(folder, {"mode": "live"})
        return
    fingerprint = request.fingerprint()
    manifest = read_manifest(folder)
    if manifest.get("fingerprint") == fingerprint and manifest.get("complete"):
        logger.info("teacher targets in %s match fingerprint %s: reused", folder, fingerprint)
        return
    if manifest.get("fingerprint") == fingerprint:
        logger.info("teacher targets in %s: resuming after %s chunks", folder, manifest["chunks"])
    else:
        if manifest.get("fingerprint"):
            logger.warning("teacher targets in %s are stale (fingerprint %s, expected %s: "
                           "teacher, captions or settings changed): rebuilding", folder,
                           manifest["fingerprint"], fingerprint)
        _reset(folder)
        manifest = {"mode": "cached", "fingerprint": fingerprint, "dtype": request.dtype,
                    "rows": {role: len(t) for role, t in request.texts.items()},
                    "chunk_rows": request.batch_size, "chunks": {r: 0 for r in request.texts},
                    "complete": False}
        _write_manifest(folder, manifest)
    teacher = request.teacher.model.eval()
    total = sum(len(t) for t in request.texts.values())
    done = sum(min(n * manifest["chunk_rows"], len(request.texts[r]))
               for r, n in manifest["chunks"].items())
    with progress(total, "teacher targets", "text", initial=done) as bar:
        for role, texts in request.texts.items():
            size = manifest["chunk_rows"]
            for chunk in range(manifest["chunks"][role], -(-len(texts) // size)):
                part = list(texts[chunk * size:(chunk + 1) * size])
                values = embed_texts(request, teacher, part).to(DTYPES[request.dtype])
                path = folder / f"{role}-{chunk:05d}.safetensors"
                save_file({"targets": values.contiguous()}, str(path) + ".tmp")
                os.replace(str(path) + ".tmp", path)
                manifest["chunks"][role] = chunk + 1
                _write_manifest(folder, manifest)
                bar.update(len(part))
    manifest["complete"] = True
    _write_manifest(folder, manifest)
    logger.info("teacher targets: %s rows written to %s (%s, fingerprint %s)",
                manifest["rows"], folder, request.dtype, fingerprint)


@torch.no_grad()
def embed_texts(request: TargetsRequest, teacher: torch.nn.Module,
                texts: list[str]) -> torch.Tensor:
    """The teacher's targets for ``texts`` (float32), exactly as the live distillation computes
    them (:func:`tulip_pipelines.training.tasks.teacher_target`)."""
    tokenizer = request.teacher.tokenizer
    if request.teacher_input == "windows":
        windows, mask = window_tokens(texts, tokenizer, request.window_overlap,
                                      request.max_windows)
        batch = {"windows": windows, "window_mask": mask}
    else:
        batch = {"teacher_long": tokenizer(texts)}
    return teacher_target(teacher, batch, request.teacher_input).cpu()


class TeacherTargets:
    """A written cache, loaded: ``role -> tensor [rows, dim]`` and its fingerprint (``None`` for
    the live mode: no cache)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if not manifest:
            raise FileNotFoundError(f"no teacher targets in {self.folder} ({MANIFEST} missing)")
        self.cached = manifest.get("mode") == "cached"
        self.fingerprint = manifest.get("fingerprint")
        if self.cached and not manifest.get("complete"):
            raise RuntimeError(f"teacher targets in {self.folder} are incomplete; rerun the "
                               f"embed_teacher_texts node (it resumes)")
        self.rows: dict[str, int] = manifest.get("rows", {})
        self._manifest = manifest

    def role(self, role: str) -> torch.Tensor:
        chunks = [load_file(str(self.folder / f"{role}-{i:05d}.safetensors"))["targets"]
                  for i in range(self._manifest["chunks"][role])]
        values = torch.cat(chunks)
        if len(values) != self.rows[role]:
            raise RuntimeError(f"teacher targets in {self.folder}: {len(values)} {role} rows, "
                               f"the manifest says {self.rows[role]}")
        return values


class WithTargets(Dataset):
    """A distillation dataset whose samples also carry the cached ``target``."""

    def __init__(self, dataset: Dataset, targets: torch.Tensor):
        if len(dataset) != len(targets):
            raise ValueError(f"{len(targets)} cached targets for {len(dataset)} rows")
        self.dataset, self.targets = dataset, targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "target": self.targets[index]}


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("unreadable %s; the teacher targets there will be rebuilt", path)
        return {}


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / MANIFEST)


def _reset(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
