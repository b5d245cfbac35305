"""Teacher text embeddings for distillation: the frozen teacher's text embedding of every row the
student distils from, computed once (the distill pipeline's ``embed_teacher_texts`` node) instead
of at every step of every epoch, and cached in the catalog entry ``teacher_text_embeddings``.

A cache is a folder: ``manifest.json`` (cache key, dtype, rows per role, parts written) and
``<role>-NNNNN.safetensors`` parts. Computing yields part after part
(:func:`compute_teacher_embeddings`); each is stored under a temporary name and renamed, then the
manifest records it (:func:`write_part`), so a killed computation continues with the next part.
The *cache key* ties the cache to what determines its values: the teacher's text tower weights
and architecture, the texts of every row, the teacher's input (tokens or windows) and the dtype.
A cache whose key differs is rebuilt, never reused, and the distill stage refuses embeddings
whose key is not the one it expects.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from tulip_pipelines.models.device import (
    autocast_in_effect,
    inference_autocast,
    on_device,
    resolve_device,
)
from tulip_pipelines.models.spec import ModelBundle
from tulip_pipelines.progress import progress
from tulip_pipelines.training.datasets import window_tokens
from tulip_pipelines.training.tasks import teacher_text_embedding

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
# teacher parameters that do not change its text embedding (left out of the cache key)
_IMAGE_TOWER = ("visual.", "logit_scale", "logit_bias")


@dataclass
class TeacherEmbeddingsRequest:
    """What to cache: the teacher, the texts per role (``train``, ``val``), how the teacher reads
    them and in which dtype. ``None`` texts means "no cache" (embeddings computed live)."""

    teacher: ModelBundle | None
    texts: Mapping[str, Sequence[str]] | None
    teacher_input: str = "tokens"
    window_overlap: int = 20
    max_windows: int = 5
    dtype: str = "float16"
    batch_size: int = 256
    device: str = "auto"  # where the teacher runs (models/device.py)
    autocast: str | None = "bf16"  # its autocast on an accelerator (none on the CPU)

    def cache_key(self) -> str:
        autocast = autocast_in_effect(resolve_device(self.device), self.autocast)
        return cache_key(self.teacher, self.texts or {}, self.teacher_input,
                         self.window_overlap, self.max_windows, self.dtype, autocast)


def cache_key(teacher: ModelBundle, texts: Mapping[str, Sequence[str]], teacher_input: str,
              window_overlap: int, max_windows: int, dtype: str,
              autocast: str | None = None) -> str:
    """A hash of everything that determines the cached values (see the module docstring;
    ``autocast``: the one in effect, on an accelerator)."""
    digest = hashlib.sha256()
    settings = {"spec": teacher.spec.to_dict(), "input": teacher_input,
                "overlap": window_overlap, "windows": max_windows, "dtype": dtype}
    if autocast is not None:
        settings["autocast"] = autocast
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
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


@dataclass
class EmbeddingsPart:
    """One step of writing a cache, as :func:`compute_teacher_embeddings` yields it and
    :func:`write_part` stores it: the manifest after this step, and the part's values (``None``
    for a step that only records the manifest). ``reset``: clear the folder first (a new or
    stale cache)."""

    manifest: dict[str, Any]
    role: str | None = None
    chunk: int | None = None
    values: torch.Tensor | None = None
    reset: bool = False


def compute_teacher_embeddings(request: TeacherEmbeddingsRequest,
                               written: Mapping[str, Any]) -> Iterator[EmbeddingsPart]:
    """The teacher's text embeddings of every requested text, part by part (``batch_size`` rows
    each), after what is already ``written`` (a manifest, :func:`read_manifest`): a complete
    matching cache is reused (nothing computed), a partial matching one resumed, anything else
    rebuilt (with a log line saying which)."""
    if request.texts is None:  # live embeddings: an empty cache that says so
        yield EmbeddingsPart({"mode": "live"}, reset=True)
        return
    key = request.cache_key()
    manifest = copy.deepcopy(dict(written))
    if manifest.get("cache_key") == key and manifest.get("complete"):
        logger.info("teacher text embeddings match cache key %s: reused", key)
        yield EmbeddingsPart(manifest)
        return
    if manifest.get("cache_key") == key:
        logger.info("teacher text embeddings: resuming after %s parts", manifest["chunks"])
    else:
        if manifest.get("cache_key"):
            logger.warning("teacher text embeddings are stale (cache key %s, expected %s: "
                           "teacher, captions or settings changed): rebuilding",
                           manifest["cache_key"], key)
        manifest = {"mode": "cached", "cache_key": key, "dtype": request.dtype,
                    "rows": {role: len(t) for role, t in request.texts.items()},
                    "chunk_rows": request.batch_size, "chunks": {r: 0 for r in request.texts},
                    "complete": False}
        yield EmbeddingsPart(copy.deepcopy(manifest), reset=True)
    teacher = request.teacher.model.eval()
    size = manifest["chunk_rows"]
    total = sum(len(t) for t in request.texts.values())
    done = sum(min(n * size, len(request.texts[r])) for r, n in manifest["chunks"].items())
    device = resolve_device(request.device)
    logger.info("teacher text embeddings on %s (autocast: %s)", device,
                autocast_in_effect(device, request.autocast))
    with (progress(total, "teacher text embeddings", "text", initial=done) as bar,
          on_device(teacher, device), inference_autocast(device, request.autocast)):
        for role, texts in request.texts.items():
            for chunk in range(manifest["chunks"][role], -(-len(texts) // size)):
                part = list(texts[chunk * size:(chunk + 1) * size])
                values = embed_texts(request, teacher, part).to(DTYPES[request.dtype])
                manifest["chunks"][role] = chunk + 1
                yield EmbeddingsPart(copy.deepcopy(manifest), role, chunk, values)
                bar.update(len(part))
    manifest["complete"] = True
    logger.info("teacher text embeddings: %s rows computed (%s, cache key %s)",
                manifest["rows"], request.dtype, key)
    yield EmbeddingsPart(manifest)


def write_part(part: EmbeddingsPart, folder: str | Path) -> None:
    """Store one :class:`EmbeddingsPart`: the part's values under a temporary name renamed into
    place, then the manifest that records it (so a killed write resumes after the last part)."""
    folder = Path(folder)
    if part.reset:
        _reset(folder)
    if part.values is not None:
        path = folder / f"{part.role}-{part.chunk:05d}.safetensors"
        save_file({"embeddings": part.values.contiguous()}, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
    _write_manifest(folder, part.manifest)


@torch.no_grad()
def embed_texts(request: TeacherEmbeddingsRequest, teacher: torch.nn.Module,
                texts: list[str]) -> torch.Tensor:
    """The teacher's embeddings of ``texts`` (float32), exactly as the live distillation computes
    them (:func:`tulip_pipelines.training.tasks.teacher_text_embedding`)."""
    tokenizer = request.teacher.tokenizer
    if request.teacher_input == "windows":
        windows, mask = window_tokens(texts, tokenizer, request.window_overlap,
                                      request.max_windows)
        batch = {"windows": windows, "window_mask": mask}
    else:
        batch = {"teacher_long": tokenizer(texts)}
    device = next(teacher.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    return teacher_text_embedding(teacher, batch, request.teacher_input).float().cpu()


class TeacherTextEmbeddings:
    """A written cache, loaded: ``role -> tensor [rows, dim]`` and its cache key (``None`` for
    the live mode: no cache)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if not manifest:
            raise FileNotFoundError(f"no teacher text embeddings in {self.folder} ({MANIFEST} "
                                    f"missing)")
        self.cached = manifest.get("mode") == "cached"
        self.cache_key = manifest.get("cache_key")
        if self.cached and not manifest.get("complete"):
            raise RuntimeError(f"teacher text embeddings in {self.folder} are incomplete; rerun "
                               f"the embed_teacher_texts node (it resumes)")
        self.rows: dict[str, int] = manifest.get("rows", {})
        self._manifest = manifest

    def role(self, role: str) -> torch.Tensor:
        chunks = [load_file(str(self.folder / f"{role}-{i:05d}.safetensors"))["embeddings"]
                  for i in range(self._manifest["chunks"][role])]
        values = torch.cat(chunks)
        if len(values) != self.rows[role]:
            raise RuntimeError(f"teacher text embeddings in {self.folder}: {len(values)} {role} "
                               f"rows, the manifest says {self.rows[role]}")
        return values


class WithTeacherEmbeddings(Dataset):
    """A distillation dataset whose samples also carry their cached ``teacher_embedding``."""

    def __init__(self, dataset: Dataset, embeddings: torch.Tensor):
        if len(dataset) != len(embeddings):
            raise ValueError(f"{len(embeddings)} teacher text embeddings for {len(dataset)} rows")
        self.dataset, self.embeddings = dataset, embeddings

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "teacher_embedding": self.embeddings[index]}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """What a cache folder holds so far (``{}`` when nothing, or nothing readable)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("unreadable %s; the teacher text embeddings there will be rebuilt", path)
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
