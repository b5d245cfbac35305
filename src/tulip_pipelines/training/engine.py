"""The training loop shared by every training pipeline: DeepSpeed + AdamW + warmup/cosine, a
resumable data order, periodic validation and complete-only checkpoints.

A *task* is an ``nn.Module`` whose ``forward(batch)`` returns a dict with a scalar ``"loss"`` and
optionally more scalars (logged as ``train/<name>``). Only its parameters with ``requires_grad``
are optimised; whatever it keeps outside its registered submodules (a frozen teacher) is neither
optimised nor checkpointed.

Batches: tensors (also inside dicts/lists/tuples) are moved to the engine's device, floating-point
ones cast to bf16 when ``bf16.enabled``; a frozen fp32 teacher kept outside the task's modules must
cast its inputs itself (and, on a GPU, be moved there by the task). With ``precision: amp_bf16``
every forward (the cache pass of a global-batch step, the gradient pass, validation) runs under
bfloat16 autocast; the task computes its loss in float32 (:mod:`.tasks`). The autocast is entered
inside the task's ``forward`` and ``features`` (:func:`.deepspeed_setup.autocast_inside`),
within DeepSpeed's ``engine(batch)``: DeepSpeed 0.19.8 runs the module under
``torch.autocast(enabled=False)`` when an autocast is active outside it on a GPU
(``runtime/torch_autocast.autocast_if_enabled``), so
an autocast around the engine call would leave the gradient pass in float32 there (docs/gpu.md).
A task may bound some of its parameters (``parameter_bounds()``): they are clamped after every
optimizer step. Every tensor handed to a collective lives on the engine's device (NCCL maps
only ``cuda``).

Where the other jobs live: :mod:`.job` (the training job a stage builds, the engine's parameters
and result), :mod:`.checkpoints` (training state on disk), :mod:`.deepspeed_setup` (the process
group, DeepSpeed config, initialisation, schedule, precision, clamps, fp32 export),
:mod:`.datasets` (the data, sampler, batches and skipped samples), :mod:`.run_dir` (heartbeats),
:mod:`.launch` (several processes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from tulip_pipelines.training import checkpoints
from tulip_pipelines.training.accumulation import StepCache
from tulip_pipelines.training.datasets import (
    DataPosition,
    ResumableSampler,
    SeededSamples,
    SkippedSamples,
    count_samples,
    scalar,
    to_device,
)
from tulip_pipelines.training.deepspeed_setup import (
    autocast_inside,
    clamp_parameters,
    compute_dtype,
    export_fp32_weights,
    init_distributed,
    initialize_engine,
    prepare_ds_config,
    set_tf32,
    warn_if_bf16_emulated,
)
from tulip_pipelines.training.job import TrainParams, TrainResult
from tulip_pipelines.training.run_dir import Heartbeat

logger = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]


def train(
    task: torch.nn.Module,
    train_dataset: Dataset,
    params: TrainParams,
    ds_config: Mapping[str, Any],
    *,
    collate_fn: Callable | None = None,
    val_dataset: Dataset | None = None,
    log_fn: LogFn | None = None,
    fingerprint_inputs: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``task`` with DeepSpeed until ``params.max_steps`` optimizer steps, resuming if
    possible.

    ``log_fn(metrics, step)`` is called on rank 0 with ``train/loss``, ``train/lr``,
    ``train/samples_per_s``, ``train/<task scalar>`` and ``val/<name>`` keys. ``fingerprint_inputs``
    describe what else determines the run (model spec, data identity); they are hashed with the
    parameters, the DeepSpeed config and the dataset size into the run's fingerprint, which
    decides whether existing checkpoints belong to this run.
    """
    started = time.perf_counter()
    set_tf32(params.tf32)
    rank, world_size = init_distributed()
    ds_config = prepare_ds_config(ds_config, params, world_size)
    root = checkpoints.checkpoints_dir(params.run_dir)
    gas = ds_config["gradient_accumulation_steps"]
    sampler = ResumableSampler(train_dataset, world_size, rank, params.seed, params.batch_size,
                               gas)
    if sampler.usable == 0:
        raise ValueError(
            f"run {params.run_name!r}: {len(train_dataset)} training samples cannot fill one "
            f"optimizer step of {params.batch_size} x {gas} on each of {world_size} process(es)"
        )
    layout = checkpoints.Layout(params.batch_size, gas, world_size)
    params = params.resolved(max(1, sampler.usable // params.batch_size // gas))
    fingerprint = checkpoints.run_fingerprint(params, ds_config, len(train_dataset),
                                              fingerprint_inputs)

    resume = checkpoints.select_resume(root, fingerprint, layout, params, rank)
    load_dir, load_tag = root, resume.tag if resume is not None else None
    if resume is not None and checkpoints.needs_universal(root, resume, layout):
        load_dir = checkpoints.convert_to_universal(root, resume.tag, rank)
        load_tag = checkpoints.UNIVERSAL_DIR
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}),
                                                 "load_universal": True}}
    engine, task_state = initialize_engine(task, params, ds_config)
    warn_if_bf16_emulated(params.precision, engine.device)
    position, history, start_step = DataPosition(), [], 0
    if resume is not None:
        _, client_state = engine.load_checkpoint(str(load_dir), tag=load_tag)
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / load_tag}")
        start_step = int(client_state["step"])
        position = checkpoints.data_position(client_state, layout)
        history = checkpoints.read_history(root, resume.tag)
        if not checkpoints.restore_rng_state(root, resume.tag, rank):
            torch.manual_seed(hash((params.seed, rank, start_step)) & 0xFFFF_FFFF)
        then = resume.layout or layout
        logger.info("%s: resumed from %s (step %d of %d)%s", params.run_name, resume.tag,
                    start_step, params.max_steps,
                    "" if then == layout else f" written by {then.processes} process(es) x "
                    f"accumulation {then.accumulation}, continued on {layout.processes} x "
                    f"{layout.accumulation}")
    else:
        torch.manual_seed(hash((params.seed, rank)) & 0xFFFF_FFFF)

    loader = DataLoader(
        SeededSamples(train_dataset, params.seed), batch_size=params.batch_size, sampler=sampler,
        drop_last=True, collate_fn=collate_fn, num_workers=params.num_workers,
        persistent_workers=params.num_workers > 0,
        generator=torch.Generator().manual_seed(params.seed),  # leaves the global RNG alone
    )
    loop = _Loop(_Run(engine, params, layout, rank, root, fingerprint),
                 _Validation(val_dataset, collate_fn) if val_dataset is not None else None,
                 log_fn, history)
    with autocast_inside(task, engine.device.type, params.precision == "amp_bf16"):
        loop.run(loader, sampler, position, start_step)
    loop.heartbeat.beat(loop.step, "done")
    export_fp32_weights(engine, task, task_state)
    history_df = pd.DataFrame(loop.history)
    result = TrainResult(
        history=history_df,
        final_step=loop.step,
        resumed_from=start_step if resume is not None else None,
        last_checkpoint=str(root / checkpoints.tag(loop.step)),
        wall_time_s=time.perf_counter() - started,
        final_metrics=_final_metrics(history_df),
        skipped=loop.skipped.frame(world_size),
    )
    if len(result.skipped):
        logger.warning("%s: %d unreadable samples skipped and recorded, e.g. %s",
                       params.run_name, len(result.skipped),
                       result.skipped.head(3).to_dict("records"))
    logger.info("%s: finished at step %d in %.1f s; %s", params.run_name, result.final_step,
                result.wall_time_s, result.final_metrics)
    return result


