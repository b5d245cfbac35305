"""Where models run outside DeepSpeed (models/device.py): ``auto`` resolves to the accelerator when
there is one, and every forward of the evaluation and of the teacher text embeddings happens on
the resolved device (on the CPU here: each forward is checked to run inside the move to that
device, with the model's weights there; a GPU run checks the rest, bench/gpu_check.py)."""

import pandas as pd
import pytest
import torch

import tulip_pipelines.evaluation.encode as encode_module
import tulip_pipelines.evaluation.evaluate
import tulip_pipelines.training.teacher_embeddings as embeddings_module
from tulip_pipelines.evaluation.evaluate import EvaluateParams, score
from tulip_pipelines.evaluation.readers import read_urban1k
from tulip_pipelines.models import build_student, create_teacher
from tulip_pipelines.models.device import inference_autocast, on_device, resolve_device
from tulip_pipelines.training.teacher_embeddings import (
    TeacherTextEmbeddingsRequest,
    compute_teacher_text_embeddings,
)


def test_auto_is_the_local_accelerator_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")  # a launched rank's own GPU
    assert resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu")


def test_no_autocast_on_the_cpu():
    with inference_autocast(torch.device("cpu"), "bf16"):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


class Placement:
    """Records every encoder forward with the device it ran on and the device the caller's move
    (``on_device``) had put the model on at that moment."""

    def __init__(self, monkeypatch, *modules):
        self.calls, self.inside = [], []
        real = on_device

        def spying(model, device):
            class Moved:
                def __enter__(inner):
                    inner.context = real(model, device)
                    inner.context.__enter__()
                    self.inside.append((id(model), device))
                    return model

                def __exit__(inner, *exc):
                    self.inside.pop()
                    return inner.context.__exit__(*exc)

            return Moved()

        for module in modules:
            monkeypatch.setattr(module, "on_device", spying)

    def watch(self, model):
        for name in ("encode_image", "encode_text"):
            original = getattr(model, name)

            def wrapped(x, *args, _original=original, _name=name, **kwargs):
                weights = next(model.parameters()).device
                moved = [d for m, d in self.inside if m == id(model)]
                self.calls.append((_name, x.device, weights, moved[-1] if moved else None))
                return _original(x, *args, **kwargs)

            setattr(model, name, wrapped)


def _urban(root):
    from PIL import Image
    for i in range(4):
        (root / "image").mkdir(parents=True, exist_ok=True)
        (root / "caption").mkdir(exist_ok=True)
        Image.new("RGB", (60, 40), (60 * i, 20, 200)).save(root / "image" / f"u{i}.jpg")
        (root / "caption" / f"u{i}.txt").write_text(f"A picture number {i}. " * 10)
    return read_urban1k(root, name="urban", kind="long")


def test_every_evaluation_forward_runs_on_the_resolved_device(tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    models = {"teacher": teacher, "student": build_student(teacher, 248)}
    placement = Placement(monkeypatch, encode_module)
    for bundle in models.values():
        placement.watch(bundle.model)
    params = EvaluateParams.from_params({"ks": [1], "batch_size": 2, "tokens_read": [20, 77],
                                         "bootstrap_resamples": 10, "device": "cpu"})
    score(models, {"urban": _urban(tmp_path / "urban")}, params)
    expected = resolve_device("cpu")
    kinds = {name for name, *_ in placement.calls}
    assert kinds == {"encode_image", "encode_text"} and len(placement.calls) > 6
    for name, inputs, weights, moved_to in placement.calls:
        assert moved_to == expected, f"{name} ran outside the move to {expected}"
        assert inputs == weights == expected


def test_the_teacher_embeds_on_the_resolved_device(monkeypatch):
    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    placement = Placement(monkeypatch, embeddings_module)
    placement.watch(teacher.model)
    texts = {"train": [f"caption {i}. More words here." for i in range(5)]}
    request = TeacherTextEmbeddingsRequest(teacher, texts, batch_size=2, device="cpu")
    parts = list(compute_teacher_text_embeddings(request, {}))
    assert sum(p.values is not None for p in parts) == 3  # 5 rows in parts of 2
    assert all(p.values.dtype == torch.float16 for p in parts if p.values is not None)
    assert [c[0] for c in placement.calls] == ["encode_text"] * 3
    for _, inputs, weights, moved_to in placement.calls:
        assert moved_to == inputs == weights == torch.device("cpu")


def test_the_autocast_of_the_embeddings_is_in_their_cache_key_only_where_it_acts(monkeypatch):
    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    texts = {"train": ["a caption."]}
    on_cpu = {a: TeacherTextEmbeddingsRequest(teacher, texts, device="cpu", autocast=a).cache_key()
              for a in ("bf16", None)}
    assert on_cpu["bf16"] == on_cpu[None]  # no autocast on the CPU: the same values
    monkeypatch.setattr(embeddings_module, "resolve_device", lambda name: torch.device("cuda"))
    on_gpu = {a: TeacherTextEmbeddingsRequest(teacher, texts, autocast=a).cache_key()
              for a in ("bf16", None)}
    assert on_gpu["bf16"] != on_gpu[None] and on_gpu[None] == on_cpu[None]


def test_a_device_that_is_not_here_is_a_parameter_problem(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="evaluate.device.*no CUDA device"):
        EvaluateParams.from_params({"device": "cuda"})


def test_models_spread_over_the_devices_score_as_one_device_does(tmp_path, monkeypatch):
    """``parallel_models``: every model on its own device at once (two CPU threads here, one per
    GPU on a GPU node), results in the models' order and equal to the serial scoring. The image
    loaders those threads start do not fork the multithreaded process (a forked child can
    inherit a lock another thread held, CUDA's or the allocator's, and deadlock): their workers
    come from a forkserver."""
    import threading

    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    models = {"teacher": teacher, "student": build_student(teacher, 248),
              "other": create_teacher("TULIP-Tiny")}
    bench = {"urban": _urban(tmp_path / "urban")}
    base = {"ks": [1, 5], "batch_size": 2, "tokens_read": [20, 248], "bootstrap_resamples": 20,
            "device": "cpu"}
    serial = score(models, bench, EvaluateParams.from_params(base))
    threads = set()
    real = encode_module.encode_tokens

    def recording(*args, **kwargs):
        threads.add(threading.get_ident())
        return real(*args, **kwargs)

    contexts = []

    class RecordingLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            contexts.append((threading.get_ident(), self.multiprocessing_context))

    monkeypatch.setattr(tulip_pipelines.evaluation.evaluate, "encode_tokens", recording)
    monkeypatch.setattr(encode_module, "DataLoader", RecordingLoader)
    spread = score(models, bench, EvaluateParams.from_params(
        {**base, "parallel_models": 2, "num_workers": 1}))
    assert len(threads) == 2  # two workers encoded texts
    assert len({thread for thread, _ in contexts}) == 2  # each device thread loaded images
    assert all(c is not None and c.get_start_method() in ("forkserver", "spawn")
               for _, c in contexts), contexts
    pd.testing.assert_frame_equal(spread.metrics, serial.metrics)
    pd.testing.assert_frame_equal(spread.by_tokens_read, serial.by_tokens_read)
    pd.testing.assert_frame_equal(spread.by_caption_length, serial.by_caption_length)
