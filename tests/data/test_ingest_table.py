"""Ingest of a captions table (CSV, TSV, JSONL, Parquet) and of WebDataset shards: the same rules
and the same ``captions`` table as ShareGPT4V's JSON, and the bad inputs of each format."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tulip_pipelines.data.ingest import IngestParams, IngestStats, iter_ingest_batches
from tulip_pipelines.data.tables import MissingColumnError, TableFormatError

# (id, image, caption) of six records: two of them quarantined whatever the format
ROWS = [
    ("007", "coco/a.jpg", "  A red circle.\n"),
    ("8", "sam/b.jpg", "A blue square, with a comma; and a \"quote\"."),
    ("9", "../escape.jpg", "Outside the root."),        # unsafe_image_path
    ("10", "coco/missing.jpg", "No such file."),        # image_not_found
    ("007", "coco/c.jpg", "Same id as the first."),     # duplicate_id
    ("11", "coco/c.jpg", "Line one.\nLine two."),
]
# what the captions table must hold, written out by hand
EXPECTED = pd.DataFrame({
    "id": ["007", "8", "11"],
    "image": ["coco/a.jpg", "sam/b.jpg", "coco/c.jpg"],
    "caption": ["A red circle.", "A blue square, with a comma; and a \"quote\".",
                "Line one.\nLine two."],
    "source": ["coco", "sam", "coco"],
    "n_chars": [13, 43, 19],
})
EXPECTED_REASONS = ["unsafe_image_path", "image_not_found", "duplicate_id"]


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for name in ("coco/a.jpg", "sam/b.jpg", "coco/c.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"jpg")
    return root


def frame(rows=ROWS, columns=("id", "image", "caption")) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(columns))


def write_table(path: Path, table: pd.DataFrame) -> Path:
    """``table`` in the format of ``path``'s extension (pandas / pyarrow writers, not ours)."""
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        table.to_csv(path, index=False, sep="\t")
    elif path.suffix == ".jsonl":
        table.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), path)
    return path


