"""What the training code does where CUDA behaves differently from the CPU, reproduced on the CPU by
patching the call where the behaviour differs (docs/gpu.md lists every such place): the devices of
the tensors handed to collectives (NCCL maps only ``cuda``), the CUDA random generators of a run
resumed with fewer visible GPUs, the universal conversion against NCCL's collective timeout, TF32,
and the DeepSpeed config of ``precision: bf16``."""

import base64
import json
import subprocess
import threading
import time

import pytest
import torch

from tulip_pipelines.training import checkpoints


class FakeCudaGenerators:
    """torch.cuda's random-state functions for ``count`` visible devices, this process on
    ``current``: as torch does, a device index past the visible ones raises IndexError (torch
    looks the generator up in ``torch.cuda.default_generators``)."""

    def __init__(self, count: int, current: int, states: dict[int, torch.Tensor] | None = None):
        self.count, self.current = count, current
        self.states = states or {i: torch.full((16,), 10 + i, dtype=torch.uint8)
                                 for i in range(count)}

    def _index(self, device) -> int:
        if isinstance(device, str):
            device = torch.device(device)
        index = device if isinstance(device, int) else device.index
        index = self.current if index is None else index
        if index >= self.count:
            raise IndexError("list index out of range")  # default_generators[idx]
        return index

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set_rng_state(self, new_state: torch.Tensor, device="cuda") -> None:
        self.states[self._index(device)] = new_state.clone()

    def install(self, monkeypatch) -> None:
        """Patch torch.cuda (and torch.cuda.random, whose ``*_all`` functions call these by their
        module's names), leaving torch's own ``get_rng_state_all``/``set_rng_state_all``."""
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        for module in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(module, "device_count", lambda: self.count)
            monkeypatch.setattr(module, "current_device", lambda: self.current)
            monkeypatch.setattr(module, "get_rng_state", self.get_rng_state)
            monkeypatch.setattr(module, "set_rng_state", self.set_rng_state)


def test_a_run_saved_with_8_visible_gpus_resumes_on_4(tmp_path, monkeypatch):
    """A checkpoint written by local rank 1 of 8 GPUs is restored by local rank 1 of 4: only that
    device's generator is kept and put back (torch's set_rng_state_all over 8 saved states
    raises IndexError on a machine with 4)."""
    tag_dir = tmp_path / "step_00000010"
    tag_dir.mkdir()
    saved_on = FakeCudaGenerators(8, current=1)
    saved_on.install(monkeypatch)
    expected = saved_on.states[1].clone()
    (tag_dir / checkpoints.RNG_FILE.format(rank=1)).write_text(
        json.dumps(checkpoints.rng_state()))

    resumed_on = FakeCudaGenerators(4, current=1,
                                    states={i: torch.zeros(16, dtype=torch.uint8)
                                            for i in range(4)})
    resumed_on.install(monkeypatch)
    assert checkpoints.restore_rng_state(tmp_path, "step_00000010", rank=1)
    assert torch.equal(resumed_on.states[1], expected)  # its own device's generator is back
    assert all(not s.any() for i, s in resumed_on.states.items() if i != 1)  # others untouched


def test_a_checkpoint_with_every_devices_state_restores_the_local_one(tmp_path, monkeypatch):
    """Checkpoints written before (one state per visible device) still resume on fewer GPUs."""
    tag_dir = tmp_path / "step_00000010"
    tag_dir.mkdir()
    state = json.loads(json.dumps(checkpoints.rng_state()))  # the CPU parts, as written here
    old = FakeCudaGenerators(8, current=2)
    state.pop("cuda_device", None)
    state["cuda"] = [base64.b64encode(old.states[i].numpy().tobytes()).decode()
                     for i in range(8)]
    (tag_dir / checkpoints.RNG_FILE.format(rank=2)).write_text(json.dumps(state))
    now = FakeCudaGenerators(4, current=2,
                             states={i: torch.zeros(16, dtype=torch.uint8) for i in range(4)})
    now.install(monkeypatch)
    assert checkpoints.restore_rng_state(tmp_path, "step_00000010", rank=2)
    assert torch.equal(now.states[2], old.states[2])


