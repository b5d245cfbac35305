"""DeepSpeed setup: the config filled from the parameters and checked, fp32 weights exported from
a bf16 engine."""


import pytest
import torch

from tests.conftest import small_train_params
from tests.training.toy_tasks import RegressionData, RegressionTask
from tulip_pipelines.training.deepspeed_setup import prepare_ds_config
from tulip_pipelines.training.engine import train


def test_ds_config_is_filled_and_checked(tmp_path):
    params = small_train_params(tmp_path, batch_size=4)
    filled = prepare_ds_config({"gradient_accumulation_steps": 3}, params, world_size=2)
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["train_batch_size"] == 24
    for bad, match in [({"train_micro_batch_size_per_gpu": 8}, "disagrees"),
                       ({"train_batch_size": 5}, "train_batch_size"),
                       ({"zero_optimization": {"stage": 3}}, "ZeRO-3"),
                       ({"optimizer": {"type": "Adam"}}, "optimizer"),
                       ({"fp16": {"enabled": True}}, "fp16")]:
        with pytest.raises(ValueError, match=match):
            prepare_ds_config(bad, params, world_size=1)


def test_bf16_zero1_returns_fp32_master_weights(tmp_path):
    task = RegressionTask()
    frozen_before = task.frozen.weight.detach().clone()
    ds_config = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}
    result = train(task, RegressionData(256), small_train_params(tmp_path), ds_config)
    assert result.history["loss"].iloc[-1] < result.history["loss"].iloc[0]
    assert task.head.weight.dtype == torch.float32
    # fp32 master weights, not bf16 ones cast back; the frozen layer is bit-identical
    head = task.head.weight.detach()
    assert not torch.equal(head.to(torch.bfloat16).float(), head)
    assert torch.equal(task.frozen.weight, frozen_before)
    assert task.log_scale.shape == ()


class _BoundedTask(RegressionTask):
    """The toy task with its ``log_scale`` started at ``start`` and bounded to ``bounds``."""

    def __init__(self, start: float, bounds: tuple[float, float]):
        super().__init__()
        with torch.no_grad():
            self.log_scale.fill_(start)
        self.bounds = bounds

    def parameter_bounds(self):
        return {self.log_scale: self.bounds}


@pytest.mark.parametrize("start, ds_config", [
    (1.0, {}), (-1.0, {}),  # above the upper bound, below the lower one (fp32, no ZeRO)
    (1.0, {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}),  # the fp32 master
    (-1.0, {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}),
])
def test_the_engine_clamps_a_bounded_parameter_at_both_ends_after_each_step(tmp_path, start,
                                                                             ds_config):
    """A parameter outside its bounds is inside them after the first optimizer step (and the
    master copy with it: later steps start from the clamped value), at the end it crossed."""
    task = _BoundedTask(start, (-0.25, 0.5))
    params = small_train_params(tmp_path, max_steps=1, warmup_steps=0, lr=1e-4)
    train(task, RegressionData(64), params, ds_config)
    # one small step from +-1 cannot reach the bounds by itself: the clamp put it there
    assert float(task.log_scale.detach()) == pytest.approx(0.5 if start > 0 else -0.25, abs=1e-3)
