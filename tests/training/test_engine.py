"""The training engine on a toy regression task, in this process (one gloo rank)."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import DS_FP32, small_train_params
from tests.training.toy_tasks import RegressionData, RegressionTask
from tulip_pipelines.training.checkpoints import COMPLETE_MARKER, complete_checkpoints
from tulip_pipelines.training.deepspeed_setup import lr_lambda
from tulip_pipelines.training.engine import train
from tulip_pipelines.training.job import TrainParams

# --- configuration checks ---------------------------------------------------------------------









# --- training ---------------------------------------------------------------------------------

def test_train_learns_logs_and_checkpoints(tmp_path):
    task = RegressionTask()
    frozen_before = task.frozen.weight.detach().clone()
    head_before = task.head.weight.detach().clone()
    logged = []
    params = small_train_params(tmp_path, max_steps=10, checkpoint_every=2,
                                keep_checkpoints=2, val_every=5)
    result = train(task, RegressionData(256), params, DS_FP32,
                   val_dataset=RegressionData(64, seed=1),
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
    ckpt_root = Path(params.run_dir) / "checkpoints"
    assert [step for step, _, _ in complete_checkpoints(ckpt_root)] == [8, 10]
    marker = json.loads((ckpt_root / "step_00000010" / COMPLETE_MARKER).read_text())
    assert marker["step"] == 10
    assert result.last_checkpoint == str(ckpt_root / "step_00000010")


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    params = small_train_params(tmp_path, max_steps=3, log_every=1)
    ds_config = dict(DS_FP32, gradient_accumulation_steps=2)
    result = train(RegressionTask(), RegressionData(256), params, ds_config)
    assert result.final_step == 3
    state = torch.load(Path(result.last_checkpoint) / "mp_rank_00_model_states.pt",
                       weights_only=True)
    assert state["global_steps"] == 3
    assert (state["epoch"], state["batch_offset"]) == (0, 6)  # 3 steps x 2 micro batches
    assert not torch.equal(state["module"]["head.weight"], RegressionTask().head.weight)


def test_an_epoch_budget_resolves_to_steps_and_trains_them(tmp_path):
    """``epochs`` (and ``schedule_epochs``) become steps of this run's data: 256 samples, batch
    16 x accumulation 2 = 8 optimizer steps an epoch; 1.5 epochs of a 3-epoch schedule."""
    params = small_train_params(tmp_path, max_steps=None, epochs=1.5, schedule_epochs=3,
                                warmup_steps=2, log_every=1)
    resolved = params.resolved(steps_per_epoch=8)
    assert (resolved.max_steps, resolved.schedule_steps) == (12, 24)
    assert (resolved.epochs, resolved.schedule_epochs) == (None, None)
    assert TrainParams.from_params(dataclasses.asdict(resolved)) == resolved  # as a rank reads it
    result = train(RegressionTask(), RegressionData(256), params,
                   dict(DS_FP32, gradient_accumulation_steps=2))
    assert result.final_step == 12
    expected = [_warmup_cosine_lr(0.05, s, 2, 24, 0.1) for s in range(12)]
    assert result.history["lr"].tolist() == pytest.approx(expected, rel=1e-9)










def test_dataset_smaller_than_a_batch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot fill one optimizer step"):
        train(RegressionTask(), RegressionData(8), small_train_params(tmp_path), DS_FP32)


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
    params = small_train_params(tmp_path, max_steps=8, warmup_steps=3, lr=0.05,
                                min_lr_ratio=0.1, log_every=1)
    result = train(RegressionTask(), RegressionData(256), params, ds_config)

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
