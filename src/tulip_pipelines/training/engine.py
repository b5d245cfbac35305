"""The training engine shared by every training pipeline: DeepSpeed + AdamW + warmup/cosine, a
resumable data order, periodic validation, and checkpoints that are only trusted once complete.

A *task* is an ``nn.Module`` whose ``forward(batch)`` returns a dict with a scalar ``"loss"`` and
optionally more scalars (logged as ``train/<name>``). Only its parameters with ``requires_grad``
are optimised; whatever it keeps outside its registered submodules (a frozen teacher) is neither
optimised nor checkpointed.

Checkpoints live under ``<output_dir>/checkpoints/step_XXXXXXXX/`` in DeepSpeed's own layout. A
tag counts only once rank 0 has written ``COMPLETE`` (JSON: step, fingerprint) after every rank
finished writing; the training history up to that step is stored beside it in ``history.json``.
A rerun resumes from the newest complete tag whose fingerprint matches; a mismatch (other
parameters, data or model) moves the old checkpoints aside and starts fresh.

Distributed: one process initialises a gloo (CPU) or nccl (GPU) group of size one by itself;
under a launcher (``deepspeed``/``torchrun``, see ``launch.py``) the launcher's environment is used.
Only ZeRO stages 0-2 are supported (they keep full parameters on every rank, so the task's modules
hold the trained weights afterwards, in float32 on the CPU).

Batches: tensors (also inside dicts/lists/tuples) are moved to the engine's device, floating-point
ones cast to bf16 when ``bf16.enabled``; a frozen fp32 teacher kept outside the task's modules must
cast its inputs itself (and, on a GPU, be moved there by the task).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from tqdm.auto import tqdm

from tulip_pipelines.params import known_params
from tulip_pipelines.training.schedule import lr_lambda, warmup_cosine

logger = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]
COMPLETE_MARKER = "COMPLETE"
HISTORY_FILE = "history.json"
_TAG_RE = re.compile(r"^step_(\d{8})$")
# DeepSpeed keys that only change what is printed, not what is trained (left out of fingerprints)
_DS_LOGGING_KEYS = ("steps_per_print", "wall_clock_breakdown", "dump_state", "flops_profiler")


@dataclass
class TrainConfig:
    """What one training run does (built from ``params:<pipeline>`` by the nodes).

    Steps are optimizer steps (after gradient accumulation); ``batch_size`` is the micro batch of
    one process. ``val_every``/``checkpoint_every`` of 0 mean "only at the end".
    """

    run_name: str
    output_dir: str
    max_steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    log_every: int = 10
    val_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    num_workers: int = 0
    seed: int = 0
    resume: bool = True

    def __post_init__(self) -> None:
        problems = []
        try:
            self.betas = tuple(float(b) for b in self.betas)  # YAML gives a list
            valid_betas = len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas)
        except (TypeError, ValueError):
            valid_betas = False
        if not valid_betas:
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.run_name:
            problems.append("run_name must be a non-empty string")
        if not self.output_dir:
            problems.append("output_dir must be a non-empty path")
        for name in ("max_steps", "batch_size", "log_every", "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "val_every", "checkpoint_every", "num_workers", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            problems.append(f"lr must be a number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            problems.append(f"eps must be a number > 0, got {self.eps!r}")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0 <= self.min_lr_ratio <= 1):
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if isinstance(self.max_steps, int) and isinstance(self.warmup_steps, int):
            if self.warmup_steps > self.max_steps:
                problems.append(
                    f"warmup_steps ({self.warmup_steps}) must not exceed max_steps "
                    f"({self.max_steps})"
                )
        if not isinstance(self.resume, bool):
            problems.append(f"resume must be true or false, got {self.resume!r}")
        if problems:
            raise ValueError(f"TrainConfig for run {self.run_name!r}: " + "; ".join(problems))

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "TrainConfig":
        """Build from a parameters dict; unknown keys are an error that names them."""
        return cls(**known_params(cls, params, "TrainConfig key"))

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that change the trained weights (not where/how often things are written)."""
        ignored = {"output_dir", "log_every", "val_every", "checkpoint_every",
                   "keep_checkpoints", "num_workers", "resume"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}


