"""Ingest with check_images: decode quarantines truncated and zero-byte JPEGs as
unreadable_image (decoded in parallel), keeps the rest, and counts reconcile."""

import io
import json

from PIL import Image

from tulip_pipelines.data.ingest import IngestParams, IngestStats, iter_ingest_batches


def _jpeg(path, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _record(i, image, id_=None):
    return {"id": id_ or f"r{i}", "image": image,
            "conversations": [{"from": "human", "value": "<image>"},
                              {"from": "gpt", "value": f"Caption {i}."}]}


def test_decode_quarantines_unreadable_images_and_keeps_the_good_duplicate(tmp_path):
    root = tmp_path / "images"
    data = _jpeg(root / "good0.jpg")
    _jpeg(root / "good1.jpg", (10, 200, 10))
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.jpg").write_bytes(b"")
    records = [_record(0, "good0.jpg"), _record(1, "truncated.jpg", id_="dup"),
               _record(2, "empty.jpg"), _record(3, "good1.jpg", id_="dup"),
               _record(4, "missing.jpg")]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(records))

    stats = IngestStats()
    batches = list(iter_ingest_batches(path, root, "decode", batch_size=3, stats=stats,
                                       decode_workers=2))
    kept = [row for frame, _ in batches for row in frame.to_dict("records")]
    rejected = [row for _, frame in batches for row in frame.to_dict("records")]
    assert [r["image"] for r in kept] == ["good0.jpg", "good1.jpg"]
    # the unreadable record 1 claims no id: record 3 with the same id is kept, not a duplicate
    assert kept[1]["id"] == "dup"
    reasons = {r["index"]: r["reason"] for r in rejected}
    assert reasons == {1: "unreadable_image", 2: "unreadable_image", 4: "image_not_found"}
    details = {r["index"]: r["detail"] for r in rejected}
    assert "truncated.jpg" in details[1] and "empty.jpg" in details[2]
    assert stats.n_in == stats.n_kept + stats.n_rejected == 5


def test_exists_does_not_decode_and_true_means_exists(tmp_path):
    root = tmp_path / "images"
    (root).mkdir()
    (root / "empty.jpg").write_bytes(b"")
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([_record(0, "empty.jpg")]))
    for mode in ("exists", True):
        (kept, rejected), = iter_ingest_batches(path, root, mode, batch_size=10)
        assert len(kept) == 1 and rejected.empty
    assert IngestParams.from_params({"check_images": "decode"}).check_images == "decode"
