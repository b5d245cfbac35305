"""The training engine on a toy regression task, in this process (one gloo rank)."""

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import DS_FP32
from tests.training.toy_tasks import RegressionData, RegressionTask
from tulip_pipelines.training.checkpoints import COMPLETE_MARKER, complete_checkpoints
from tulip_pipelines.training.deepspeed_setup import prepare_ds_config
from tulip_pipelines.training.engine import train
from tulip_pipelines.training.schedule import lr_lambda
from tulip_pipelines.training.train_params import TrainParams


def _cfg(tmp_path: Path, **overrides) -> TrainParams:
    values = dict(run_name="toy", run_dir=str(tmp_path / "run"), max_steps=8, batch_size=16,
                  lr=0.05, warmup_steps=2, log_every=2, min_lr_ratio=0.1)
    values.update(overrides)
    return TrainParams(**values)


# --- configuration checks ---------------------------------------------------------------------

def test_from_params_rejects_unknown_keys_by_name():
    params = dict(run_name="x", run_dir="o", max_steps=1, batch_size=1, lr=1e-3, lr_decay=2)
    with pytest.raises(ValueError, match="lr_decay"):
        TrainParams.from_params(params)


def test_from_params_turns_yaml_lists_into_tuples():
    cfg = TrainParams.from_params(dict(run_name="x", run_dir="o", max_steps=3, batch_size=2,
                                       lr=1e-3, betas=[0.9, 0.95]))
    assert cfg.betas == (0.9, 0.95)


@pytest.mark.parametrize("field,value", [("max_steps", 0), ("batch_size", -1), ("lr", 0.0),
                                         ("warmup_steps", 99), ("min_lr_ratio", 2.0),
                                         ("betas", (0.9, 1.0)), ("betas", 0.9),
                                         ("resume", "yes")])
def test_bad_values_name_the_field(field, value):
    values = dict(run_name="x", run_dir="o", max_steps=10, batch_size=2, lr=1e-3)
    values[field] = value
    with pytest.raises(ValueError, match=field):
        TrainParams(**values)


def test_ds_config_is_filled_and_checked(tmp_path):
    cfg = _cfg(tmp_path, batch_size=4)
    filled = prepare_ds_config({"gradient_accumulation_steps": 3}, cfg, world_size=2)
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["train_batch_size"] == 24
    for bad, match in [({"train_micro_batch_size_per_gpu": 8}, "disagrees"),
                       ({"train_batch_size": 5}, "train_batch_size"),
                       ({"zero_optimization": {"stage": 3}}, "ZeRO-3"),
                       ({"optimizer": {"type": "Adam"}}, "optimizer"),
                       ({"fp16": {"enabled": True}}, "fp16")]:
        with pytest.raises(ValueError, match=match):
            prepare_ds_config(bad, cfg, world_size=1)


# --- training ---------------------------------------------------------------------------------