@dataclass(frozen=True)
class _Run:
    """What the loop trains and where it saves: DeepSpeed's engine, the parameters, the run's
    layout and this process's rank, the checkpoints folder and the run's fingerprint."""

    engine: Any
    params: TrainParams
    layout: checkpoints.Layout
    rank: int
    root: Path
    fingerprint: str


@dataclass(frozen=True)
class _Validation:
    dataset: Dataset
    collate_fn: Callable | None


@dataclass
class _Window:
    """The task's scalars summed since the last logged row, over how many micro batches, since
    when, and the learning rate of the last step."""

    sums: dict[str, float] = field(default_factory=dict)
    micro_batches: int = 0
    started: float = field(default_factory=time.perf_counter)
    lr: float = float("nan")

    def add(self, out: Mapping[str, Any]) -> None:
        for key, value in out.items():
            self.sums[key] = self.sums.get(key, 0.0) + scalar(value)
        self.micro_batches += 1


class _Loop:
    """The optimisation loop with its logging, validation and checkpoint bookkeeping: the run
    (:class:`_Run`), its validation set, where rows go (``log_fn``, ``history``), and its own
    state: the step, the metrics window, the heartbeat and the skipped samples."""

    def __init__(self, run: _Run, validation: _Validation | None, log_fn: LogFn | None,
                 history: list[dict[str, float]]):
        self.ctx, self.validation, self.log_fn, self.history = run, validation, log_fn, history
        self.engine, self.params, self.rank = run.engine, run.params, run.rank
        self.gas = self.engine.gradient_accumulation_steps()
        self.compute_dtype, self.world_size = compute_dtype(self.engine), run.layout.processes
        self.step = 0
        self.window = _Window()
        self.heartbeat = Heartbeat(self.params.run_dir, self.rank)
        self.skipped = SkippedSamples(self.params.run_name, self.params.max_bad_fraction)

    def run(self, loader: DataLoader, sampler: ResumableSampler, position: DataPosition,
            start_step: int) -> None:
        params, self.step = self.params, start_step
        if self.step >= params.max_steps:
            logger.info("%s: already at step %d of %d, nothing to train", params.run_name,
                        self.step, params.max_steps)
            return
        self.engine.train()
        self.heartbeat.beat(self.step, "train")
        pending: list[Any] = []  # the micro batches of the optimizer step being gathered
        # rank 0's bar, on a terminal only (tqdm's disable=None); elsewhere the rows logged
        # every log_every steps say how far the run is
        bar = tqdm(total=params.max_steps, desc=params.run_name, unit="step", initial=self.step,
                   leave=False, disable=None if self.rank == 0 else True)
        self.window = _Window()
        while self.step < params.max_steps:
            sampler.start(position)
            for batch in loader:
                pending.append(batch)
                position.offset += 1
                if len(pending) < self.gas:
                    continue
                self._optimizer_step(pending)
                pending = []
                self.step += 1
                bar.update(1)
                self._after_step(position, bar)
                if self.step >= params.max_steps:
                    break
            else:  # the sampler yields whole steps only (the same ones whatever the layout)
                position = DataPosition(position.epoch + 1, 0)
        bar.close()

    def _optimizer_step(self, batches: list[Any]) -> None:
        """Forward and backward over the step's micro batches; DeepSpeed steps the optimizer
        after the last one (its gradient-accumulation boundary). A task whose loss spans the
        global batch (``global_batch``) first caches every micro batch's features, so that the
        accumulated gradient is the whole batch's (see :mod:`.accumulation`)."""
        self.window.lr = self.engine.get_lr()[0]  # read from the optimizer: what this step uses
        batches = [to_device(self.skipped.take(b, "train", self.step + 1), self.engine.device,
                             self.compute_dtype) for b in batches]
        task, cached = self.engine.module, None
        if len(batches) > 1 and getattr(task, "global_batch", False):
            with torch.no_grad():  # features() enters the autocast itself (autocast_inside)
                cached = [task.features(batch) for batch in batches]
        for index, batch in enumerate(batches):
            kwargs = {} if cached is None else {"cache": StepCache(cached, index)}
            out = self.engine(batch, **kwargs)
            if "loss" not in out:
                raise KeyError(f"run {self.params.run_name!r}: task.forward must return a 'loss' "
                               f"entry, got keys {sorted(out)}")
            # DeepSpeed divides each micro batch's loss by the accumulation steps; with the cache
            # each carries the whole batch's loss, whose gradients must add up undivided.
            # (backward(..., scale_wrt_gas=False) is not enough: DeepSpeed 0.19.8's output hooks
            # still divide the gradient when the loss tensor is the forward's own output.)
            loss = out["loss"] if cached is None else out["loss"] * len(batches)
            self.engine.backward(loss)
            self.engine.step()
            self.window.add(out)
        bounds = task.parameter_bounds() if hasattr(task, "parameter_bounds") else {}
        if bounds:
            clamp_parameters(self.engine, bounds)

    def _after_step(self, position: DataPosition, bar) -> None:
        params, step = self.params, self.step
        last = step == params.max_steps
        validate = self.validation is not None and (
            last or (params.val_every > 0 and step % params.val_every == 0))
        if validate:
            self.heartbeat.beat(step, "validate")
        if last or validate or step % params.log_every == 0:
            self._log_row(validate, bar)
        if last or (params.checkpoint_every > 0 and step % params.checkpoint_every == 0):
            self.heartbeat.beat(step, "checkpoint")
            client_state = {"step": step, "epoch": position.epoch,
                            "batch_offset": position.offset, "fingerprint": self.ctx.fingerprint,
                            "samples": position.offset * self.params.batch_size * self.world_size,
                            "layout": dataclasses.asdict(self.ctx.layout)}
            checkpoints.save_checkpoint(self.engine, self.ctx.root, step, client_state,
                                        self.history, params.keep_checkpoints, self.rank)
        self.heartbeat.beat(step, "train")  # at most once a second unless the phase changed

    def _log_row(self, validate: bool, bar) -> None:
        """Close the metrics window (validating if asked) into a history row and report it."""
        row = self._close_window()
        if validate:
            row.update({f"val_{k}": v for k, v in self._validate().items()})
        row["skipped_samples"] = self._all_reduce([len(self.skipped.records)])[0]  # so far
        self.history.append(row)
        if self.rank == 0:
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            logger.info("%s step %d/%d: %s", self.params.run_name, self.step,
                        self.params.max_steps,
                        ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
            if self.log_fn is not None:
                self.log_fn(row_to_metrics(row), self.step)

    def _close_window(self) -> dict[str, float]:
        """Mean of the task's scalars since the last row (over all ranks), lr and throughput."""
        window = self.window
        keys = sorted(window.sums)
        totals = self._all_reduce([window.sums[k] for k in keys] + [window.micro_batches])
        elapsed = time.perf_counter() - window.started
        n_micro = totals[-1]
        row = {"step": self.step}
        row.update({k: totals[i] / n_micro for i, k in enumerate(keys)})
        row["lr"] = window.lr
        row["samples_per_s"] = n_micro * self.params.batch_size / max(elapsed, 1e-9)
        if self.engine.device.type == "cuda":  # this rank's peak since the run started
            row["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.engine.device) / 2**30
        self.window = _Window(lr=window.lr)
        return row

    def _all_reduce(self, values: list[float]) -> list[float]:
        """Sums over the ranks, reduced on the engine's device (an NCCL group has no backend
        for CPU tensors: "No backend type associated with device type cpu")."""
        totals = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        if self.world_size > 1:
            dist.all_reduce(totals)
        return totals.tolist()

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        """Batch-size-weighted means of the task's scalars over the validation set (sharded)."""
        started = time.perf_counter()
        dataset = self.validation.dataset
        shard = Subset(dataset, range(self.rank, len(dataset), self.world_size))
        loader = DataLoader(shard, batch_size=self.params.batch_size, shuffle=False,
                            collate_fn=self.validation.collate_fn,
                            num_workers=self.params.num_workers)
        sums: dict[str, float] = {}
        count = 0
        self.engine.eval()
        for batch in loader:
            batch = self.skipped.take(batch, "val", self.step)
            size = count_samples(batch)
            out = self.engine(to_device(batch, self.engine.device, self.compute_dtype))
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + scalar(value) * size
            count += size
        self.engine.train()
        keys = sorted(sums)
        totals = self._all_reduce([sums[k] for k in keys] + [count])
        if totals[-1] == 0:
            raise ValueError(f"run {self.params.run_name!r}: the validation set is empty")
        self.window.started += time.perf_counter() - started  # keep throughput about training
        return {k: totals[i] / totals[-1] for i, k in enumerate(keys)}


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
