"""Teacher text embeddings for distillation: the frozen teacher's text embedding of every row the
student distils from, computed once (the distill pipeline's ``embed_teacher_texts`` node) instead
of at every step of every epoch, and cached in the catalog entry ``teacher_text_embeddings``.

A cache is a folder: ``manifest.json`` (cache key, dtype, rows per role, parts written) and
``<role>-NNNNN.safetensors`` parts. Computing yields part after part
(:func:`compute_teacher_text_embeddings`); each is stored under a temporary name and renamed,
then the manifest records it (:func:`write_part`), so a killed computation continues with the
next part.
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
import queue
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from tulip_pipelines import atomic
from tulip_pipelines.models.device import (
    autocast_in_effect,
    inference_autocast,
    on_device,
    resolve_device,
    worker_devices,
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
class TeacherTextEmbeddingsRequest:
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
    processes: int | None = None  # None: one per GPU of the node with device auto, else 1

    def workers(self) -> list[torch.device]:
        """One device per worker process (:func:`~tulip_pipelines.models.device.worker_devices`:
        every GPU of the node with ``auto``)."""
        return worker_devices(self.device, self.processes)

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
    settings = {"spec": asdict(teacher.spec), "input": teacher_input,
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
class TeacherTextEmbeddingsPart:
    """One step of writing a cache, as :func:`compute_teacher_text_embeddings` yields it and
    :func:`write_part` stores it: the manifest after this step, and the part's values (``None``
    for a step that only records the manifest). ``reset``: clear the folder first (a new or
    stale cache)."""

    manifest: dict[str, Any]
    role: str | None = None
    chunk: int | None = None
    values: torch.Tensor | None = None
    reset: bool = False


def _parts_done(manifest: Mapping[str, Any]) -> dict[str, list[int]]:
    """The parts a manifest records per role (``chunks: n``, as caches written before parts
    could complete out of order record them, is parts 0..n-1)."""
    if "parts" in manifest:
        return {role: sorted(done) for role, done in manifest["parts"].items()}
    return {role: list(range(n)) for role, n in manifest.get("chunks", {}).items()}


def compute_teacher_text_embeddings(request: TeacherTextEmbeddingsRequest,
                               written: Mapping[str, Any]) -> Iterator[TeacherTextEmbeddingsPart]:
    """The teacher's text embeddings of every requested text, part by part (``batch_size`` rows
    each), after what is already ``written`` (a manifest, :func:`read_manifest`): a complete
    matching cache is reused (nothing computed), a partial matching one resumed, anything else
    rebuilt (with a log line saying which). With several worker devices (every GPU of the node)
    one process per device computes every n-th missing part; parts come back as they finish."""
    if request.texts is None:  # live embeddings: an empty cache that says so
        yield TeacherTextEmbeddingsPart({"mode": "live"}, reset=True)
        return
    key = request.cache_key()
    manifest = copy.deepcopy(dict(written))
    if manifest.get("cache_key") == key and manifest.get("complete"):
        logger.info("teacher text embeddings match cache key %s: reused", key)
        yield TeacherTextEmbeddingsPart(manifest)
        return
    if manifest.get("cache_key") == key:
        manifest["parts"] = _parts_done(manifest)
        manifest.pop("chunks", None)
        logger.info("teacher text embeddings: resuming after %d parts",
                    sum(len(done) for done in manifest["parts"].values()))
    else:
        if manifest.get("cache_key"):
            logger.warning("teacher text embeddings are stale (cache key %s, expected %s: "
                           "teacher, captions or settings changed): rebuilding",
                           manifest["cache_key"], key)
        manifest = {"mode": "cached", "cache_key": key, "dtype": request.dtype,
                    "rows": {role: len(t) for role, t in request.texts.items()},
                    "chunk_rows": request.batch_size, "parts": {r: [] for r in request.texts},
                    "complete": False}
        yield TeacherTextEmbeddingsPart(copy.deepcopy(manifest), reset=True)
    size = manifest["chunk_rows"]
    todo = [(role, index, list(texts[index * size:(index + 1) * size]))
            for role, texts in request.texts.items()
            for index in range(-(-len(texts) // size)) if index not in manifest["parts"][role]]
    total = sum(len(t) for t in request.texts.values())
    devices = request.workers()
    logger.info("teacher text embeddings: %d parts to compute on %s (autocast: %s)", len(todo),
                ", ".join(str(d) for d in devices),
                autocast_in_effect(devices[0], request.autocast))
    settings = _Settings(asdict(request.teacher.spec), request.teacher_input,
                         request.window_overlap, request.max_windows, request.dtype,
                         request.autocast)
    compute = _in_this_process if len(devices) == 1 or len(todo) < 2 else _in_worker_processes
    with progress(total, "teacher text embeddings", "text", initial=total - sum(
            len(texts) for _, _, texts in todo)) as bar:
        for role, index, values in compute(request.teacher.model, settings, todo, devices):
            manifest["parts"][role] = sorted([*manifest["parts"][role], index])
            yield TeacherTextEmbeddingsPart(copy.deepcopy(manifest), role, index, values)
            bar.update(len(values))
    manifest["complete"] = True
    logger.info("teacher text embeddings: %s rows computed (%s, cache key %s)",
                manifest["rows"], request.dtype, key)
    yield TeacherTextEmbeddingsPart(manifest)


@dataclass(frozen=True)
class _Settings:
    """What a worker needs besides the teacher's weights and its texts (picklable)."""

    spec: dict[str, Any]  # the teacher's ModelSpec
    teacher_input: str
    window_overlap: int
    max_windows: int
    dtype: str
    autocast: str | None

    def tokenizer(self):
        from tulip_pipelines.models import get_tokenizer

        return get_tokenizer(self.spec["model_name"], self.spec["context_length"])


