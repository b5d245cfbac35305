"""Image preparation: every training and validation image decoded once, resized and written
into WebDataset tar shards with a ``wids`` index, for fast indexed reads (no Kedro).

Decisions:
    * input order: the validation records, then the training records (so that capping the
      training set keeps every earlier shard); shard ``k`` holds positions
      ``[k * shard_size, (k + 1) * shard_size)`` minus the images left out;
    * parallel: a process pool, each worker writes whole shards (``data/shards.py``); at most
      two shards per worker are in flight, so memory stays bounded whatever the dataset size;
    * restartable: a shard is written under a temporary name and renamed when complete; a
      rerun skips every complete shard whose inputs and encoding match (a cache key) and
      rewrites the others;
    * across nodes: with ``num_nodes > 1`` node ``node_rank`` writes the shards ``k`` with
      ``k % num_nodes == node_rank`` into the shared folder; a last run with ``num_nodes: 1``
      skips them all and writes the index;
    * an image that cannot be read goes to the ``rejected_images`` table with its reason and is
      left out of the shards; records in = written + rejected, checked at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tulip_pipelines import atomic
from tulip_pipelines.data.images import (
    INDEX_FILE,
    RECORDS_FILE,
    FolderImages,
    ImageSource,
    PreparedImages,
)
from tulip_pipelines.data.shards import (
    PARTIAL,
    Encoding,
    ShardResult,
    ShardTask,
    complete_shard,
    shard_path,
    write_shard,
)
from tulip_pipelines.params import Params, Problems, is_int
from tulip_pipelines.progress import progress

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUBSAMPLINGS = ("4:4:4", "4:2:2", "4:2:0")
REJECTED_COLUMNS = ["split", "index", "id", "image", "reason", "detail"]


class CountMismatchError(RuntimeError):
    """Records in differ from images written plus images rejected."""


@dataclass(frozen=True)
class PrepareImagesParams(Params):
    """``params:prepare_images``.

    Attributes:
        enabled: false skips the preparation: training and evaluation read the original files.
        output_dir: folder of the shards, ``index.json`` and ``records.parquet``.
        size: shortest side in pixels; ``None``: the teacher's image input size
            (``params:teacher_model_name``), the largest of the configured models.
        quality, subsampling: JPEG quality (1-100) and chroma subsampling.
        shard_size: records per shard.
        num_workers: writer processes; ``None``: one per CPU core; 0: in this process.
        num_nodes, node_rank: this node's share of the shards (see the module docstring).
        draft_decoding: JPEGs decoded in draft mode at the smallest DCT scale that covers the
            size (fast); false decodes every pixel and resizes as the originals do. It applies
            to the shards and, with ``enabled: false``, to training's reads of the original files.
    """

    section = "prepare_images"

    enabled: bool = True
    output_dir: str = "data/05_model_input/prepared_images"
    size: int | None = None
    quality: int = 95
    subsampling: str = "4:4:4"
    shard_size: int = 5000
    num_workers: int | None = None
    num_nodes: int = 1
    node_rank: int = 0
    draft_decoding: bool = True

    def __post_init__(self) -> None:
        p = Problems(self.section)
        p.boolean("enabled", self.enabled)
        p.boolean("draft_decoding", self.draft_decoding)
        p.check(isinstance(self.output_dir, str) and bool(self.output_dir), "output_dir",
                f"must be a non-empty path, got {self.output_dir!r}")
        p.int_at_least("size", self.size, 1, optional=True)
        p.check(is_int(self.quality, 1) and self.quality <= 100, "quality",
                f"must be an integer in 1..100, got {self.quality!r}")
        p.one_of("subsampling", self.subsampling, SUBSAMPLINGS)
        p.int_at_least("shard_size", self.shard_size, 1)
        p.int_at_least("num_workers", self.num_workers, 0, optional=True)
        p.int_at_least("num_nodes", self.num_nodes, 1)
        p.check(is_int(self.node_rank, 0) and is_int(self.num_nodes, 1)
                and self.node_rank < self.num_nodes, "node_rank",
                f"must be in 0..num_nodes-1, got {self.node_rank!r}")
        p.raise_if_any()

    def check_with(self, all_params: Mapping[str, Any]) -> None:
        if self.enabled and self.size is None and not all_params.get("teacher_model_name"):
            raise ValueError("size is null and params:teacher_model_name (parameters.yml) is "
                             "unset: set one of them")

    def encoding(self, teacher_model_name: str | None) -> Encoding:
        """The encoding, ``size`` resolved from the teacher's open_clip config when unset."""
        size = self.size
        if size is None:
            if not teacher_model_name:
                raise ValueError("prepare_images.size is null and params:teacher_model_name is "
                                 "unset: set one of them")
            from tulip_pipelines.models.configs import image_input_size

            size = image_input_size(teacher_model_name)
        return Encoding(size, self.quality, self.subsampling, self.draft_decoding)