class _Collective(Exception):
    """Raised by the recording collective once it has seen its tensor (a ``meta`` tensor has no
    values to reduce)."""


class _StubEngine:
    """What the loop asks of a DeepSpeed engine, on a device that is not the CPU (``meta``
    stands for ``cuda``): its forward returns a CPU loss, as a scalar read back would be."""

    device = torch.device("meta")

    def gradient_accumulation_steps(self) -> int:
        return 1

    def bfloat16_enabled(self) -> bool:
        return False

    def eval(self):
        return self

    def train(self):
        return self

    def __call__(self, batch):
        return {"loss": torch.tensor(1.0)}


def test_the_loops_collectives_get_tensors_on_the_engines_device(tmp_path, monkeypatch):
    """With NCCL only ``cuda`` tensors can be reduced ("No backend type associated with device
    type cpu"): the totals of the logged window, of the skipped samples and of validation are
    reduced on the device the engine reports, here ``meta``, on 2 processes."""
    from tests.conftest import small_train_params
    from tests.training.toy_tasks import RegressionData
    from tulip_pipelines.training import engine as engine_module

    seen = []

    def recording_all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise _Collective

    monkeypatch.setattr(engine_module.dist, "all_reduce", recording_all_reduce)
    params = small_train_params(tmp_path)
    run = engine_module._Run(_StubEngine(), params, checkpoints.Layout(16, 1, 2), 0,
                             tmp_path / "checkpoints", "hash")
    loop = engine_module._Loop(run, engine_module._Validation(RegressionData(4), None), None, [])
    loop.window.add({"loss": 2.0})
    with pytest.raises(_Collective):
        loop._close_window()  # the logged window (and, through the same call, skipped samples)
    with pytest.raises(_Collective):
        loop._validate()
    assert seen == [torch.device("meta")] * 2


def test_the_other_ranks_wait_for_the_conversion_outside_any_collective(tmp_path, monkeypatch):
    """NCCL aborts a collective that waits past the group's timeout (10 minutes by default): a
    barrier with a 0.5 s timeout stands for it here, and a conversion of 1.5 s for a ViT-L-14
    ZeRO-2 state on a network filesystem. Rank 1 waits on the filesystem, not in the barrier,
    and both ranks load the universal folder."""
    tag_dir = tmp_path / "step_00000010"
    tag_dir.mkdir()
    barrier = threading.Barrier(2, timeout=0.5)

    def nccl_barrier(*args, **kwargs):
        barrier.wait()  # BrokenBarrierError once the timeout passes, as NCCL's watchdog aborts

    def slow_conversion(cmd, **kwargs):
        time.sleep(1.5)
        out = tmp_path / cmd[cmd.index("--output_folder") + 1]
        out.mkdir(exist_ok=True)  # as ds_to_universal, which writes into the folder it is given
        (out / "zero").mkdir()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(checkpoints.dist, "barrier", nccl_barrier)
    monkeypatch.setattr(checkpoints.subprocess, "run", slow_conversion)
    results = _both_ranks(tmp_path)
    assert results == {0: tag_dir, 1: tag_dir}
    assert (tag_dir / checkpoints.UNIVERSAL_DIR).is_dir()


def test_a_failed_conversion_stops_the_waiting_ranks_with_its_cause(tmp_path, monkeypatch):
    (tmp_path / "step_00000010").mkdir()
    barrier = threading.Barrier(2, timeout=5)
    monkeypatch.setattr(checkpoints.dist, "barrier", lambda *a, **k: barrier.wait())
    monkeypatch.setattr(checkpoints.subprocess, "run", lambda cmd, **kwargs: (
        time.sleep(0.3), subprocess.CompletedProcess(cmd, 1, "", "no optimizer states"))[1])
    results = _both_ranks(tmp_path)
    assert all(isinstance(r, RuntimeError) for r in results.values())
    assert "rank 0 could not convert" in str(results[1])
    assert "no optimizer states" in str(results[1])


