"""Teacher text embeddings: the cached ones train like the live teacher, a killed computation
resumes, and a stale cache is rebuilt (or refused), never silently reused."""

import dataclasses
import json
import logging

import pandas as pd
import pytest
import torch

from tests.conftest import DS_FP32
from tulip_pipelines.models import create_teacher
from tulip_pipelines.training.stages import DistillParams, StageInputs
from tulip_pipelines.training.stages.base import run_stage
from tulip_pipelines.training.stages.distill import embeddings_request
from tulip_pipelines.training.teacher_embeddings import (
    TeacherTextEmbeddings,
    compute_teacher_text_embeddings,
    read_manifest,
    write_part,
)

CAPTIONS = pd.DataFrame({
    "id": [f"r{i}" for i in range(24)],
    "image": [f"r{i}.png" for i in range(24)],
    "caption": [f"A {c} shape number {i}. It sits {p} on a grey ground. " * 3
                for i, (c, p) in enumerate(zip(["red", "blue", "green"] * 8,
                                               ["left", "right", "top", "bottom"] * 6))],
})
FRAMES = {"train": CAPTIONS.iloc[4:], "val": CAPTIONS.iloc[:4]}


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return create_teacher("TULIP-Tiny")


def write_cache(request, folder):
    """What the distill pipeline does: the node's parts, each stored as it comes."""
    for part in compute_teacher_text_embeddings(request, read_manifest(folder)):
        write_part(part, folder)


def _params(tmp_path, name, **overrides):
    train = {"max_steps": 6, "batch_size": 8, "lr": 2e-3, "warmup_steps": 1, "log_every": 1,
             "val_every": 3, "seed": 0}
    return DistillParams.from_params({"run_dir": str(tmp_path / name), "train": train,
                                      **overrides})


@pytest.mark.parametrize("teacher_input", ["tokens", "windows"])
def test_cached_embeddings_train_like_the_live_teacher(teacher, tmp_path, teacher_input):
    live = _params(tmp_path, f"live-{teacher_input}", teacher_embeddings="live",
                   teacher_input=teacher_input)
    cached = _params(tmp_path, f"cached-{teacher_input}", embedding_dtype="float32",
                     teacher_input=teacher_input)
    write_cache(embeddings_request(cached, teacher, FRAMES), tmp_path / "cache")
    embeddings = TeacherTextEmbeddings(tmp_path / "cache")
    assert embeddings.rows == {"train": 40, "val": 8}  # long and short rows
    histories = {}
    for name, params, cache in (("live", live, None), ("cached", cached, embeddings)):
        inputs = StageInputs({"teacher": teacher}, FRAMES, str(tmp_path),
                             teacher_text_embeddings=cache)
        histories[name] = run_stage("distill", params, inputs, DS_FP32)[1]
    for column in ("loss", "val_loss", "val_cosine"):
        assert histories["cached"][column].tolist() == pytest.approx(
            histories["live"][column].tolist(), abs=1e-5, nan_ok=True)