def test_train_learns_logs_and_checkpoints(tmp_path):
    task = RegressionTask()
    frozen_before = task.frozen.weight.detach().clone()
    head_before = task.head.weight.detach().clone()
    logged = []
    cfg = _cfg(tmp_path, max_steps=10, checkpoint_every=2, keep_checkpoints=2, val_every=5)
    result = train(task, RegressionData(256), cfg, DS_FP32, val_dataset=RegressionData(64, seed=1),
                   log_fn=lambda metrics, step: logged.append((step, metrics)))

    history = result.history
    assert list(history["step"]) == [2, 4, 5, 6, 8, 10]  # log_every=2 plus validation at 5
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    expected_lr = [0.05 * lr_lambda(s - 1, 2, 10, 0.1) for s in history["step"]]
    assert history["lr"].tolist() == pytest.approx(expected_lr)
    assert history["val_loss"].notna().tolist() == [False, False, True, False, False, True]
    assert (history["samples_per_s"] > 0).all()
    assert [s for s, _ in logged] == history["step"].tolist()
    assert {"train/loss", "train/mae", "train/lr", "train/samples_per_s"} <= set(logged[0][1])
    assert "val/loss" in logged[-1][1]
    assert result.final_step == 10 and result.resumed_from is None
    assert result.final_metrics["val/loss"] == history["val_loss"].iloc[-1]

    # frozen weights untouched, trained ones moved, everything float32 on the CPU; the 0-dim
    # parameter (DeepSpeed trains it as shape [1]) has its shape back
    assert torch.equal(task.frozen.weight, frozen_before)
    assert not torch.equal(task.head.weight, head_before)
    assert task.log_scale.shape == () and task.log_scale.item() != 0.0
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in task.parameters())

    # validation is the size-weighted mean over the whole validation set with these weights
    val = RegressionData(64, seed=1)
    with torch.no_grad():
        full_mse = task({"x": val.x, "y": val.y})["loss"].item()
    assert history["val_loss"].iloc[-1] == pytest.approx(full_mse, rel=1e-5)

    # only the newest two complete checkpoints stay; each marker names its step
    ckpt_root = Path(cfg.run_dir) / "checkpoints"
    assert [step for step, _, _ in complete_checkpoints(ckpt_root)] == [8, 10]
    marker = json.loads((ckpt_root / "step_00000010" / COMPLETE_MARKER).read_text())
    assert marker["step"] == 10
    assert result.last_checkpoint == str(ckpt_root / "step_00000010")


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    cfg = _cfg(tmp_path, max_steps=3, log_every=1)
    ds_config = dict(DS_FP32, gradient_accumulation_steps=2)
    result = train(RegressionTask(), RegressionData(256), cfg, ds_config)
    assert result.final_step == 3
    state = torch.load(Path(result.last_checkpoint) / "mp_rank_00_model_states.pt",
                       weights_only=True)
    assert state["global_steps"] == 3
    assert (state["epoch"], state["batch_offset"]) == (0, 6)  # 3 steps x 2 micro batches
    assert not torch.equal(state["module"]["head.weight"], RegressionTask().head.weight)


def test_an_epoch_budget_resolves_to_steps_and_trains_them(tmp_path):
    """``epochs`` (and ``schedule_epochs``) become steps of this run's data: 256 samples, batch
    16 x accumulation 2 = 8 optimizer steps an epoch; 1.5 epochs of a 3-epoch schedule."""
    cfg = _cfg(tmp_path, max_steps=None, epochs=1.5, schedule_epochs=3, warmup_steps=2,
               log_every=1)
    resolved = cfg.resolved(steps_per_epoch=8)
    assert (resolved.max_steps, resolved.schedule_steps) == (12, 24)
    assert (resolved.epochs, resolved.schedule_epochs) == (None, None)
    assert TrainParams.from_params(dataclasses.asdict(resolved)) == resolved  # as a rank reads it
    result = train(RegressionTask(), RegressionData(256), cfg,
                   dict(DS_FP32, gradient_accumulation_steps=2))
    assert result.final_step == 12
    expected = [_warmup_cosine_lr(0.05, s, 2, 24, 0.1) for s in range(12)]
    assert result.history["lr"].tolist() == pytest.approx(expected, rel=1e-9)


def test_finished_run_rerun_returns_at_once_with_its_weights(tmp_path):
    cfg = _cfg(tmp_path)
    first_task = RegressionTask()
    first = train(first_task, RegressionData(256), cfg, DS_FP32)
    again_task = RegressionTask()
    again = train(again_task, RegressionData(256), cfg, DS_FP32)
    assert again.resumed_from == 8 and again.final_step == 8
    assert again.history.equals(first.history)
    assert torch.equal(again_task.head.weight, first_task.head.weight)