@dataclass
class TrainResult:
    """What ``train`` returns; ``history`` has one row per logged step (resumed runs included)."""

    history: pd.DataFrame
    final_step: int
    resumed_from: int | None
    checkpoint_dir: str
    wall_time_s: float
    final_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _DataPosition:
    """Where the data order stands: epoch and micro batches already consumed in it."""

    epoch: int = 0
    offset: int = 0


class _ResumableSampler(Sampler[int]):
    """DistributedSampler (epoch-seeded shuffle, drop_last) that can skip a consumed prefix."""

    def __init__(self, dataset: Dataset, world_size: int, rank: int, seed: int, batch_size: int):
        self.base = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.skip_batches = 0

    def start(self, position: _DataPosition) -> None:
        self.base.set_epoch(position.epoch)
        self.skip_batches = position.offset

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip_batches * self.batch_size, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip_batches * self.batch_size)


def train(
    task: torch.nn.Module,
    train_dataset: Dataset,
    cfg: TrainConfig,
    ds_config: Mapping[str, Any],
    *,
    collate_fn: Callable | None = None,
    val_dataset: Dataset | None = None,
    log_fn: LogFn | None = None,
    fingerprint: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``task`` with DeepSpeed until ``cfg.max_steps`` optimizer steps, resuming if possible.

    ``log_fn(metrics, step)`` is called on rank 0 with ``train/loss``, ``train/lr``,
    ``train/samples_per_s``, ``train/<task scalar>`` and ``val/<name>`` keys. ``fingerprint``
    describes what else determines the run (model spec, data identity); it is hashed with the
    config, the DeepSpeed config, the world size and the dataset size to decide whether existing
    checkpoints belong to this run.
    """
    started = time.perf_counter()
    _init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    ds_config = prepare_ds_config(ds_config, cfg, world_size)
    ckpt_root = Path(cfg.output_dir) / "checkpoints"
    run_hash = config_fingerprint(cfg, ds_config, world_size, len(train_dataset), fingerprint)
    sampler = _ResumableSampler(train_dataset, world_size, rank, cfg.seed, cfg.batch_size)
    if len(sampler.base) < cfg.batch_size:
        raise ValueError(
            f"run {cfg.run_name!r}: {len(train_dataset)} training samples cannot fill one batch of "
            f"{cfg.batch_size} on each of {world_size} process(es)"
        )

    frozen_originals = {n: p.data for n, p in task.named_parameters() if not p.requires_grad}
    shapes = {n: p.shape for n, p in task.named_parameters()}
    engine = initialize_engine(task, cfg, ds_config)
    resume_tag = _select_resume_tag(ckpt_root, run_hash, cfg, rank)
    position, history, start_step = _DataPosition(), [], 0
    if resume_tag is not None:
        _, client_state = engine.load_checkpoint(str(ckpt_root), tag=resume_tag)
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_root / resume_tag}")
        start_step = int(client_state["step"])
        position = _DataPosition(int(client_state["epoch"]), int(client_state["batch_offset"]))
        history = json.loads((ckpt_root / resume_tag / HISTORY_FILE).read_text())
        logger.info("%s: resumed from %s (step %d of %d)", cfg.run_name, resume_tag, start_step,
                    cfg.max_steps)
    torch.manual_seed(hash((cfg.seed, rank, start_step)) & 0xFFFF_FFFF)

    loader = DataLoader(
        train_dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
        collate_fn=collate_fn, num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
    )
    loop = _Loop(engine, cfg, world_size, rank, val_dataset, collate_fn, log_fn, ckpt_root,
                 run_hash, history)
    loop.run(loader, sampler, position, start_step)
    _export_fp32_weights(engine, task, frozen_originals, shapes)
    history_df = pd.DataFrame(loop.history)
    result = TrainResult(
        history=history_df,
        final_step=loop.step,
        resumed_from=start_step if resume_tag is not None else None,
        checkpoint_dir=str(ckpt_root / _tag(loop.step)),
        wall_time_s=time.perf_counter() - started,
        final_metrics=_final_metrics(history_df),
    )
    logger.info("%s: finished at step %d in %.1f s; %s", cfg.run_name, result.final_step,
                result.wall_time_s, result.final_metrics)
    return result


def initialize_engine(task: torch.nn.Module, cfg: TrainConfig, ds_config: Mapping[str, Any]):
    """AdamW (open_clip's weight-decay rule) over the task's trainable parameters, the
    warmup/cosine LambdaLR, and ``deepspeed.initialize`` (joining or starting the process group).
    Returns the DeepSpeed engine; ``engine(batch)``, ``engine.backward``, ``engine.step``.
    0-dim parameters are reshaped to ``[1]`` (DeepSpeed's initial broadcast views every
    parameter as bytes, which fails for 0-dim tensors); ``train`` restores their shape."""
    import deepspeed

    _init_distributed()
    ds_config = prepare_ds_config(ds_config, cfg, dist.get_world_size())
    for param in task.parameters():
        if param.ndim == 0:  # DeepSpeed 0.19.8 cannot broadcast 0-dim parameters (logit_scale)
            param.data = param.data.reshape(1)
    trainable = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"run {cfg.run_name!r}: the task has no parameter with requires_grad=True")
    optimizer = torch.optim.AdamW(
        _param_groups(trainable, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps
    )
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=task, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine


def compute_dtype(engine) -> torch.dtype:
    """The dtype floating-point batch tensors are cast to for this engine."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def _export_fp32_weights(engine, task: torch.nn.Module,
                         frozen_originals: Mapping[str, torch.Tensor],
                         shapes: Mapping[str, torch.Size]) -> None:
    """Leave the task's modules on the CPU in float32 and their original shapes: trainable
    parameters from the optimizer's fp32 master copy (a collective under ZeRO: every rank calls
    it), frozen ones as they were before DeepSpeed cast them; then release the engine."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = _fp16_optimizer_masters(engine.optimizer)
    for param in task.parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)
        full = masters.get(id(param)) if full is None else full
        if full is not None:
            param.data = full.detach().to("cpu", torch.float32).clone()
    task.to(device="cpu", dtype=torch.float32)
    for name, param in task.named_parameters():
        if name in frozen_originals:
            param.data = frozen_originals[name]
        elif param.shape != shapes[name]:
            param.data = param.data.reshape(shapes[name])
    engine.destroy()


class _Loop:
    """The optimisation loop with its logging, validation and checkpoint bookkeeping."""

    def __init__(self, engine, cfg: TrainConfig, world_size: int, rank: int,
                 val_dataset: Dataset | None, collate_fn: Callable | None, log_fn: LogFn | None,
                 ckpt_root: Path, run_hash: str, history: list[dict[str, float]]):
        self.engine, self.cfg = engine, cfg
        self.gas, self.compute_dtype = engine.gradient_accumulation_steps(), compute_dtype(engine)
        self.world_size, self.rank = world_size, rank
        self.val_dataset, self.collate_fn, self.log_fn = val_dataset, collate_fn, log_fn
        self.ckpt_root, self.run_hash, self.history = ckpt_root, run_hash, history
        self.step = 0
        self._window: dict[str, float] = {}
        self._window_micro = 0
        self._window_start = time.perf_counter()

    def run(self, loader: DataLoader, sampler: _ResumableSampler, position: _DataPosition,
            start_step: int) -> None:
        cfg, self.step = self.cfg, start_step
        if self.step >= cfg.max_steps:
            logger.info("%s: already at step %d of %d, nothing to train", cfg.run_name,
                        self.step, cfg.max_steps)
            return
        self.engine.train()
        micro_in_step = 0
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=cfg.run_name, unit="step",
                   disable=self.rank != 0)
        self._window_start = time.perf_counter()
        while self.step < cfg.max_steps:
            sampler.start(position)
            for batch in loader:
                self._micro_step(batch)
                position.offset += 1
                micro_in_step += 1
                if micro_in_step < self.gas:
                    continue
                micro_in_step = 0
                self.step += 1
                bar.update(1)
                self._after_step(position, bar)
                if self.step >= cfg.max_steps:
                    break
            else:
                position = _DataPosition(position.epoch + 1, 0)
        bar.close()

    def _micro_step(self, batch: Any) -> None:
        out = self.engine(to_device(batch, self.engine.device, self.compute_dtype))
        if "loss" not in out:
            raise KeyError(f"run {self.cfg.run_name!r}: task.forward must return a 'loss' entry, "
                           f"got keys {sorted(out)}")
        self.engine.backward(out["loss"])
        self.engine.step()
        for key, value in out.items():
            self._window[key] = self._window.get(key, 0.0) + _scalar(value)
        self._window_micro += 1

    def _after_step(self, position: _DataPosition, bar: tqdm) -> None:
        cfg, step = self.cfg, self.step
        last = step == cfg.max_steps
        validate = self.val_dataset is not None and (
            last or (cfg.val_every > 0 and step % cfg.val_every == 0))
        if last or validate or step % cfg.log_every == 0:
            self._log_row(validate, bar)
        if last or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0):
            self._save(position)

    def _log_row(self, validate: bool, bar: tqdm) -> None:
        """Close the metrics window (validating if asked) into a history row and report it."""
        row = self._close_window()
        if validate:
            row.update({f"val_{k}": v for k, v in self._validate().items()})
        self.history.append(row)
        if self.rank == 0:
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            logger.info("%s step %d/%d: %s", self.cfg.run_name, self.step, self.cfg.max_steps,
                        ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
            if self.log_fn is not None:
                self.log_fn(row_to_metrics(row), self.step)

    def _close_window(self) -> dict[str, float]:
        """Mean of the task's scalars since the last row (over all ranks), lr and throughput."""
        keys = sorted(self._window)
        totals = torch.tensor([self._window[k] for k in keys] + [self._window_micro],
                              dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(totals)
        elapsed = time.perf_counter() - self._window_start
        n_micro = totals[-1].item()
        row = {"step": self.step}
        row.update({k: totals[i].item() / n_micro for i, k in enumerate(keys)})
        row["lr"] = self.cfg.lr * lr_lambda(self.step - 1, self.cfg.warmup_steps,
                                            self.cfg.max_steps, self.cfg.min_lr_ratio)
        row["samples_per_s"] = n_micro * self.cfg.batch_size / max(elapsed, 1e-9)
        self._window, self._window_micro = {}, 0
        self._window_start = time.perf_counter()
        return row

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        """Batch-size-weighted means of the task's scalars over the validation set (sharded)."""
        started = time.perf_counter()
        shard = Subset(self.val_dataset, range(self.rank, len(self.val_dataset), self.world_size))
        loader = DataLoader(shard, batch_size=self.cfg.batch_size, shuffle=False,
                            collate_fn=self.collate_fn, num_workers=self.cfg.num_workers)
        sums: dict[str, float] = {}
        count = 0
        self.engine.eval()
        for batch in loader:
            size = _batch_size(batch)
            out = self.engine(to_device(batch, self.engine.device, self.compute_dtype))
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + _scalar(value) * size
            count += size
        self.engine.train()
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(totals)
        if totals[-1].item() == 0:
            raise ValueError(f"run {self.cfg.run_name!r}: the validation set is empty")
        self._window_start += time.perf_counter() - started  # keep throughput about training
        return {k: totals[i].item() / totals[-1].item() for i, k in enumerate(keys)}

    def _save(self, position: _DataPosition) -> None:
        """DeepSpeed checkpoint, then (after every rank is done) history and the COMPLETE mark."""
        tag = _tag(self.step)
        client_state = {"step": self.step, "epoch": position.epoch,
                        "batch_offset": position.offset, "fingerprint": self.run_hash}
        self.engine.save_checkpoint(str(self.ckpt_root), tag=tag, client_state=client_state)
        dist.barrier()
        if self.rank == 0:
            tag_dir = self.ckpt_root / tag
            _atomic_write(tag_dir / HISTORY_FILE, json.dumps(self.history))
            _atomic_write(tag_dir / COMPLETE_MARKER,
                          json.dumps({"step": self.step, "fingerprint": self.run_hash}))
            _prune(self.ckpt_root, self.cfg.keep_checkpoints)
            logger.info("%s: checkpoint %s complete", self.cfg.run_name, tag_dir)
        dist.barrier()


def prepare_ds_config(ds_config: Mapping[str, Any], cfg: TrainConfig,
                      world_size: int) -> dict[str, Any]:
    """Copy of the DeepSpeed config with the micro batch filled in from ``cfg``; refuses what
    the engine does not support and anything that disagrees with ``cfg``."""
    out = copy.deepcopy(dict(ds_config))
    where = "DeepSpeed config (params:deepspeed, conf/*/parameters_deepspeed.yml)"
    for key in ("optimizer", "scheduler"):
        if key in out:
            raise ValueError(f"{where}: remove '{key}'; the engine builds AdamW and the "
                             f"warmup/cosine schedule from the pipeline's parameters")
    if out.get("fp16", {}).get("enabled"):
        raise ValueError(f"{where}: fp16 is not supported by the engine; use bf16 or fp32")
    stage = out.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"{where}: zero_optimization.stage must be 0, 1 or 2, got {stage!r} "
                         f"(ZeRO-3 would shard the task's weights; not supported)")
    micro = out.setdefault("train_micro_batch_size_per_gpu", cfg.batch_size)
    if micro != cfg.batch_size:
        raise ValueError(f"{where}: train_micro_batch_size_per_gpu={micro} disagrees with the "
                         f"run's batch_size={cfg.batch_size}; leave it out (the engine fills it)")
    gas = out.setdefault("gradient_accumulation_steps", 1)
    if not isinstance(gas, int) or gas < 1:
        raise ValueError(f"{where}: gradient_accumulation_steps must be an integer >= 1, "
                         f"got {gas!r}")
    expected = cfg.batch_size * gas * world_size
    total = out.setdefault("train_batch_size", expected)
    if total != expected:
        raise ValueError(f"{where}: train_batch_size={total} but batch_size x "
                         f"gradient_accumulation_steps x processes = {cfg.batch_size} x {gas} x "
                         f"{world_size} = {expected}; leave train_batch_size out")
    out.setdefault("steps_per_print", 10**9)
    return out


def config_fingerprint(cfg: TrainConfig, ds_config: Mapping[str, Any], world_size: int,
                       n_train: int, extra: Mapping[str, Any] | None) -> str:
    """Short hash of everything that determines the trained weights."""
    payload = {
        "config": cfg.fingerprint_fields(),
        "deepspeed": {k: v for k, v in ds_config.items() if k not in _DS_LOGGING_KEYS},
        "world_size": world_size,
        "n_train": n_train,
        "extra": dict(extra or {}),
    }
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """``(step, tag, marker)`` of every complete checkpoint under ``ckpt_root``, oldest first.
    Tag directories without a readable ``COMPLETE`` marker (half written) are left out."""
    found = []
    if not ckpt_root.is_dir():
        return found
    for tag_dir in ckpt_root.iterdir():
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


def _select_resume_tag(ckpt_root: Path, run_hash: str, cfg: TrainConfig, rank: int) -> str | None:
    """The newest complete, matching tag; moves non-matching checkpoints aside (rank 0)."""
    complete = complete_checkpoints(ckpt_root)
    matching = [tag for _, tag, info in complete if info.get("fingerprint") == run_hash]
    reason = None
    if complete and not cfg.resume:
        reason = "resume is off"
    elif complete and not matching:
        reason = (f"their fingerprint {complete[-1][2].get('fingerprint')} differs from this "
                  f"run's {run_hash} (parameters, data or model changed)")
    dist.barrier()  # every rank has looked before anything moves
    if reason is not None:
        if rank == 0:
            aside = _unused_sibling(ckpt_root, f".old-{time.strftime('%Y%m%d-%H%M%S')}")
            logger.warning("%s: not resuming from %s because %s; moved them to %s",
                           cfg.run_name, ckpt_root, reason, aside)
            ckpt_root.rename(aside)
        dist.barrier()
        return None
    return matching[-1] if matching else None


def _unused_sibling(path: Path, suffix: str) -> Path:
    """``<path><suffix>-<n>`` with the smallest n that does not exist yet."""
    n = 0
    while (candidate := path.with_name(f"{path.name}{suffix}-{n}")).exists():
        n += 1
    return candidate


def _prune(ckpt_root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and stale partial tags."""
    complete = complete_checkpoints(ckpt_root)
    keep_tags = {tag for _, tag, _ in complete[-keep:]}
    for tag_dir in ckpt_root.iterdir():
        if _TAG_RE.match(tag_dir.name) and tag_dir.is_dir() and tag_dir.name not in keep_tags:
            shutil.rmtree(tag_dir)


def _init_distributed() -> None:
    """Join the launcher's process group, or start a one-process group on 127.0.0.1.

    The one-process group is set up through a tcp:// address rather than MASTER_* variables, so
    that nothing this process starts later (a launcher, a child run) inherits a stale rendezvous.
    """
    if dist.is_initialized():
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = "nccl" if get_accelerator().device_name() == "cuda" else "gloo"
    if "RANK" in os.environ:  # started by deepspeed/torchrun: env:// rendezvous
        deepspeed.init_distributed(dist_backend=backend)
        return
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeedEngine reads it
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fp16_optimizer_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """fp32 master weights by ``id(param)`` of DeepSpeed's FP16 optimizers (used for bf16 at
    ZeRO 0), whose params lack the ``_hp_mapping`` of ``safe_get_full_fp32_param``."""
    from torch._utils import _unflatten_dense_tensors

    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None:
        return {}
    if hasattr(optimizer, "fp32_groups_flat"):  # FP16_Optimizer (fused)
        fp32 = [_unflatten_dense_tensors(f, g) for f, g in zip(optimizer.fp32_groups_flat, groups)]
    else:  # FP16_UnfusedOptimizer
        fp32 = optimizer.fp32_groups
    return {id(p): m for group, masters in zip(groups, fp32) for p, m in zip(group, masters)}


def _param_groups(named: Sequence[tuple[str, torch.nn.Parameter]],
                  weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no weight decay on biases, norms and logit_scale (ndim < 2)."""
    no_decay = [p for n, p in named if p.ndim < 2 or "logit_scale" in n]
    decay = [p for n, p in named if not (p.ndim < 2 or "logit_scale" in n)]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def to_device(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move tensors (in dicts/lists/tuples) to ``device``; floating ones to the compute dtype."""
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, dtype) for v in batch)
    return batch


def _scalar(value: Any) -> float:
    return float(torch.as_tensor(value).detach().float())


def _batch_size(batch: Any) -> int:
    """Length of the first tensor found in the batch."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, (torch.Tensor, Mapping, list, tuple)):
            return _batch_size(value)
    raise TypeError("cannot find a tensor in the batch to count its samples")


def row_to_metrics(row: Mapping[str, float]) -> dict[str, float]:
    """History row -> log_fn keys: ``loss`` -> ``train/loss``, ``val_loss`` -> ``val/loss``."""
    out = {}
    for key, value in row.items():
        if key == "step" or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        out[f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"] = float(value)
    return out


def _final_metrics(history: pd.DataFrame) -> dict[str, float]:
    """Last logged value of every metric (``train/...``, ``val/...``)."""
    if history.empty:
        return {}
    last = {c: history[c].dropna().iloc[-1] for c in history.columns
            if c != "step" and history[c].notna().any()}
    return row_to_metrics(last)


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