def write_sharegpt4v(path: Path, rows=ROWS) -> Path:
    records = [{"id": i, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": caption}]}
        for i, image, caption in rows]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def ingest(path: Path, image_root: Path, **params
           ) -> tuple[pd.DataFrame, pd.DataFrame, IngestStats]:
    config = IngestParams(**params)
    stats = IngestStats()
    batches = list(iter_ingest_batches(path, image_root, config.check_images, batch_size=2,
                                       stats=stats, format=config.format,
                                       fields=config.fields()))
    kept = pd.concat([k for k, _ in batches], ignore_index=True)
    rejected = pd.concat([r for _, r in batches], ignore_index=True)
    assert stats.n_in == len(kept) + len(rejected)
    return kept, rejected, stats


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_each_table_format_gives_the_captions_of_the_same_records(tmp_path, image_root, suffix):
    path = write_table(tmp_path / f"captions{suffix}", frame())
    kept, rejected, stats = ingest(path, image_root, format="table",
                                   columns={"id": "id"})
    pd.testing.assert_frame_equal(kept, EXPECTED)
    assert rejected["reason"].tolist() == EXPECTED_REASONS
    assert rejected["index"].tolist() == [2, 3, 4]
    duplicate = rejected["detail"].iloc[2]
    assert "record 4" in duplicate and "kept record 0" in duplicate
    assert stats.n_in == 6


def test_jsonl_table_and_sharegpt4v_json_give_the_same_tables(tmp_path, image_root):
    table = ingest(write_table(tmp_path / "c.jsonl", frame()), image_root, format="table",
                   columns={"id": "id"})
    sharegpt = ingest(write_sharegpt4v(tmp_path / "c.json"), image_root)
    pd.testing.assert_frame_equal(table[0], sharegpt[0])
    pd.testing.assert_frame_equal(table[1][["index", "id", "reason"]],
                                  sharegpt[1][["index", "id", "reason"]])


def test_columns_are_named_by_the_parameters_and_id_defaults_to_the_image(tmp_path, image_root):
    renamed = frame([r[1:] for r in ROWS[:2]], ("file", "text"))
    path = write_table(tmp_path / "c.csv", renamed)
    kept, _, _ = ingest(path, image_root, format="table",
                        columns={"image": "file", "caption": "text"})
    assert kept["id"].tolist() == ["coco/a.jpg", "sam/b.jpg"]
    assert kept["caption"].tolist() == EXPECTED["caption"].tolist()[:2]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_a_missing_column_stops_before_any_record_naming_file_column_and_columns(
        tmp_path, image_root, suffix):
    path = write_table(tmp_path / f"c{suffix}", frame())
    batches = iter_ingest_batches(path, image_root, format="table",
                                  fields=IngestParams(format="table",
                                                      columns={"caption": "text"}).fields())
    with pytest.raises(MissingColumnError) as err:
        next(batches)
    message = str(err.value)
    assert str(path) in message and "'text'" in message and "ingest.columns.caption" in message
    assert "['id', 'image', 'caption']" in message


def test_a_tab_separated_file_named_csv_is_a_missing_column_with_a_delimiter_hint(
        tmp_path, image_root):
    path = tmp_path / "c.csv"
    frame().to_csv(path, index=False, sep="\t")
    with pytest.raises(MissingColumnError, match="wrong delimiter"):
        ingest(path, image_root, format="table")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_an_empty_file_is_a_clear_error(tmp_path, image_root, suffix):
    path = tmp_path / f"c{suffix}"
    path.write_bytes(b"")
    with pytest.raises(TableFormatError, match="empty file"):
        ingest(path, image_root, format="table")


def test_a_header_without_rows_gives_empty_tables(tmp_path, image_root):
    path = tmp_path / "c.csv"
    path.write_text("image,caption\n")
    kept, rejected, stats = ingest(path, image_root, format="table")
    assert stats.n_in == 0 and kept.empty and rejected.empty
    assert list(kept.columns) == list(EXPECTED.columns)


def test_numbers_lists_nulls_and_blanks_in_the_caption_column_are_quarantined(
        tmp_path, image_root):
    table = pa.table({"image": ["coco/a.jpg", "sam/b.jpg", "coco/c.jpg"],
                      "caption": [[1, 2], None, []]}, schema=pa.schema(
                          {"image": pa.string(), "caption": pa.list_(pa.int64())}))
    pq.write_table(table, tmp_path / "lists.parquet")
    _, rejected, _ = ingest(tmp_path / "lists.parquet", image_root, format="table")
    assert rejected["reason"].tolist() == ["invalid_caption", "missing_caption", "invalid_caption"]
    assert "'caption' is a list" in rejected["detail"].iloc[0]

    (tmp_path / "n.jsonl").write_text('{"image": "coco/a.jpg", "caption": 12}\n'
                                      '{"image": "sam/b.jpg", "caption": 3.5}\n')
    _, rejected, _ = ingest(tmp_path / "n.jsonl", image_root, format="table")
    assert rejected["reason"].tolist() == ["invalid_caption"] * 2
    assert "is a float (12.0)" in rejected["detail"].iloc[0]  # one type per JSON column

    (tmp_path / "n.csv").write_text("image,caption\ncoco/a.jpg,12\nsam/b.jpg,   \n"
                                    "coco/c.jpg,1e3 dogs\n")
    kept, rejected, _ = ingest(tmp_path / "n.csv", image_root, format="table")
    assert rejected["reason"].tolist() == ["invalid_caption", "empty_caption"]
    assert "only a number ('12')" in rejected["detail"].iloc[0]
    assert kept["caption"].tolist() == ["1e3 dogs"]


def test_a_jsonl_column_whose_type_changes_is_a_clear_error(tmp_path, image_root):
    (tmp_path / "m.jsonl").write_text('{"image": "coco/a.jpg", "caption": "text"}\n'
                                      '{"image": "sam/b.jpg", "caption": ["a", "b"]}\n')
    with pytest.raises(TableFormatError, match=r"m\.jsonl.*caption.*one type per column"):
        ingest(tmp_path / "m.jsonl", image_root, format="table")


def test_a_csv_row_with_extra_fields_is_quarantined_and_its_neighbours_kept(tmp_path, image_root):
    (tmp_path / "c.csv").write_text("image,caption\ncoco/a.jpg,One.\nsam/b.jpg,Two,extra\n"
                                    "coco/c.jpg,Three.\n")
    kept, rejected, stats = ingest(tmp_path / "c.csv", image_root, format="table")
    assert kept["caption"].tolist() == ["One.", "Three."]
    assert rejected["reason"].tolist() == ["malformed_row"]
    assert "line 3 has 3 field(s), the header 2" in rejected["detail"].iloc[0]
    assert stats.n_in == 3


def test_an_unknown_extension_is_a_clear_error(tmp_path, image_root):
    (tmp_path / "c.xlsx").write_bytes(b"x")
    with pytest.raises(TableFormatError, match=r"c\.xlsx.*\.jsonl"):
        ingest(tmp_path / "c.xlsx", image_root, format="table")


@pytest.mark.parametrize("params, message", [
    ({"format": "csv"}, "format"),
    ({"columns": {"picture": "x"}}, "columns"),
    ({"columns": {"caption": ""}}, "columns.caption"),
    ({"columns": {"id": 3}}, "columns.id"),
])
def test_ingest_params_reject_bad_format_and_columns(params, message):
    with pytest.raises(ValueError, match=message):
        IngestParams(**params)


# ---------------------------------------------------------------------------------------------
# WebDataset shards


def _png(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, "PNG")
    return out.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with ``members`` in order (what webdataset's writers produce: one sample's files
    next to each other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path) -> Path:
    root = tmp_path / "root"
    write_shard(root / "shards" / "part-000.tar", [
        ("k1.png", _png((200, 0, 0))), ("k1.txt", b"  A red picture.\n"),
        ("k2.webp", _webp((0, 200, 0))), ("k2.json", json.dumps({"caption": "Green."}).encode()),
        ("k3.png", _png((0, 0, 200))),                       # no caption
    ])
    write_shard(root / "shards" / "part-001.tar", [
        ("k4.txt", b"A caption without its image."),        # no image
        ("k5.png", _png((9, 9, 9))), ("k5.json", b"[1, 2]"),  # not a caption
        ("k6.png", _png((250, 250, 0))), ("k6.txt", b"Yellow."),
    ])
    return root


def _webp(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, "WEBP", lossless=True)
    return out.getvalue()


@pytest.mark.parametrize("check_images", ["exists", "decode"])
def test_webdataset_shards_give_captions_with_images_named_inside_the_shards(shards,
                                                                             check_images):
    kept, rejected, stats = ingest(shards / "shards", shards, format="webdataset",
                                   check_images=check_images, decode_workers=1)
    assert kept["id"].tolist() == ["k1", "k2", "k6"]
    assert kept["image"].tolist() == ["shards/part-000.tar/k1.png",
                                      "shards/part-000.tar/k2.webp",
                                      "shards/part-001.tar/k6.png"]
    assert kept["caption"].tolist() == ["A red picture.", "Green.", "Yellow."]
    assert rejected[["id", "reason"]].values.tolist() == [
        ["k3", "missing_caption"], ["k4", "missing_image"], ["k5", "invalid_caption"]]
    assert "key 'k3' of shard shards/part-000.tar has an image but no caption" in \
        rejected["detail"].iloc[0]
    assert "key 'k4'" in rejected["detail"].iloc[1] and "but a caption" in \
        rejected["detail"].iloc[1]
    assert stats.n_in == 6


def test_webdataset_decode_check_quarantines_a_corrupt_member(tmp_path):
    root = tmp_path / "root"
    write_shard(root / "s.tar", [("a.png", _png((1, 2, 3))), ("a.txt", b"Fine."),
                                 ("b.jpg", b"not a jpeg"), ("b.txt", b"Broken.")])
    kept, rejected, _ = ingest(root / "s.tar", root, format="webdataset",
                               check_images="decode", decode_workers=1)
    assert kept["id"].tolist() == ["a"]
    assert rejected["reason"].tolist() == ["unreadable_image"]


def test_the_raw_annotations_entry_hands_a_folder_of_shards_to_the_ingest_node(shards):
    from tulip_pipelines.io.annotations import ShareGPT4VAnnotationsDataset
    from tulip_pipelines.pipelines.ingest.nodes import ingest_annotations

    handle = ShareGPT4VAnnotationsDataset(str(shards / "shards")).load()
    batches = list(ingest_annotations(handle, {"format": "webdataset", "batch_size": 10},
                                      str(shards)))
    assert sum(len(kept) for kept, _ in batches) == 3


def test_a_table_may_name_images_inside_tar_files(shards, tmp_path):
    path = write_table(tmp_path / "t.csv", frame([
        ("a", "shards/part-000.tar/k1.png", "In a tar."),
        ("b", "shards/part-000.tar/k4.png", "Not in that tar.")]))
    kept, rejected, _ = ingest(path, shards, format="table", columns={"id": "id"})
    assert kept["id"].tolist() == ["a"]
    assert rejected["reason"].tolist() == ["image_not_found"]


def test_shards_outside_the_image_root_are_a_clear_error(shards, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(ValueError, match="not under the image root"):
        ingest(shards / "shards", other, format="webdataset")


def test_prepare_images_re_encodes_the_shard_images_and_reads_them_back(shards, tmp_path):
    from tulip_pipelines.data.images import FolderImages
    from tulip_pipelines.data.prepare import PrepareImagesParams, prepare_images
    from tulip_pipelines.data.shards import Encoding

    kept, _, _ = ingest(shards / "shards", shards, format="webdataset")
    params = PrepareImagesParams(output_dir=str(tmp_path / "prepared"), shard_size=2,
                                 num_workers=0)
    result = prepare_images(kept.iloc[:2], kept.iloc[2:], shards, params,
                            Encoding(20, 95, "4:4:4"))
    source = result.source
    handles = source.locate(kept["id"].tolist(), kept["image"].tolist())
    assert result.rejected.empty and None not in handles
    expected = {"k1": (200, 0, 0), "k2": (0, 200, 0), "k6": (250, 250, 0)}
    for record_id, handle in zip(kept["id"], handles):
        image = source.open(handle)
        assert min(image.size) == 20  # the shortest side resized to the encoding's size
        pixel = image.getpixel((10, 10))
        assert all(abs(a - b) <= 6 for a, b in zip(pixel, expected[record_id])), record_id
    # without preparation the original shard members are read in place
    folder = FolderImages(shards)
    assert folder.exists("shards/part-001.tar/k6.png")
    assert not folder.exists("shards/part-001.tar/k4.png")
    assert folder.open("shards/part-001.tar/k6.png").getpixel((0, 0)) == (250, 250, 0)


# ---------------------------------------------------------------------------------------------
# The ingest pipeline, as `kedro run` runs it


def _kedro_ingest(project: Path, *params: str) -> pd.DataFrame:
    subprocess.run([sys.executable, "-m", "kedro", "run", "--pipelines", "ingest", *params],
                   cwd=project, check=True, capture_output=True, text=True)
    return pd.read_parquet(project / "data/02_intermediate/captions")


@pytest.mark.slow  # a kedro run
def test_kedro_ingest_of_a_jsonl_table_gives_the_captions_of_the_same_sharegpt4v_json(
        project_root, tmp_path, monkeypatch):
    """``kedro run --pipelines ingest`` of a JSONL table (``ingest.format=table``, the user's own
    catalog entry) keeps the captions that the same records as ShareGPT4V JSON give (ingested
    here in this process, through the same stream)."""
    from tests.conftest import copy_project

    project = copy_project(project_root, tmp_path / "project")
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    images = project / "data/01_raw/sharegpt4v_demo/images"
    for name in ("coco/a.jpg", "sam/b.jpg", "coco/c.jpg"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(b"jpg")
    from_json, _, _ = ingest(write_sharegpt4v(tmp_path / "share-captioner.json"), images)
    pd.testing.assert_frame_equal(from_json, EXPECTED)
    (project / "data/01_raw/mine").mkdir(parents=True)
    write_table(project / "data/01_raw/mine/captions.jsonl", frame())
    (project / "conf/local/catalog.yml").write_text(
        "raw_annotations:\n"
        "  type: tulip_pipelines.io.annotations.ShareGPT4VAnnotationsDataset\n"
        "  filepath: data/01_raw/mine/captions.jsonl\n")
    from_table = _kedro_ingest(project, "--params", "ingest.format=table,ingest.columns.id=id")
    pd.testing.assert_frame_equal(from_table.reset_index(drop=True), from_json)