Todo = list[tuple[str, int, list[str]]]


def _in_this_process(teacher: torch.nn.Module, settings: _Settings, todo: Todo,
                     devices: list[torch.device]) -> Iterator[tuple[str, int, torch.Tensor]]:
    device, tokenizer = devices[0], settings.tokenizer()
    teacher.eval()
    with on_device(teacher, device), inference_autocast(device, settings.autocast):
        for role, index, texts in todo:
            values = teacher_text_embeddings_of(teacher, tokenizer, texts, settings.teacher_input,
                                 settings.window_overlap, settings.max_windows)
            yield role, index, values.to(DTYPES[settings.dtype])


def _in_worker_processes(teacher: torch.nn.Module, settings: _Settings, todo: Todo,
                         devices: list[torch.device]) -> Iterator[tuple[str, int, torch.Tensor]]:
    """One spawned process per device, each with every n-th part; results as they come."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_worker, daemon=True,
                               args=(teacher.state_dict(), settings, todo[rank::len(devices)],
                                     str(device), results))
               for rank, device in enumerate(devices)]
    for worker in workers:
        worker.start()
    try:
        received = 0
        while received < len(todo):
            try:
                message = results.get(timeout=10)
            except queue.Empty:  # a worker killed from outside (out of memory) says nothing
                dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a teacher text embeddings worker died (exit code "
                                       f"{dead[0]}); the parts written so far are kept and a "
                                       f"rerun resumes") from None
                continue
            received += 1
            if message[0] == "error":
                raise RuntimeError(f"a teacher text embeddings worker failed:\n{message[1]}")
            _, role, index, values = message
            yield role, index, torch.from_numpy(values)
        for worker in workers:
            worker.join()
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()


def _worker(state: dict[str, torch.Tensor], settings: _Settings, todo: Todo, device: str,
            results) -> None:
    """A worker process: the teacher rebuilt from its weights on ``device``, its parts back."""
    import traceback

    try:
        from tulip_pipelines.models import ModelSpec, build_architecture

        torch.set_num_threads(max(1, torch.get_num_threads() // 2))
        teacher = build_architecture(ModelSpec.from_dict(settings.spec))
        teacher.load_state_dict(state)
        for role, index, values in _in_this_process(teacher, settings, todo,
                                                    [torch.device(device)]):
            # as a numpy array: copied through the pipe (a tensor would be shared through a file
            # descriptor that dies with this process, which may end before the parent reads it)
            results.put(("part", role, index, values.numpy()))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        results.put(("error", traceback.format_exc()))


def write_part(part: TeacherTextEmbeddingsPart, folder: str | Path) -> None:
    """Store one :class:`TeacherTextEmbeddingsPart`: the part's values under a temporary name
    renamed into place, then the manifest that records it (so a killed write resumes after the
    last part)."""
    folder = Path(folder)
    if part.reset:
        _reset(folder)
    if part.values is not None:
        path = folder / f"{part.role}-{part.chunk:05d}.safetensors"
        with atomic.atomic_path(path) as tmp:
            save_file({"embeddings": part.values.contiguous()}, str(tmp))
    _write_manifest(folder, part.manifest)


@torch.no_grad()
def teacher_text_embeddings_of(teacher: torch.nn.Module, tokenizer, texts: list[str],
                teacher_input: str = "tokens", window_overlap: int = 20,
                max_windows: int = 5) -> torch.Tensor:
    """The teacher's embeddings of ``texts`` (float32, CPU), exactly as the live distillation
    computes them (:func:`tulip_pipelines.training.tasks.teacher_text_embedding`), on the
    teacher's device."""
    if teacher_input == "windows":
        windows, mask = window_tokens(texts, tokenizer, window_overlap, max_windows)
        batch = {"windows": windows, "window_mask": mask}
    else:
        batch = {"teacher_long": tokenizer(texts)}
    device = next(teacher.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    return teacher_text_embedding(teacher, batch, teacher_input).float().cpu()


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
                  for i in _parts_done(self._manifest)[role]]
        values = torch.cat(chunks)
        if len(values) != self.rows[role]:
            raise RuntimeError(f"teacher text embeddings in {self.folder}: {len(values)} {role} "
                               f"rows, the manifest says {self.rows[role]}")
        return values


class WithTeacherTextEmbeddings(Dataset):
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
    atomic.write_text(folder / MANIFEST, json.dumps(manifest, indent=2))


def _reset(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
