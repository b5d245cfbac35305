"""prepare_images: shards with a wids index, quarantine of unreadable images, restart after a
kill, node ranks, and reading the prepared images back by record id."""

import hashlib
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.image_helpers import decode_index, write_images
from tulip_pipelines.data.images import (
    FolderImages,
    PreparedImages,
    StaleImagesError,
    image_source_from_dict,
)
from tulip_pipelines.data.prepare import (
    CountMismatchError,
    PrepareImagesParams,
    prepare_images,
    reconcile,
)
from tulip_pipelines.data.shards import Encoding

ENCODING = Encoding(size=24, quality=95, subsampling="4:4:4")


def params(tmp_path: Path, **kw) -> PrepareImagesParams:
    return PrepareImagesParams(**{"output_dir": str(tmp_path / "prepared"), "shard_size": 4,
                                  "num_workers": 0, **kw})


def files(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_corrupt_images_are_quarantined_and_counts_reconcile(tmp_path, caplog):
    frame = write_images(tmp_path / "images", 10)
    root = tmp_path / "images"
    jpeg = (root / "sub/3.jpg").read_bytes()
    (root / "sub/3.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    (root / "sub/6.jpg").write_bytes(b"")  # zero bytes
    (root / "sub/8.jpg").unlink()  # gone since ingest
    val, train = frame.iloc[:2], frame.iloc[2:].reset_index(drop=True)

    with caplog.at_level(logging.INFO):
        result = prepare_images(train, val, root, params(tmp_path), ENCODING)

    rejected = result.rejected
    assert rejected[["split", "index", "id", "reason"]].values.tolist() == [
        ["train", 1, "rec-3", "unreadable_image"],
        ["train", 4, "rec-6", "unreadable_image"],
        ["train", 6, "rec-8", "image_not_found"],
    ]
    assert "sub/3.jpg" in rejected["detail"][0] and "OSError" in rejected["detail"][0]
    assert "sub/6.jpg" in rejected["detail"][1]
    assert "UnidentifiedImageError" in rejected["detail"][1]
    assert "10 records in = 7 written + 3 rejected" in caplog.text
    source = result.source
    assert source.info["n_samples"] == 7 and source.info["n_rejected"] == 3
    index = json.loads((tmp_path / "prepared/index.json").read_text())
    assert [s["nsamples"] for s in index["shardlist"]] == [3, 3, 1]  # shards of 4, minus rejects
    handles = source.locate(frame["id"].tolist(), frame["image"].tolist())
    assert [h is None for h in handles] == [i in (3, 6, 8) for i in range(10)]
    with pytest.raises(CountMismatchError):
        reconcile(10, 7, rejected.iloc[:2])


def test_images_are_read_back_by_record_id_resized_with_their_aspect(tmp_path):
    frame = write_images(tmp_path / "images", 9)
    val, train = frame.iloc[:3], frame.iloc[3:]
    source = prepare_images(train, val, tmp_path / "images", params(tmp_path), ENCODING).source

    # a shuffled request order: each id gets its own image
    order = [7, 0, 4, 8, 2]
    ids = [f"rec-{i}" for i in order]
    handles = source.locate(ids, [f"sub/{i}.jpg" for i in order])
    for i, handle in zip(order, handles):
        image = source.open(handle)
        assert decode_index(image) == i
        assert image.size == ((36, 24) if i % 2 else (24, 36))  # shortest side 24, aspect kept
    # a record the preparation never saw, or whose image changed, is an error, not a wrong image
    with pytest.raises(StaleImagesError, match="'rec-99'"):
        source.locate(["rec-99"], ["sub/99.jpg"])
    with pytest.raises(StaleImagesError, match="rec-1.*other.jpg"):
        source.locate(["rec-1"], ["sub/other.jpg"])
    # an opened source pickles (to DataLoader workers) and reopens there
    again = pickle.loads(pickle.dumps(source))
    assert decode_index(again.open(handles[0])) == order[0]
    # its JSON description (the catalog entry, the launcher's spec) builds the same source
    copy = image_source_from_dict(json.loads(json.dumps(source.to_dict())))
    assert isinstance(copy, PreparedImages) and decode_index(copy.open(handles[1])) == order[1]


def test_a_killed_preparation_continues_and_writes_the_same_shards(tmp_path):
    frame = write_images(tmp_path / "images", 22)
    val, train = frame.iloc[:4], frame.iloc[4:]
    root, out = tmp_path / "images", tmp_path / "prepared"
    # the uninterrupted preparation, with a pool of two writer processes
    prepare_images(train, val, root, params(tmp_path, num_workers=2), ENCODING)
    reference = files(out)
    assert len([f for f in reference if f.endswith(".tar")]) == 6

    # the state a kill leaves: shards 0-2 complete, shard 3 half written under its temporary
    # name, shard 4 renamed but its manifest not yet, shard 5 never started, no index
    shards = out / "shards"
    tar3 = (shards / "images-000003.tar").read_bytes()
    (shards / "images-000003.tar").unlink()
    (shards / "images-000003.json").unlink()
    (shards / "images-000003.tar.partial").write_bytes(tar3[: len(tar3) // 2])
    (shards / "images-000004.json").unlink()
    for name in ("images-000005.tar", "images-000005.json"):
        (shards / name).unlink()
    for name in ("index.json", "records.parquet"):
        (out / name).unlink()
    kept = {n: (shards / n).stat().st_mtime_ns for n in ("images-000000.tar", "images-000002.tar")}

    result = prepare_images(train, val, root, params(tmp_path), ENCODING)
    assert files(out) == reference  # byte for byte, index and records table included
    assert not list(shards.glob("*.partial"))
    assert {n: (shards / n).stat().st_mtime_ns for n in kept} == kept  # complete: not rewritten
    assert result.source.info["n_samples"] == 22


def test_changed_inputs_or_encoding_rewrite_only_the_shards_they_touch(tmp_path):
    frame = write_images(tmp_path / "images", 12)
    root, shards = tmp_path / "images", tmp_path / "prepared" / "shards"
    prepare_images(frame.iloc[4:], frame.iloc[:4], root, params(tmp_path), ENCODING)
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.tar")}
    # a shorter training set (max_train) keeps the earlier shards, drops the last
    prepare_images(frame.iloc[4:8], frame.iloc[:4], root, params(tmp_path), ENCODING)
    after = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.tar")}
    assert after == {k: v for k, v in before.items() if k != "images-000002.tar"}
    # another JPEG quality rewrites every shard
    prepare_images(frame.iloc[4:8], frame.iloc[:4], root, params(tmp_path),
                   Encoding(24, 80, "4:2:0"))
    assert all(p.stat().st_mtime_ns != after[p.name] for p in shards.glob("*.tar"))


def test_node_ranks_split_the_shards_and_a_last_run_writes_the_index(tmp_path, caplog):
    frame = write_images(tmp_path / "images", 12)
    root, out = tmp_path / "images", tmp_path / "prepared"
    args = (frame.iloc[4:], frame.iloc[:4], root)
    first = prepare_images(*args, params(tmp_path, num_nodes=2, node_rank=1), ENCODING)
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == ["images-000001.tar"]
    assert first.source.info["complete"] is False and not (out / "index.json").exists()
    prepare_images(*args, params(tmp_path, num_nodes=2, node_rank=0), ENCODING)
    with caplog.at_level(logging.INFO):
        last = prepare_images(*args, params(tmp_path), ENCODING)
    assert "3 complete from an earlier run, 0 to write" in caplog.text
    assert last.source.info["complete"] is True and last.source.info["n_samples"] == 12


def test_disabled_preparation_reads_the_original_folder(tmp_path):
    frame = write_images(tmp_path / "images", 2)
    result = prepare_images(frame, frame.iloc[:0], tmp_path / "images",
                            params(tmp_path, enabled=False), None)
    assert isinstance(result.source, FolderImages) and result.rejected.empty
    assert not (tmp_path / "prepared").exists()
    assert decode_index(result.source.open("sub/1.jpg")) == 1


def test_duplicate_ids_across_the_tables_are_an_error(tmp_path):
    frame = write_images(tmp_path / "images", 3)
    with pytest.raises(ValueError, match="'rec-0' appears 2 times"):
        prepare_images(frame, frame.iloc[:1], tmp_path / "images", params(tmp_path), ENCODING)


def test_params_are_checked_and_the_size_defaults_to_the_teachers_input():
    with pytest.raises(ValueError) as err:
        PrepareImagesParams(quality=0, subsampling="4:1:1", shard_size=0, num_nodes=2,
                            node_rank=2)
    for name in ("quality", "subsampling", "shard_size", "node_rank"):
        assert f"prepare_images.{name}" in str(err.value)
    assert PrepareImagesParams().encoding("TULIP-Tiny").size == 48
    assert PrepareImagesParams().encoding("ViT-L-14").size == 224
    assert PrepareImagesParams(size=336).encoding(None).size == 336
    with pytest.raises(ValueError, match="teacher_model_name"):
        PrepareImagesParams().check_with({"teacher_model_name": None})


def test_draft_decoding_of_the_original_files_gives_the_same_tensor_size(tmp_path):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(size=224), is_train=False)
    y, x = np.mgrid[0:1500, 0:1000]
    pixels = np.stack([x * 255 // 999, y * 255 // 1499, 128 + 100 * np.sin(x / 60.0)], axis=-1)
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "big.jpg", quality=90)
    source = FolderImages(tmp_path)
    full = source.open("big.jpg")
    draft = source.open("big.jpg", min_size=224)
    assert full.size == (1000, 1500) and draft.size == (250, 375)  # decoded at 1/4 scale
    assert preprocess(draft).shape == preprocess(full).shape == (3, 224, 224)
    assert (preprocess(draft) - preprocess(full)).abs().mean() < 0.02  # the same picture


def _keys(records, encoding=ENCODING, shard_size=2):
    import pandas as pd

    from tulip_pipelines.data.prepare import plan_shards

    frame = pd.DataFrame(records, columns=["id", "image"])
    return [t.cache_key for t in plan_shards(frame, "root", Path("out"), encoding, shard_size)]


RECORDS = [("a", "x/a.jpg"), ("b", "x/b.jpg"), ("c", "x/c.jpg"), ("d", "x/d.jpg")]


def test_a_shards_key_covers_its_records_and_every_encoding_setting():
    base = _keys(RECORDS)
    assert len(base) == 2 and base[0] != base[1]
    # each encoding setting, one at a time, changes every shard's key
    for what, encoding in {"size": Encoding(25, 95, "4:4:4"),
                           "quality": Encoding(24, 94, "4:4:4"),
                           "subsampling": Encoding(24, 95, "4:2:0"),
                           "draft decoding": Encoding(24, 95, "4:4:4", draft=False)}.items():
        changed = _keys(RECORDS, encoding)
        assert changed[0] != base[0] and changed[1] != base[1], what
    # a record's id or image changes its shard's key, not the other shard's
    for what, records in {"id": [("a", "x/a.jpg"), ("B", "x/b.jpg"), *RECORDS[2:]],
                          "image": [("a", "x/a.jpg"), ("b", "x/B.jpg"), *RECORDS[2:]],
                          "order": [RECORDS[1], RECORDS[0], *RECORDS[2:]]}.items():
        changed = _keys(records)
        assert changed[0] != base[0] and changed[1] == base[1], what
    # the same records and encoding give the same keys (a rerun skips the shards)
    assert _keys(list(RECORDS)) == base
    # a record moved into another shard changes both shards' keys
    moved = _keys(RECORDS, shard_size=3)
    assert moved[0] != base[0] and moved[1] != base[1]


def test_the_shard_size_from_the_teacher_is_open_clips_input_size():
    """With ``size`` unset, the shards store the teacher's input side as open_clip's own
    transforms resize to it."""
    import open_clip

    from tulip_pipelines.models.configs import register_tiny_configs

    register_tiny_configs()
    for name in ("TULIP-Tiny", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"):
        size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
        expected = open_clip.image_transform(size, is_train=False).transforms[0].size
        expected = max(expected) if isinstance(expected, (list, tuple)) else expected
        assert PrepareImagesParams().encoding(name).size == expected, name
    assert PrepareImagesParams().encoding("ViT-L-14-336").size == 336
    assert PrepareImagesParams(size=100).encoding("ViT-L-14").size == 100
    defaults = PrepareImagesParams().encoding("ViT-L-14")
    assert (defaults.quality, defaults.subsampling, defaults.draft) == (95, "4:4:4", True)


# field -> (values at the bound, accepted; one step past it, rejected)
PREPARE_BOUNDS = {"size": ([1, None], [0]), "quality": ([1, 100], [0, 101]),
                  "shard_size": ([1], [0]), "num_workers": ([0, None], [-1]),
                  "num_nodes": ([1], [0]), "node_rank": ([0], [-1])}


@pytest.mark.parametrize("name", sorted(PREPARE_BOUNDS))
def test_each_bound_accepts_its_edge_and_rejects_one_step_past(name):
    from tests.bounds import assert_bounds

    accepted, rejected = PREPARE_BOUNDS[name]
    assert_bounds(PrepareImagesParams, name, accepted, rejected)


def test_the_last_node_rank_is_one_below_the_number_of_nodes():
    from tests.bounds import assert_bounds

    assert_bounds(lambda **v: PrepareImagesParams(num_nodes=3, **v), "node_rank", [0, 2], [3])