@dataclass
class Preparation:
    """What :func:`prepare_images` returns: the source to read and the rejected images."""

    source: ImageSource
    rejected: pd.DataFrame


def input_records(train: pd.DataFrame, val: pd.DataFrame) -> pd.DataFrame:
    """The input order: validation then training records (``split``, ``index``, ``id``,
    ``image``); duplicate ids are an error (a record id names one image)."""
    parts = []
    for split, frame in (("val", val), ("train", train)):
        missing = {"id", "image"} - set(frame.columns)
        if missing:
            raise ValueError(f"{split}_captions lacks column(s) {sorted(missing)}")
        parts.append(pd.DataFrame({"split": split, "index": np.arange(len(frame)),
                                   "id": frame["id"].astype(str).to_numpy(),
                                   "image": frame["image"].astype(str).to_numpy()}))
    records = pd.concat(parts, ignore_index=True)
    duplicated = records["id"].duplicated(keep=False)
    if duplicated.any():
        first = records.loc[duplicated, "id"].iloc[0]
        raise ValueError(f"record id {first!r} appears {int((records['id'] == first).sum())} "
                         "times in train_captions + val_captions; ids must be unique")
    return records


def _cache_key(encoding: Encoding, ids: list[str], images: list[str]) -> str:
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, encoding.to_dict()]).encode())
    for record_id, image in zip(ids, images):
        digest.update(f"{record_id}\0{image}\n".encode())
    return digest.hexdigest()[:16]


def plan_shards(records: pd.DataFrame, root: str | os.PathLike, folder: Path, encoding: Encoding,
                shard_size: int) -> Iterator[ShardTask]:
    """One task per shard, in order."""
    ids, images = records["id"].tolist(), records["image"].tolist()
    for number, start in enumerate(range(0, len(records), shard_size)):
        part_ids, part_images = ids[start:start + shard_size], images[start:start + shard_size]
        yield ShardTask(number, start, part_ids, part_images, str(root), str(folder), encoding,
                        _cache_key(encoding, part_ids, part_images))


def _remove_leftovers(folder: Path, n_shards: int, params: PrepareImagesParams) -> None:
    """This node's temporary files of an interrupted run, and shards beyond the current count
    (another node's files in progress are left alone)."""
    for path in folder.glob("images-*"):
        number = path.name.split(".")[0].removeprefix("images-")
        if not number.isdigit():
            continue
        mine = int(number) % params.num_nodes == params.node_rank
        if int(number) >= n_shards or (mine and path.name.endswith(PARTIAL)):
            path.unlink(missing_ok=True)


def _run_tasks(tasks: list[ShardTask], num_workers: int) -> Iterator[ShardResult]:
    """Results of ``tasks`` as they complete: in this process (0 workers) or in a pool that
    holds at most two tasks per worker in flight."""
    if num_workers == 0:
        yield from (write_shard(task) for task in tasks)
        return
    # Workers fork from a fresh server process that has imported only the writer's module, not
    # from this (threaded, torch-laden) process.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tulip_pipelines.data.shards"])
    pending = iter(tasks)
    with ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        running: set[Future] = set()
        while True:
            while len(running) < 2 * num_workers and (task := next(pending, None)) is not None:
                running.add(pool.submit(write_shard, task))
            if not running:
                return
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()


