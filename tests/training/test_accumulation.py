"""The contrastive loss spans the global batch: ``micro x accumulation x processes`` trains
exactly like one batch of that size (same loss, same updated weights, fp32 on the CPU)."""

import pytest
import torch

from tests.training.toy_tasks import PairData, contrastive_task
from tulip_pipelines.training.engine import train
from tulip_pipelines.training.job import TrainParams
from tulip_pipelines.training.processes import run_distributed

N = 16
# AdamW's first step is about lr * sign(gradient); eps = 1 makes it scale with the gradient, so
# a wrongly scaled gradient (e.g. divided by the accumulation steps) changes the weights.
TRAIN = dict(max_steps=1, lr=1e-2, eps=1.0, weight_decay=0.0, log_every=1, seed=3)
DS = {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}, "gradient_clipping": 0.0}


def _one_step(tmp_path, name, batch_size, accumulation, **task_options):
    task = contrastive_task(**task_options)
    params = TrainParams(run_name=name, run_dir=str(tmp_path / name), batch_size=batch_size,
                         **TRAIN)
    result = train(task, PairData(N), params, {**DS, "gradient_accumulation_steps": accumulation})
    return result.history["loss"].iloc[0], task.state_dict()


def _assert_same(reference, other, tol=1e-5):
    loss_ref, weights_ref = reference
    loss, weights = other
    assert loss == pytest.approx(loss_ref, abs=tol)
    assert weights.keys() == weights_ref.keys()
    for key in weights_ref:
        torch.testing.assert_close(weights[key], weights_ref[key], atol=tol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    """1 process, batch 16: the reference."""
    return _one_step(tmp_path_factory.mktemp("ref"), "batch16", N, 1)


def test_accumulated_micro_batches_train_like_one_batch(one_batch, tmp_path):
    _assert_same(one_batch, _one_step(tmp_path, "micro4x4", 4, 4))
    _assert_same(one_batch, _one_step(tmp_path, "micro8x2", 8, 2))


def test_per_micro_batch_loss_does_not(one_batch, tmp_path):
    """The check above can fail: contrasting each micro batch alone (contrastive_batch: micro,
    the old behaviour) gives another loss and other weights."""
    loss, weights = _one_step(tmp_path, "local", 4, 4, contrastive_batch="micro")
    assert abs(loss - one_batch[0]) > 1e-3
    moved = weights["model.text_projection"] - one_batch[1]["model.text_projection"]
    assert moved.abs().max() > 1e-4
    assert not torch.equal(weights["model.logit_scale"], one_batch[1]["model.logit_scale"])


@pytest.mark.slow
def test_two_processes_train_like_one_batch(one_batch, tmp_path, project_root, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(project_root))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    plan = {
        "builder": "tests.training.toy_tasks:build_contrastive_job",
        "n": N,
        "train": dict(run_name="2x4x2", run_dir=str(tmp_path / "run"), batch_size=4, **TRAIN),
        "ds_config": {**DS, "gradient_accumulation_steps": 2},
    }
    task = contrastive_task()
    result = run_distributed(plan, nproc=2, launcher="torchrun", run_dir=tmp_path / "run",
                             module=task, timeout_s=300)
    _assert_same(one_batch, (result.history["loss"].iloc[0], task.state_dict()))
