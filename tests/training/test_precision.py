"""Precision and temperature (engine, tasks, DeepSpeed setup): ``precision: amp_bf16`` runs the
towers under bfloat16 autocast with float32 weights, features, logits, loss and gradients, tracks
the float32 run and resumes bitwise; the logit scale is clamped as a parameter after every
optimizer step (open_clip), so OpenAI's value above the clamp still trains, and the clamp holds in
DeepSpeed's float32 master copy too."""

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import DS_FP32, small_train_params
from tests.training.toy_tasks import PairData, contrastive_task
from tulip_pipelines.training.checkpoints import COMPLETE_MARKER
from tulip_pipelines.training.deepspeed_setup import prepare_ds_config
from tulip_pipelines.training.engine import train
from tulip_pipelines.training.tasks import clip_loss

OPENAI_LOGIT_SCALE = 4.60546875  # exp = 100.03, just above open_clip's clamp at 100


def _batch(n=8):
    data = PairData(n)
    return {key: torch.stack([data[i][key] for i in range(n)]) for key in ("image", "long",
                                                                           "short")}


def test_under_autocast_the_loss_is_the_float32_loss_of_the_features():
    task = contrastive_task(contrastive_batch="micro").train()
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = task(batch)
        features = task.features(batch)
    assert all(f.dtype == torch.float32 for f in features.values())
    assert out["loss"].dtype == torch.float32
    # logits and cross-entropy in float32: exactly the loss of the (upcast) features outside
    # autocast; logits in bfloat16 would round the loss differently
    scale = task.model.logit_scale.exp()
    expected = (0.8 * clip_loss(features["image"], features["long"], scale)
                + 0.2 * clip_loss(features["image"], features["short"], scale))
    assert torch.equal(out["loss"].detach(), expected.detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the towers themselves ran in bfloat16
        assert task.model.encode_text(batch["long"]).dtype == torch.bfloat16


def _run(tmp_path, name, precision, **overrides):
    task = contrastive_task()
    params = small_train_params(tmp_path / name, batch_size=8, lr=1e-3, max_steps=20,
                                log_every=1, warmup_steps=2, precision=precision, **overrides)
    return task, train(task, PairData(32), params, DS_FP32)


def test_mixed_precision_tracks_the_float32_loss_curve(tmp_path):
    """bfloat16 keeps 8 bits of mantissa (a relative rounding of 2^-9 per value): through two
    small towers the features move by under 1% and so does the loss of a step; over 20 steps
    the two runs' weights drift apart a little (measured: at most 2.8% between the curves while
    the loss falls from 2.25 to 0.70). 5% of the float32 loss at every step bounds that with
    room; weights kept in bfloat16 would not train like this at lr 1e-3."""
    _, fp32 = _run(tmp_path, "fp32", "fp32")
    task, amp = _run(tmp_path, "amp", "amp_bf16")
    reference, mixed = fp32.history["loss"].to_numpy(), amp.history["loss"].to_numpy()
    assert reference[-1] < 0.5 * reference[0]  # it trains
    assert mixed == pytest.approx(reference, rel=0.05)
    assert not (mixed == reference).all()  # the autocast did act
    assert all(p.dtype == torch.float32 for p in task.parameters())


def test_a_mixed_precision_run_resumes_bitwise(tmp_path):
    task, full = _run(tmp_path, "amp", "amp_bf16", checkpoint_every=10)
    checkpoints = Path(tmp_path / "amp" / "run" / "checkpoints")
    (checkpoints / "step_00000020" / COMPLETE_MARKER).unlink()  # as if killed while writing
    again, resumed = _run(tmp_path, "amp", "amp_bf16", checkpoint_every=10)
    assert resumed.resumed_from == 10
    assert resumed.history["loss"].tolist() == full.history["loss"].tolist()
    for (name, a), b in zip(task.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_precision_sets_deepspeeds_bf16_and_a_contradiction_is_named(tmp_path):
    params = small_train_params(tmp_path, precision="bf16")
    assert prepare_ds_config({}, params, 1)["bf16"]["enabled"] is True
    for precision in ("fp32", "amp_bf16"):
        params = small_train_params(tmp_path, precision=precision)
        assert prepare_ds_config({}, params, 1)["bf16"]["enabled"] is False
        with pytest.raises(ValueError, match="disagrees with the run's train.precision"):
            prepare_ds_config({"bf16": {"enabled": True}}, params, 1)
    with pytest.raises(ValueError, match="precision"):
        small_train_params(tmp_path, precision="fp16")


def test_openais_logit_scale_gets_a_gradient_and_changes_after_one_step(tmp_path):
    task = contrastive_task(contrastive_batch="micro").train()
    with torch.no_grad():
        task.model.logit_scale.fill_(OPENAI_LOGIT_SCALE)
    task(_batch())["loss"].backward()
    assert task.model.logit_scale.grad.abs().item() > 0  # exp().clamp(max=100) would give 0
    task = contrastive_task()
    with torch.no_grad():
        task.model.logit_scale.fill_(OPENAI_LOGIT_SCALE)
    params = small_train_params(tmp_path, batch_size=8, lr=1e-3, max_steps=1, warmup_steps=0,
                                log_every=1)
    train(task, PairData(16), params, DS_FP32)
    after = task.model.logit_scale.item()
    assert after != OPENAI_LOGIT_SCALE and after <= math.log(100) + 1e-6


DS_CONFIGS = {
    "fp32": DS_FP32,
    "fp32 zero2": {**DS_FP32, "zero_optimization": {"stage": 2}},
    "bf16": {**DS_FP32, "bf16": {"enabled": True}},
    "bf16 zero1": {**DS_FP32, "zero_optimization": {"stage": 1}, "bf16": {"enabled": True}},
}


@pytest.mark.parametrize("ds", sorted(DS_CONFIGS))
def test_the_clamp_holds_in_the_master_weights(tmp_path, ds):
    """Started above the clamp with a tiny learning rate: after 3 steps the exported weights
    (DeepSpeed's float32 master copy where it keeps one) hold ln(100); a clamp of the module's
    copy alone would leave the master near 5 and export that."""
    task = contrastive_task()
    with torch.no_grad():
        task.model.logit_scale.fill_(5.0)
    params = small_train_params(tmp_path, batch_size=8, lr=1e-6, max_steps=3, warmup_steps=0,
                                log_every=1)
    result = train(task, PairData(24), params, DS_CONFIGS[ds])
    assert task.model.logit_scale.item() == pytest.approx(math.log(100), abs=1e-5)
    # every step after the first starts from the clamp: exp(ln 100) = 100
    logged = result.history["logit_scale"].tolist()
    assert logged[0] == pytest.approx(math.exp(5.0), rel=2e-2)
    assert logged[1:] == pytest.approx([100.0] * 2, rel=2e-2)  # bf16: ln 100 -> 4.59375


def test_amp_bf16_holds_inside_deepspeed_as_on_a_gpu(tmp_path, monkeypatch):
    """DeepSpeed 0.19.8's ``engine(batch)`` runs the module under
    ``runtime/torch_autocast.autocast_if_enabled``, which switches an autocast entered outside
    it off when ``torch.is_autocast_enabled()`` says one is on. Without an argument that asks
    about CUDA: on a GPU it is true, on the CPU false. Patched here to ask about the CPU's
    autocast, as it does on a GPU: in the gradient pass of one amp_bf16 expand step (2 micro
    batches, the cache pass first) every Linear output of the towers is bfloat16, and the
    features each micro batch gets in the cache pass are exactly those of its gradient pass."""
    from tulip_pipelines.training.tasks import ContrastiveTask

    real = torch.is_autocast_enabled

    def as_on_a_gpu(*args):
        return real(*args) if args else real("cpu")

    monkeypatch.setattr(torch, "is_autocast_enabled", as_on_a_gpu)
    linear_dtypes = {True: [], False: []}  # grad enabled (the gradient pass) -> output dtypes
    features = {True: [], False: []}
    task = contrastive_task()
    for module in task.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, i, out: linear_dtypes[
                torch.is_grad_enabled()].append(out.dtype))
    real_features = ContrastiveTask.features

    def recording_features(self, batch):
        out = real_features(self, batch)
        features[torch.is_grad_enabled()].append({k: v.detach().clone() for k, v in out.items()})
        return out

    monkeypatch.setattr(ContrastiveTask, "features", recording_features)
    params = small_train_params(tmp_path, batch_size=4, lr=1e-3, max_steps=1, warmup_steps=0,
                                log_every=1, precision="amp_bf16")
    train(task, PairData(8), params, {**DS_FP32, "gradient_accumulation_steps": 2})
    assert linear_dtypes[True] and set(linear_dtypes[True]) == {torch.bfloat16}
    assert set(linear_dtypes[False]) == {torch.bfloat16}  # the cache pass
    assert len(features[False]) == len(features[True]) == 2
    for cached, fresh in zip(features[False], features[True]):
        for key in cached:
            assert torch.equal(cached[key], fresh[key]), key
    assert "forward" not in vars(task) and "features" not in vars(task)  # put back