def test_changed_fingerprint_starts_fresh_and_keeps_the_old_run(tmp_path, caplog):
    train(RegressionTask(), RegressionData(256), _cfg(tmp_path), DS_FP32)
    with caplog.at_level(logging.WARNING, logger="tulip_pipelines.training.engine"):
        result = train(RegressionTask(), RegressionData(256), _cfg(tmp_path, lr=0.01), DS_FP32)
    assert result.resumed_from is None
    assert "fingerprint" in caplog.text
    moved = list((tmp_path / "run").glob("checkpoints.old-*"))
    assert len(moved) == 1 and complete_checkpoints(moved[0])


def test_incomplete_checkpoint_is_ignored(tmp_path):
    cfg = _cfg(tmp_path, max_steps=6, checkpoint_every=3, log_every=1, num_workers=2)
    full = train(RegressionTask(), RegressionData(256), cfg, DS_FP32)
    ckpt_root = Path(cfg.run_dir) / "checkpoints"
    (ckpt_root / "step_00000006" / COMPLETE_MARKER).unlink()  # as if killed while writing it
    rerun = train(RegressionTask(), RegressionData(256), cfg, DS_FP32)
    assert rerun.resumed_from == 3 and rerun.final_step == 6
    assert rerun.history["step"].tolist() == list(range(1, 7))
    assert rerun.history["loss"].tolist() == pytest.approx(full.history["loss"].tolist(), rel=1e-5)


def test_bf16_zero1_returns_fp32_master_weights(tmp_path):
    task = RegressionTask()
    frozen_before = task.frozen.weight.detach().clone()
    ds_config = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}
    result = train(task, RegressionData(256), _cfg(tmp_path), ds_config)
    assert result.history["loss"].iloc[-1] < result.history["loss"].iloc[0]
    assert task.head.weight.dtype == torch.float32
    # fp32 master weights, not bf16 ones cast back; the frozen layer is bit-identical
    head = task.head.weight.detach()
    assert not torch.equal(head.to(torch.bfloat16).float(), head)
    assert torch.equal(task.frozen.weight, frozen_before)
    assert task.log_scale.shape == ()


def test_dataset_smaller_than_a_batch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot fill one batch"):
        train(RegressionTask(), RegressionData(8), _cfg(tmp_path), DS_FP32)


def _warmup_cosine_lr(base: float, step: int, warmup: int, total: int, floor: float) -> float:
    """The schedule written out for the tests: linear warmup to ``base`` over ``warmup`` steps
    (``base / warmup`` at step 0), then cosine from ``base`` at step ``warmup`` down to
    ``floor * base`` at step ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    cosine = 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return base * (floor + (1.0 - floor) * cosine)


@pytest.mark.parametrize("ds_config", [DS_FP32, {"zero_optimization": {"stage": 1},
                                                 "bf16": {"enabled": True}}],
                         ids=["fp32", "bf16-zero1"])
def test_optimizer_steps_with_the_warmup_cosine_learning_rate(tmp_path, monkeypatch, ds_config):
    """The learning rate AdamW really uses at each step, read from its param groups when it
    steps, follows warmup then cosine: every group, every step."""
    seen: list[list[float]] = []
    adamw_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    cfg = _cfg(tmp_path, max_steps=8, warmup_steps=3, lr=0.05, min_lr_ratio=0.1, log_every=1)
    result = train(RegressionTask(), RegressionData(256), cfg, ds_config)

    expected = [_warmup_cosine_lr(0.05, s, 3, 8, 0.1) for s in range(8)]
    # AdamW steps once per training step over both groups (decay, no decay), or under ZeRO once
    # per group; either way each training step covers the two groups, all at that step's rate
    calls_per_step = len(seen) // 8
    assert calls_per_step >= 1 and len(seen) == 8 * calls_per_step, seen
    per_step = [sum(seen[i * calls_per_step:(i + 1) * calls_per_step], []) for i in range(8)]
    assert all(len(lrs) == 2 for lrs in per_step), per_step
    assert per_step == [pytest.approx([lr, lr], rel=1e-9) for lr in expected]
    # and the history's lr column is the rate each step used
    assert result.history["lr"].tolist() == pytest.approx(expected, rel=1e-9)