def test_a_killed_computation_resumes_and_gives_the_same_cache(teacher, tmp_path, monkeypatch):
    params = _params(tmp_path, "x", embedding_batch_size=8)
    request = embeddings_request(params, teacher, FRAMES)
    write_cache(request, tmp_path / "full")

    import tulip_pipelines.training.teacher_embeddings as module

    real, calls = module.teacher_text_embeddings_of, []

    def dies_after_two_chunks(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(module, "teacher_text_embeddings_of", dies_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        write_cache(request, tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="incomplete"):
        TeacherTextEmbeddings(tmp_path / "resumed")
    monkeypatch.setattr(module, "teacher_text_embeddings_of", real)
    resumed_calls = []
    monkeypatch.setattr(module, "teacher_text_embeddings_of",
                        lambda *a: resumed_calls.append(1) or real(*a))
    write_cache(request, tmp_path / "resumed")
    assert len(resumed_calls) == 6 - 2  # 40 train rows in parts of 8 (5), 8 val rows (1)
    full = TeacherTextEmbeddings(tmp_path / "full")
    resumed = TeacherTextEmbeddings(tmp_path / "resumed")
    for role in ("train", "val"):
        assert resumed.role(role).dtype == torch.float16
        assert torch.equal(resumed.role(role), full.role(role))


def test_a_stale_cache_is_rebuilt_and_refused_by_distill(teacher, tmp_path, caplog):
    params = _params(tmp_path, "stale")
    write_cache(embeddings_request(params, teacher, FRAMES), tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="tulip_pipelines.training.teacher_embeddings"):
        write_cache(embeddings_request(params, teacher, FRAMES), tmp_path / "cache")
    assert "reused" in caplog.text
    old = TeacherTextEmbeddings(tmp_path / "cache")

    changed = {"train": FRAMES["train"].assign(caption=FRAMES["train"]["caption"] + " More."),
               "val": FRAMES["val"]}
    inputs = StageInputs({"teacher": teacher}, changed, str(tmp_path),
                         teacher_text_embeddings=old)
    with pytest.raises(ValueError, match="stale"):
        run_stage("distill", params, inputs, DS_FP32)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tulip_pipelines.training.teacher_embeddings"):
        write_cache(embeddings_request(params, teacher, changed), tmp_path / "cache")
    assert "stale" in caplog.text and "rebuilding" in caplog.text
    assert TeacherTextEmbeddings(tmp_path / "cache").cache_key != old.cache_key


def test_parts_computed_by_two_processes_make_the_same_cache(teacher, tmp_path):
    """One spawned process per device (two CPU workers here, one per GPU on a GPU node): every
    part is computed once, they arrive in any order, and the cache equals the serial one."""
    params = _params(tmp_path, "x", embedding_batch_size=8)
    serial = embeddings_request(params, teacher, FRAMES)
    write_cache(serial, tmp_path / "serial")
    parallel = dataclasses.replace(serial, processes=2)
    assert [str(d) for d in parallel.workers()] == ["cpu", "cpu"]
    parts = list(compute_teacher_text_embeddings(parallel, {}))
    computed = [(p.role, p.chunk) for p in parts if p.values is not None]
    assert sorted(computed) == [("train", i) for i in range(5)] + [("val", 0)]
    for part in parts:
        write_part(part, tmp_path / "parallel")
    one = TeacherTextEmbeddings(tmp_path / "serial")
    two = TeacherTextEmbeddings(tmp_path / "parallel")
    assert one.cache_key == two.cache_key
    for role in ("train", "val"):
        assert torch.equal(one.role(role), two.role(role))


def test_a_cache_written_before_parts_were_a_set_resumes(teacher, tmp_path):
    """Older manifests count parts (``chunks: n``, parts 0..n-1); they resume and load."""
    params = _params(tmp_path, "x", embedding_batch_size=8)
    request = embeddings_request(params, teacher, FRAMES)
    write_cache(request, tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    manifest["chunks"] = {"train": 3, "val": 1}  # as written before: train parts 3, 4 missing
    del manifest["parts"]
    manifest["complete"] = False
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(manifest))
    parts = list(compute_teacher_text_embeddings(request, read_manifest(tmp_path / "cache")))
    assert [(p.role, p.chunk) for p in parts if p.values is not None] == [("train", 3),
                                                                          ("train", 4)]
    for part in parts:
        write_part(part, tmp_path / "cache")
    assert len(TeacherTextEmbeddings(tmp_path / "cache").role("train")) == 40


def _changed(teacher, name, delta=1e-3):
    """A copy of ``teacher`` whose parameter ``name`` moved by ``delta``."""
    import copy

    model = copy.deepcopy(teacher.model)
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(delta)
    return dataclasses.replace(teacher, model=model)


def test_the_cache_key_covers_each_thing_the_values_depend_on_and_nothing_else(teacher):
    from tulip_pipelines.training.teacher_embeddings import TeacherTextEmbeddingsRequest

    texts = {"train": ["a red circle.", "a blue square."], "val": ["a green star."]}
    base = dict(teacher=teacher, texts=texts, teacher_input="tokens", window_overlap=20,
                max_windows=5, dtype="float16", batch_size=256, device="cpu", autocast="bf16",
                processes=None)

    def key(**changes):
        return TeacherTextEmbeddingsRequest(**{**base, **changes}).cache_key()

    reference = key()
    spec = teacher.spec
    changes = {
        # the teacher: its spec, and each part of its text tower
        "spec": dict(teacher=dataclasses.replace(teacher, spec=dataclasses.replace(
            spec, extra={**spec.extra, "pretrained": "other"}))),
        "activation": dict(teacher=dataclasses.replace(teacher, spec=dataclasses.replace(
            spec, activation="gelu"))),
        "token embedding": dict(teacher=_changed(teacher, "token_embedding.weight")),
        "positions": dict(teacher=_changed(teacher, "positional_embedding")),
        "ln_final": dict(teacher=_changed(teacher, "ln_final.bias")),
        "text projection": dict(teacher=_changed(teacher, "text_projection")),
        "a text block": dict(teacher=_changed(teacher, "transformer.resblocks.0.mlp.c_fc.bias")),
        # how it reads the captions, and in which dtype they are stored
        "teacher_input": dict(teacher_input="windows"),
        "window_overlap": dict(window_overlap=21),
        "max_windows": dict(max_windows=4),
        "dtype": dict(dtype="float32"),
        # the captions: one text, their order, their split into roles, a role's name
        "a caption": dict(texts={**texts, "val": ["a green star!"]}),
        "their order": dict(texts={**texts, "train": texts["train"][::-1]}),
        "the roles' split": dict(texts={"train": texts["train"][:1],
                                        "val": [texts["train"][1], *texts["val"]]}),
        "a role's name": dict(texts={"train": texts["train"], "test": texts["val"]}),
    }
    keys = {what: key(**change) for what, change in changes.items()}
    for what, changed in keys.items():
        assert changed != reference, f"the cache key ignores {what}"
    assert len(set(keys.values())) == len(keys)  # each change gives its own key
    # what does not change a text embedding: the image tower, the temperature, how and where
    # the values are computed (batch, device, processes; autocast on the CPU: none applies)
    same = {
        "the image tower": dict(teacher=_changed(teacher, "visual.proj")),
        "logit_scale": dict(teacher=_changed(teacher, "logit_scale")),
        "batch_size": dict(batch_size=7),
        "processes": dict(processes=2),
        "autocast on the CPU": dict(autocast=None),
    }
    for what, change in same.items():
        assert key(**change) == reference, f"the cache key depends on {what}"


def test_the_cache_key_has_the_autocast_of_an_accelerator(teacher, monkeypatch):
    """On a GPU the teacher embeds under autocast (bf16 by default): values in another dtype
    than float32 ones, so the key differs; on the CPU no autocast applies and the key is the
    same (reproduced here by placing the request on CUDA without computing anything)."""
    from tulip_pipelines.training import teacher_embeddings as module

    texts = {"train": ["a red circle."]}
    request = module.TeacherTextEmbeddingsRequest(teacher, texts, device="cpu", autocast="bf16")
    on_cpu = request.cache_key()
    monkeypatch.setattr(module, "resolve_device", lambda name: torch.device("cuda", 0))
    keys = {autocast: dataclasses.replace(request, autocast=autocast).cache_key()
            for autocast in ("bf16", "fp16", None)}
    assert keys[None] == on_cpu
    assert len(set(keys.values())) == 3


def test_distill_asks_for_the_cache_its_parameters_describe(teacher, tmp_path):
    """Each distill parameter that shapes the cache reaches the request's key."""
    base = embeddings_request(_params(tmp_path, "x"), teacher, FRAMES).cache_key()
    for name, value in {"teacher_input": "windows", "window_overlap": 3, "max_windows": 2,
                        "embedding_dtype": "float32", "rows": "long"}.items():
        params = _params(tmp_path, "x", **{name: value})
        assert embeddings_request(params, teacher, FRAMES).cache_key() != base, name
    for name, value in {"embedding_batch_size": 3, "embedding_processes": 2,
                        "embedding_device": "cpu"}.items():
        params = _params(tmp_path, "x", **{name: value})
        assert embeddings_request(params, teacher, FRAMES).cache_key() == base, name