def prepare_images(train: pd.DataFrame, val: pd.DataFrame, image_root: str | os.PathLike,
                   params: PrepareImagesParams, encoding: Encoding | None) -> Preparation:
    """Prepare the images of ``train`` and ``val`` (see the module docstring)."""
    if not params.enabled:
        logger.info("prepare_images is off: reading the original files under %s", image_root)
        return Preparation(FolderImages(image_root, draft=params.draft_decoding),
                           pd.DataFrame(columns=REJECTED_COLUMNS))
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a directory (image_root, "
                                "parameters.yml)")
    records = input_records(train, val)
    out = Path(params.output_dir)
    folder = out / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    tasks = list(plan_shards(records, root, folder, encoding, params.shard_size))
    _remove_leftovers(folder, len(tasks), params)
    results: dict[int, ShardResult] = {}
    todo = []
    for task in tasks:
        done = complete_shard(task)
        if done is not None:
            results[task.number] = done
        elif task.number % params.num_nodes == params.node_rank:
            todo.append(task)
    workers = (os.cpu_count() or 1) if params.num_workers is None else params.num_workers
    workers = min(workers, len(todo))
    logger.info("prepare_images: %d records in %d shards of %d under %s (shortest side %d px, "
                "JPEG quality %d); %d complete from an earlier run, %d to write with %d "
                "process(es)", len(records), len(tasks), params.shard_size, out, encoding.size,
                encoding.quality, len(results), len(todo), max(workers, 1))
    with progress(len(todo), "prepare_images", "shard") as bar:
        for result in _run_tasks(todo, workers):
            results[result.number] = result
            bar.update(1)
    missing = [t.number for t in tasks if t.number not in results]
    info = {"size": encoding.size, "quality": encoding.quality,
            "subsampling": encoding.subsampling, "n_shards": len(tasks)}
    rejected = rejected_table(records, results)
    if missing:
        logger.warning("prepare_images: node %d of %d wrote its shards; %d shard(s) of other "
                       "nodes are not complete yet (e.g. %s). Once every node has finished, run "
                       "prepare_images once with num_nodes: 1 to write the index.",
                       params.node_rank, params.num_nodes, len(missing),
                       shard_path(folder, missing[0], ".tar"))
        return Preparation(PreparedImages(out, {**info, "complete": False}), rejected)
    n_samples = write_index(out, records, [results[t.number] for t in tasks])
    reconcile(len(records), n_samples, rejected)
    info.update(complete=True, n_records=len(records), n_samples=n_samples,
                n_rejected=len(rejected))
    return Preparation(PreparedImages(out, info), rejected)


def rejected_table(records: pd.DataFrame, results: dict[int, ShardResult]) -> pd.DataFrame:
    """The ``rejected_images`` rows of the complete shards, in input order."""
    rows = [(position, reason, detail) for result in results.values()
            for position, reason, detail in result.rejected]
    rows.sort()
    positions = [r[0] for r in rows]
    table = records.iloc[positions][["split", "index", "id", "image"]].reset_index(drop=True)
    table["reason"] = [r[1] for r in rows]
    table["detail"] = [r[2] for r in rows]
    return table.astype({"index": "int64"})[REJECTED_COLUMNS]


def write_index(out: Path, records: pd.DataFrame, results: list[ShardResult]) -> int:
    """``index.json`` (wids: shards with at least one sample, in order) and ``records.parquet``
    (``position``, ``sample``: the number in the index's order, -1 if left out, ``reason``);
    returns the number of samples."""
    sample = np.full(len(records), -1, dtype=np.int64)
    reason = np.full(len(records), None, dtype=object)
    shardlist, n = [], 0
    for result in results:
        for position, why, _ in result.rejected:
            reason[position] = why
        if not result.nsamples:
            continue
        sample[result.kept] = np.arange(n, n + result.nsamples)
        n += result.nsamples
        shardlist.append({"url": f"shards/{shard_path('', result.number, '.tar')}",
                          "nsamples": result.nsamples, "filesize": result.filesize})
    table = records.assign(position=np.arange(len(records)), sample=sample, reason=reason)
    with atomic.atomic_path(out / RECORDS_FILE) as tmp:
        table.to_parquet(tmp, index=False)
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "prepared_images",
             "shardlist": shardlist}
    atomic.write_text(out / INDEX_FILE, json.dumps(index, indent=1))
    return n


def reconcile(n_in: int, n_written: int, rejected: pd.DataFrame) -> None:
    """Records in = images written + images rejected, or :class:`CountMismatchError`."""
    if n_in != n_written + len(rejected):
        raise CountMismatchError(f"prepare_images: {n_in} records in, but {n_written} written + "
                                 f"{len(rejected)} rejected")
    counts = dict(sorted(Counter(rejected["reason"]).items()))
    logger.info("prepare_images: %d records in = %d written + %d rejected %s", n_in, n_written,
                len(rejected), counts or "")
