"""Ingest validation: one test per rejection reason, a mixed file that reconciles, bad JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from tulip_pipelines.data.annotations import AnnotationFile, AnnotationFormatError, iter_records
from tulip_pipelines.data.ingest import (
    CountMismatchError,
    IngestParams,
    IngestStats,
    iter_ingest_batches,
)
from tulip_pipelines.data.paths import check_image_path
from tulip_pipelines.data.records import Reason, validate_record


def record(i: int, caption: str = "A red circle on a grey background.", **overrides) -> dict:
    rec = {
        "id": f"{i:012d}",
        "image": f"coco/train2017/{i:012d}.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."},
            {"from": "gpt", "value": caption},
        ],
    }
    rec.update(overrides)
    return rec


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "coco" / "train2017").mkdir(parents=True)
    for i in range(20):
        (root / "coco" / "train2017" / f"{i:012d}.jpg").write_bytes(b"jpg")
    return root


def check(rec, image_root: Path, check_images: bool = True, seen: dict | None = None):
    return validate_record(7, rec, image_root.resolve(), check_images, {} if seen is None else seen)


def test_valid_record_is_kept_with_stripped_caption_and_source(image_root):
    row, rejection = check(record(3, caption="  A long caption.\n"), image_root)
    assert rejection is None
    assert row.id == "000000000003"
    assert row.image == "coco/train2017/000000000003.jpg"
    assert row.caption == "A long caption."
    assert row.source == "coco"


@pytest.mark.parametrize("rec", [[1, 2], "text", 3, None])
def test_not_an_object(rec, image_root):
    row, rejection = check(rec, image_root)
    assert row is None and rejection.reason is Reason.NOT_AN_OBJECT
    assert "record 7" in rejection.detail


@pytest.mark.parametrize("image", [None, 12, "", "   "])
def test_missing_or_non_string_image(image, image_root):
    rec = record(1, image=image)
    if image is None:
        del rec["image"]
    row, rejection = check(rec, image_root)
    assert row is None and rejection.reason is Reason.MISSING_IMAGE
    assert "'image'" in rejection.detail


def test_missing_conversations(image_root):
    rec = record(1)
    del rec["conversations"]
    row, rejection = check(rec, image_root)
    assert row is None and rejection.reason is Reason.MISSING_CONVERSATIONS
    row, rejection = check(record(1, conversations="not a list"), image_root)
    assert rejection.reason is Reason.MISSING_CONVERSATIONS


def test_no_gpt_turn(image_root):
    rec = record(1, conversations=[{"from": "human", "value": "<image>\nhi"}])
    row, rejection = check(rec, image_root)
    assert row is None and rejection.reason is Reason.NO_GPT_TURN


@pytest.mark.parametrize("caption", ["", "  \n ", None, ["a list"]])
def test_empty_caption(caption, image_root):
    row, rejection = check(record(1, caption=caption), image_root)
    assert row is None and rejection.reason is Reason.EMPTY_CAPTION
    assert "value" in rejection.detail


@pytest.mark.parametrize(
    "image", ["/etc/passwd", "../secret.jpg", "coco/../../secret.jpg", "C:\\x.jpg", "\\\\host\\x"]
)
def test_absolute_or_escaping_image_path(image, image_root):
    # rejected on the path alone, whether or not images are checked
    for check_images in (True, False):
        row, rejection = check(record(1, image=image), image_root, check_images)
        assert row is None and rejection.reason is Reason.UNSAFE_IMAGE_PATH
        assert repr(image) in rejection.detail


def test_inner_dotdot_that_stays_inside_is_normalised():
    assert check_image_path("coco/x/../train2017/1.jpg") == "coco/train2017/1.jpg"
    assert check_image_path("./sam/a.jpg") == "sam/a.jpg"


def test_symlink_escaping_the_root_is_rejected(image_root, tmp_path):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"x")
    os.symlink(outside, image_root / "coco" / "link.jpg")
    row, rejection = check(record(1, image="coco/link.jpg"), image_root)
    assert row is None and rejection.reason is Reason.UNSAFE_IMAGE_PATH


def test_missing_image_file_and_the_switch_to_skip_the_check(image_root):
    rec = record(99)  # no such file
    row, rejection = check(rec, image_root)
    assert row is None and rejection.reason is Reason.IMAGE_NOT_FOUND
    assert "000000000099.jpg" in rejection.detail
    row, rejection = check(rec, image_root, check_images=False)
    assert rejection is None and row.id == "000000000099"


def test_duplicate_id_names_the_first_kept_index(image_root):
    seen: dict[str, int] = {}
    first, _ = validate_record(2, record(1), image_root.resolve(), True, seen)
    assert first is not None
    row, rejection = validate_record(5, record(1), image_root.resolve(), True, seen)
    assert row is None and rejection.reason is Reason.DUPLICATE_ID
    assert "kept record 2" in rejection.detail


def test_rejected_record_does_not_claim_its_id(image_root):
    seen: dict[str, int] = {}
    _, rejection = validate_record(0, record(1, caption=""), image_root.resolve(), True, seen)
    assert rejection.reason is Reason.EMPTY_CAPTION
    row, rejection = validate_record(1, record(1), image_root.resolve(), True, seen)
    assert rejection is None and row is not None


def test_ids_missing_integer_and_invalid(image_root):
    rec = record(1)
    del rec["id"]
    row, _ = check(rec, image_root)
    assert row.id == "coco/train2017/000000000001.jpg"  # documented fallback: the image path
    row, _ = check(record(1, id=42), image_root)
    assert row.id == "42"
    row, rejection = check(record(1, id=["x"]), image_root)
    assert row is None and rejection.reason is Reason.INVALID_ID


def write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_mixed_file_reconciles_across_batches(tmp_path, image_root):
    good = [record(i) for i in range(12)]
    no_gpt = record(13, conversations=[{"from": "human", "value": "x"}])
    no_conv = {"id": "c", "image": "coco/train2017/000000000014.jpg"}
    records = good[:5] + [
        "not an object",
        record(15, image=None),
        no_conv,
        no_gpt,
        record(16, caption=" "),
        record(17, image="../../etc/passwd"),
        record(99),  # image file missing
        record(3),  # duplicate of index 3
    ] + good[5:]
    path = write(tmp_path / "ann.json", records)
    stats = IngestStats()
    batches = list(iter_ingest_batches(path, image_root, True, batch_size=4, stats=stats))
    assert len(batches) == 5  # 20 records / 4
    kept = [df for df, _ in batches]
    rejected = [df for _, df in batches]
    n_kept = sum(len(df) for df in kept)
    n_rej = sum(len(df) for df in rejected)
    assert stats.n_in == len(records) == n_kept + n_rej
    assert n_kept == 12 and n_rej == 8
    table_only = (Reason.MISSING_CAPTION, Reason.INVALID_CAPTION, Reason.MALFORMED_ROW)
    expected = {r.value: 1 for r in Reason
                if r not in (Reason.INVALID_ID, Reason.UNREADABLE_IMAGE, *table_only)}
    assert stats.reasons == expected  # unreadable_image: tests/data/test_ingest_decode.py
    rej = pd.concat(rejected, ignore_index=True)
    assert list(rej["index"]) == [5, 6, 7, 8, 9, 10, 11, 12]
    assert rej.loc[rej["reason"] == "duplicate_id", "id"].item() == "000000000003"
    assert pd.isna(rej.loc[rej["reason"] == "not_an_object", "id"].item())
    cap = pd.concat(kept, ignore_index=True)
    assert list(cap.columns) == ["id", "image", "caption", "source", "n_chars"]
    assert list(cap["id"]) == [f"{i:012d}" for i in range(12)]
    assert (cap["n_chars"] == cap["caption"].str.len()).all()
    # every batch has the same columns and dtypes, empty or not
    for df in rejected:
        assert df.dtypes.to_dict() == rejected[0].dtypes.to_dict()


def test_partial_last_batch_is_written_and_counted(tmp_path, image_root):
    path = write(tmp_path / "ann.json", [record(i) for i in range(10)] + [record(99)])
    stats = IngestStats()
    batches = list(iter_ingest_batches(path, image_root, True, batch_size=4, stats=stats))
    assert [len(kept) + len(rej) for kept, rej in batches] == [4, 4, 3]
    assert (stats.n_in, stats.n_kept, stats.n_rejected) == (11, 10, 1)


def test_counts_that_do_not_reconcile_raise_count_mismatch(tmp_path, image_root):
    """Counts carried over from another file (a reused ``IngestStats``) cannot reconcile with
    what this file wrote: the check stops the ingest, naming the file and the counts."""
    first = write(tmp_path / "first.json", [record(i) for i in range(3)])
    second = write(tmp_path / "second.json", [record(i) for i in range(3, 8)])
    stats = IngestStats()
    list(iter_ingest_batches(first, image_root, True, batch_size=10, stats=stats))
    batches = iter_ingest_batches(second, image_root, True, batch_size=10, stats=stats)
    with pytest.raises(CountMismatchError, match=r"second\.json: read 8 records but wrote 5 "
                                                 r"\(8 kept \+ 0 rejected\)"):
        list(batches)


def test_empty_array_yields_one_empty_batch(tmp_path, image_root):
    path = write(tmp_path / "ann.json", [])
    batches = list(iter_ingest_batches(path, image_root, True, batch_size=10))
    assert len(batches) == 1 and batches[0][0].empty and batches[0][1].empty
    assert list(batches[0][0].columns) == ["id", "image", "caption", "source", "n_chars"]


def test_reader_streams_index_and_record(tmp_path):
    records = [record(i) for i in range(3)] + [7]
    path = write(tmp_path / "ann.json", records)
    assert list(AnnotationFile(path)) == list(enumerate(records))


@pytest.mark.parametrize(
    ("content", "offset"),
    [
        # the offset is the first byte the parser rejects: "tru" may still become "true"
        (b'[{"a": 1}, {"b": 2}, {"c": tru}]', 30),
        (b'[{"a": 1}, {"b": 2}', 19),  # truncated: fails at end of file
        (b'[{"a": 1}] trailing', 13),  # "tr" may still be "true"; "tra" cannot
        (b'[{"a": 1} {"b": 2}]', 10),
    ],
)
def test_invalid_json_names_file_and_byte_offset(tmp_path, content, offset):
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(AnnotationFormatError) as err:
        list(iter_records(path))
    assert str(path) in str(err.value)
    assert f"byte offset {offset}" in str(err.value)


def test_invalid_json_offset_beyond_the_first_read_chunk(tmp_path):
    records = json.dumps([record(i, caption="x" * 500) for i in range(5000)]).encode()
    assert len(records) > 2 * (1 << 20)
    broken = records[:-1] + b",}"  # the last byte ']' replaced by an invalid ',}'
    path = tmp_path / "big.json"
    path.write_bytes(broken)
    with pytest.raises(AnnotationFormatError, match=f"byte offset {len(broken) - 1} "):
        list(iter_records(path))


@pytest.mark.parametrize(
    ("content", "found"),
    [(b'  {"a": 1}', "{"), (b"42", "42"), (b"", "empty file"), (b" \n ", "byte offset 3")],
)
def test_top_level_value_must_be_an_array(tmp_path, content, found):
    path = tmp_path / "obj.json"
    path.write_bytes(content)
    with pytest.raises(AnnotationFormatError, match="byte offset") as err:
        list(iter_records(path))
    assert str(path) in str(err.value) and found in str(err.value)


def test_ingest_params_validation():
    assert IngestParams.from_params({}).batch_size == 50_000
    with pytest.raises(ValueError, match="check_image"):
        IngestParams.from_params({"check_image": False})
    with pytest.raises(ValueError, match="batch_size"):
        IngestParams.from_params({"batch_size": 0})
    with pytest.raises(ValueError, match="check_images"):
        IngestParams.from_params({"check_images": "no"})


def test_missing_image_root_is_a_clear_error(tmp_path):
    path = write(tmp_path / "ann.json", [record(1)])
    with pytest.raises(FileNotFoundError, match="image_root"):
        list(iter_ingest_batches(path, tmp_path / "nope", True, 10))


@pytest.mark.parametrize("name, accepted, rejected", [
    ("batch_size", [1], [0]), ("decode_workers", [1, None], [0])])
def test_each_bound_accepts_its_edge_and_rejects_one_step_past(name, accepted, rejected):
    from tests.bounds import assert_bounds
    from tulip_pipelines.data.ingest import IngestParams

    assert_bounds(IngestParams, name, accepted, rejected)
