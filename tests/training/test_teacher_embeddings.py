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
from tulip_pipelines.training.stages.distill import embeddings_request
from tulip_pipelines.training.stages.run import run_stage
from tulip_pipelines.training.teacher_embeddings import (
    TeacherTextEmbeddings,
    compute_teacher_embeddings,
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
    for part in compute_teacher_embeddings(request, read_manifest(folder)):
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
                             teacher_embeddings=cache)
        histories[name] = run_stage("distill", params, inputs, DS_FP32)[1]
    for column in ("loss", "val_loss", "val_cosine"):
        assert histories["cached"][column].tolist() == pytest.approx(
            histories["live"][column].tolist(), abs=1e-5, nan_ok=True)


def test_a_killed_computation_resumes_and_gives_the_same_cache(teacher, tmp_path, monkeypatch):
    params = _params(tmp_path, "x", embedding_batch_size=8)
    request = embeddings_request(params, teacher, FRAMES)
    write_cache(request, tmp_path / "full")

    import tulip_pipelines.training.teacher_embeddings as module

    real, calls = module.embed_texts, []

    def dies_after_two_chunks(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(module, "embed_texts", dies_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        write_cache(request, tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="incomplete"):
        TeacherTextEmbeddings(tmp_path / "resumed")
    monkeypatch.setattr(module, "embed_texts", real)
    resumed_calls = []
    monkeypatch.setattr(module, "embed_texts",
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
    inputs = StageInputs({"teacher": teacher}, changed, str(tmp_path), teacher_embeddings=old)
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
    parts = list(compute_teacher_embeddings(parallel, {}))
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
    parts = list(compute_teacher_embeddings(request, read_manifest(tmp_path / "cache")))
    assert [(p.role, p.chunk) for p in parts if p.values is not None] == [("train", 3),
                                                                          ("train", 4)]
    for part in parts:
        write_part(part, tmp_path / "cache")
    assert len(TeacherTextEmbeddings(tmp_path / "cache").role("train")) == 40
