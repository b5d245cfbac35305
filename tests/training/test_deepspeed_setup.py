"""DeepSpeed setup: the config filled from the parameters and checked, fp32 weights exported from
a bf16 engine."""


import pytest
import torch

from tests.conftest import small_train_params
from tests.training.toy_tasks import RegressionData, RegressionTask
from tulip_pipelines.training.deepspeed_setup import prepare_ds_config
from tulip_pipelines.training.engine import train


def test_ds_config_is_filled_and_checked(tmp_path):
    cfg = small_train_params(tmp_path, batch_size=4)
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
