"""The image embeddings of a folder, computed once per image tower: a Parquet file in the
folder's ``.tulip_cache/``, named after the model's image tower (a hash of its weights and
preprocessing, :func:`tulip_pipelines.evaluation.encode.image_tower_key`, and the autocast
dtype on an accelerator), with a row per file
(its path relative to the folder, size, modification time, and its embedding or why it could
not be read). A file that is new or changed (size or modification time) is encoded again, the
rows of files gone are dropped; a file that is not an image is skipped, recorded and counted."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tulip_pipelines import atomic
from tulip_pipelines.evaluation.encode import encode_images, image_tower_key
from tulip_pipelines.models.device import autocast_in_effect
from tulip_pipelines.models.spec import ModelBundle

logger = logging.getLogger(__name__)

CACHE_DIR = ".tulip_cache"
COLUMNS = ["path", "size", "mtime_ns", "embedding", "error"]


@dataclass
class FolderEmbeddings:
    """The readable images of a folder (paths relative to it, sorted) and their L2-normalised
    features [n, d]; ``skipped``: path -> why it is not an image; ``encoded``/``cached``: how
    many images this call encoded / took from the cache (skipped files are neither)."""

    folder: Path
    paths: list[str]
    features: torch.Tensor
    skipped: dict[str, str] = field(default_factory=dict)
    encoded: int = 0
    cached: int = 0

    def summary(self) -> str:
        files = len(self.paths) + len(self.skipped)
        return (f"{files} files in {self.folder}: {len(self.paths)} images, "
                f"{len(self.skipped)} skipped (not images); {self.encoded} encoded now, "
                f"{self.cached} from the cache")


def folder_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (recursively; hidden files and folders left out), as paths
    relative to it, sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith("."):
                out.append(Path(root, name).relative_to(folder).as_posix())
    return sorted(out)


def cache_path(folder: Path, bundle: ModelBundle, autocast: str | None) -> Path:
    """The cache file of ``bundle``'s image tower, with the autocast dtype in effect (float32
    and bfloat16 features are not mixed)."""
    name = image_tower_key(bundle)[:32] + (f"-{autocast}" if autocast else "")
    return Path(folder) / CACHE_DIR / f"{name}.parquet"


def _read_cache(path: Path) -> dict[str, tuple]:
    if not path.is_file():
        return {}
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - a damaged cache is rebuilt, never an error
        logger.warning("image embeddings cache %s unreadable (%s): rebuilt", path, err)
        return {}
    return {row.path: (int(row.size), int(row.mtime_ns), row.embedding,
                       row.error if isinstance(row.error, str) else None)  # NaN: no error
            for row in frame.itertuples()}


def _write_cache(path: Path, rows: list[tuple]) -> None:
    frame = pd.DataFrame(rows, columns=COLUMNS)
    with atomic.atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def folder_embeddings(bundle: ModelBundle, folder: str | Path, batch_size: int = 64,
                      num_workers: int = 0, device: torch.device | None = None,
                      autocast: str | None = None) -> FolderEmbeddings:
    """The embeddings of every image under ``folder`` with ``bundle``'s image tower: from the
    cache where a file is unchanged, encoded (with a progress bar) where it is new or changed;
    the cache is rewritten when anything was encoded or removed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}")
    in_effect = autocast_in_effect(device or next(bundle.model.parameters()).device, autocast)
    path = cache_path(folder, bundle, in_effect)
    old = _read_cache(path)
    files = folder_files(folder)
    stats = {}
    for name in files:
        stat = (folder / name).stat()
        stats[name] = (stat.st_size, stat.st_mtime_ns)
    todo = [name for name in files
            if name not in old or old[name][:2] != stats[name]]
    fresh: dict[str, tuple] = {}
    if todo:
        unreadable: dict[int, str] = {}
        try:
            features = encode_images(bundle, [folder / name for name in todo], batch_size,
                                     num_workers, desc="images", unreadable=unreadable,
                                     device=device, autocast=autocast)
        except RuntimeError:
            if len(unreadable) != len(todo):
                raise
            features = None
        for i, name in enumerate(todo):
            error = unreadable.get(i)
            embedding = None if error is not None else features[i].numpy().astype(np.float32)
            fresh[name] = (*stats[name], embedding, error)
    rows = [(name, *(fresh[name] if name in fresh else old[name])) for name in files]
    if todo or set(old) - set(files) or not path.is_file():
        _write_cache(path, rows)
    paths = [name for name, *_, embedding, error in rows if error is None]
    vectors = [np.asarray(embedding, dtype=np.float32)
               for name, *_, embedding, error in rows if error is None]
    width = len(vectors[0]) if vectors else 0
    features = torch.from_numpy(np.stack(vectors)) if vectors else torch.zeros(0, width)
    skipped = {name: error for name, *_, error in rows if error is not None}
    # only images count as encoded or cached: a file that is not one is skipped, whenever met
    return FolderEmbeddings(folder, paths, features, skipped,
                            encoded=sum(1 for name in todo if name not in skipped),
                            cached=sum(1 for name in files if name not in fresh
                                       and name not in skipped))
