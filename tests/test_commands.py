"""``tulip encode`` and ``tulip search`` on a model directory, a models:/ URI and an authors'
epoch_N.pt: the embeddings and scores are the model's own, long captions are cut and counted,
non-images are skipped and counted, an unknown model URI lists the registered names."""

import logging

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import mlflow_store
from tests.serving.conftest import LONG, TOO_LONG, image_bytes, write_model_dir
from tulip_pipelines.commands import main
from tulip_pipelines.models import load_bundle
from tulip_pipelines.serving.image_cache import CACHE_DIR
from tulip_pipelines.serving.pyfunc import log_embedding_model


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """``main`` configures logging as a command does; the tests after these must not inherit
    its levels (a quiet ``tulip_pipelines`` logger hides their records from caplog)."""
    package, root = logging.getLogger("tulip_pipelines"), logging.getLogger()
    levels, handlers = (package.level, root.level), list(root.handlers)
    yield
    package.setLevel(levels[0])
    root.setLevel(levels[1])
    root.handlers[:] = handlers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    (root / "trip").mkdir(parents=True)
    for name, colour in (("red.png", (200, 20, 20)), ("green.png", (20, 160, 20)),
                         ("trip/blue.png", (20, 20, 200)), ("grey.png", (90, 90, 90))):
        (root / name).write_bytes(image_bytes(colour))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    return root


def _image_features(bundle, paths):
    with torch.no_grad():
        pixels = []
        for path in paths:
            with Image.open(path) as image:
                pixels.append(bundle.preprocess(image.convert("RGB")))
        return bundle.model.encode_image(torch.stack(pixels), normalize=True).numpy()


def _text_features(bundle, texts):
    with torch.no_grad():
        return bundle.model.encode_text(bundle.tokenizer(texts), normalize=True).numpy()


def test_encode_texts_writes_each_captions_embedding_and_truncation(model_dir, tmp_path,
                                                                    capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text(f"A red square.\n\n{LONG}\n{TOO_LONG}\n")
    out = tmp_path / "out" / "texts.parquet"
    assert main(["encode", "--model", str(model_dir), "--texts", str(captions),
                 "--out", str(out), "--device", "cpu", "-q"]) == 0
    frame = pd.read_parquet(out)
    assert list(frame["text"]) == ["A red square.", LONG, TOO_LONG]
    assert list(frame["truncated"]) == [0, 0, 302 - 248]
    bundle = load_bundle(model_dir)
    assert np.allclose(np.stack(frame["embedding"]), _text_features(bundle, list(frame["text"])),
                       atol=1e-5)
    assert "3 captions encoded; 1 truncated to the model's 248 tokens" in capsys.readouterr().err


def test_encode_images_skips_and_counts_what_is_not_an_image(model_dir, photos, tmp_path,
                                                             capsys):
    out = tmp_path / "images.parquet"
    assert main(["encode", "--model", str(model_dir), "--images", str(photos), "--out",
                 str(out), "-q"]) == 0
    frame = pd.read_parquet(out)
    assert list(frame["path"]) == ["green.png", "grey.png", "red.png", "trip/blue.png"]
    bundle = load_bundle(model_dir)
    assert np.allclose(np.stack(frame["embedding"]),
                       _image_features(bundle, [photos / p for p in frame["path"]]), atol=1e-5)
    err = capsys.readouterr().err
    assert "5 files in" in err and "4 images, 1 skipped (not images); 4 encoded now" in err


def _search(model, photos, capsys, *extra):
    assert main(["search", "--model", model, "--images", str(photos), "--query", LONG,
                 "--top", "3", "-q", *extra]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    # (log lines reach stdout too where an earlier test left Kedro's logging set up)
    start = next(i for i, line in enumerate(lines) if line.split() == ["rank", "score", "path"])
    return [row.split() for row in lines[start + 1:]], captured.err


def test_search_ranks_the_folder_by_cosine_to_the_query_then_reads_the_cache(
        model_dir, photos, capsys):
    rows, err = _search(str(model_dir), photos, capsys)
    bundle = load_bundle(model_dir)
    names = ["green.png", "grey.png", "red.png", "trip/blue.png"]
    scores = _image_features(bundle, [photos / n for n in names]) @ \
        _text_features(bundle, [LONG])[0]
    best = np.argsort(-scores)[:3]
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    assert [r[2] for r in rows] == [str(photos / names[i]) for i in best]
    assert [float(r[1]) for r in rows] == pytest.approx(scores[best].tolist(), abs=1e-4)
    assert "1 skipped (not images); 4 encoded now, 0 from the cache" in err
    assert (photos / CACHE_DIR).is_dir()

    again, err = _search(str(model_dir), photos, capsys)
    assert again == rows and "0 encoded now, 4 from the cache" in err


def test_search_reads_a_registered_model_and_names_the_registered_ones_otherwise(
        model_dir, photos, tmp_path, monkeypatch, capsys):
    uri = mlflow_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run():
        log_embedding_model(model_dir, registered_model_name="tulip-expanded")
    by_dir, _ = _search(str(model_dir), photos, capsys)
    by_uri, _ = _search("models:/tulip-expanded/latest", photos, capsys)
    assert by_uri == by_dir

    assert main(["search", "--model", "models:/tulip-nope/latest", "--images", str(photos),
                 "--query", "x", "-q"]) == 2
    err = capsys.readouterr().err
    assert "no registered model 'tulip-nope'" in err and "registered: tulip-expanded" in err


def test_search_reads_an_authors_epoch_file(model_dir, photos, tmp_path, capsys):
    bundle = load_bundle(model_dir)
    state = {k: v for k, v in bundle.model.state_dict().items()}
    torch.save({"epoch": 1, "state_dict": state}, tmp_path / "epoch_1.pt")
    rows, _ = _search(str(tmp_path / "epoch_1.pt"), photos, capsys, "--teacher", "TULIP-Tiny",
                      "--pretrained", "none")
    loaded = load_bundle(tmp_path / "epoch_1.pt", teacher="TULIP-Tiny", pretrained=None)
    names = ["green.png", "grey.png", "red.png", "trip/blue.png"]
    scores = _image_features(loaded, [photos / n for n in names]) @ \
        _text_features(loaded, [LONG])[0]
    assert [r[2] for r in rows] == [str(photos / names[i]) for i in np.argsort(-scores)[:3]]


@pytest.mark.parametrize("query", ["", "   ", "\t\n"])
def test_search_with_an_empty_query_is_an_error_not_a_ranking(model_dir, photos, capsys, query):
    assert main(["search", "--model", str(model_dir), "--images", str(photos), "--query", query,
                 "-q"]) == 2
    captured = capsys.readouterr()
    assert "rank" not in captured.out
    assert "tulip search: error: --query is empty or whitespace only" in captured.err


def test_encode_texts_with_only_blank_lines_is_an_error(model_dir, tmp_path, capsys):
    texts = tmp_path / "blank.txt"
    texts.write_text("\n   \n\t\n")
    assert main(["encode", "--model", str(model_dir), "--texts", str(texts), "--out",
                 str(tmp_path / "out.parquet"), "-q"]) == 2
    assert "holds no caption" in capsys.readouterr().err
    assert not (tmp_path / "out.parquet").exists()