def _both_ranks(root):
    results = {}

    def rank(r: int) -> None:
        try:
            results[r] = checkpoints.convert_to_universal(root, "step_00000010", r, poll_s=0.05)
        except Exception as err:  # noqa: BLE001 - compared by the test
            results[r] = err

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


@pytest.fixture
def tf32_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tf32_is_a_parameter_on_at_real_scale(tmp_path, project_root, tf32_restored):
    """``train.tf32`` sets what TULIP's and open_clip's training scripts set (cuBLAS and cuDNN
    TF32; flags only on the CPU); conf/sharegpt4v turns it on for both TULIP stages, the
    embedded default leaves torch's default and the runs' fingerprints as they were."""
    import yaml

    from tests.conftest import DS_FP32, small_train_params
    from tests.training.toy_tasks import RegressionData, RegressionTask
    from tulip_pipelines.training.engine import train

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    train(RegressionTask(), RegressionData(64), small_train_params(tmp_path, max_steps=2,
                                                                   tf32=True), DS_FP32)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    for stage in ("distill", "expand"):
        conf = yaml.safe_load((project_root / "conf" / "sharegpt4v" /
                               f"parameters_{stage}.yml").read_text())
        assert conf[stage]["train"]["tf32"] is True, stage
        base = yaml.safe_load((project_root / "conf" / "base" /
                               f"parameters_{stage}.yml").read_text())
        assert "tf32" not in base[stage]["train"], stage
    assert "tf32" not in small_train_params(tmp_path).fingerprint_fields()
    assert small_train_params(tmp_path, tf32=True).fingerprint_fields()["tf32"] is True


def test_bf16_weights_reduce_their_gradients_in_float32(tmp_path):
    """DeepSpeed's ``communication_data_type`` defaults to the weights' dtype: with
    ``precision: bf16`` the gradients would be all-reduced in bfloat16. The engine's config asks
    for float32 (an explicit choice in params:deepspeed stays), and DeepSpeed takes it."""
    from tests.conftest import small_train_params
    from tests.training.toy_tasks import RegressionTask
    from tulip_pipelines.training.deepspeed_setup import (
        init_distributed,
        initialize_engine,
        prepare_ds_config,
    )

    base = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 1}
    bf16 = small_train_params(tmp_path, precision="bf16")
    config = prepare_ds_config(base, bf16, world_size=1)
    assert config["bf16"] == {"enabled": True} and config["communication_data_type"] == "fp32"
    kept = prepare_ds_config({**base, "communication_data_type": "bf16"}, bf16, world_size=1)
    assert kept["communication_data_type"] == "bf16"
    for precision in ("fp32", "amp_bf16"):  # float32 gradients: nothing to say
        other = prepare_ds_config(base, small_train_params(tmp_path, precision=precision), 1)
        assert "communication_data_type" not in other
    init_distributed()
    engine, _ = initialize_engine(RegressionTask(), bf16, config)
    try:
        assert engine.communication_data_type == torch.float32
        assert next(engine.module.head.parameters()).dtype == torch.bfloat16
    finally:
        engine.destroy()


def test_bfloat16_emulated_on_an_older_gpu_is_named(monkeypatch, caplog):
    """Below compute capability 8.0 torch emulates bfloat16 (``is_bf16_supported`` says True
    only with emulation): the run says so rather than training slower than fp32 in silence."""
    import logging

    from tulip_pipelines.training.deepspeed_setup import warn_if_bf16_emulated

    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)  # a V100
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with caplog.at_level(logging.WARNING):
        warn_if_bf16_emulated("fp32", torch.device("cuda", 0))
        warn_if_bf16_emulated("amp_bf16", torch.device("cpu"))
        assert not caplog.records
        warn_if_bf16_emulated("amp_bf16", torch.device("cuda", 0))
    assert "emulates" in caplog.text and "Tesla V100" in caplog.text
