"""``mlflow models serve -m models:/tulip-expanded/latest --env-manager local`` answers
``/invocations`` with the embeddings ``load_model`` gives, and a bad image with a 400."""

import base64
import io
import json

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import mlflow_store
from tests.serving.conftest import LONG, image_bytes
from tulip_pipelines import load_model
from tulip_pipelines.serving.pyfunc import log_embedding_model
from tulip_pipelines.serving.server import invoke, scoring_server


@pytest.fixture(scope="module")
def store(model_dir, tmp_path_factory):
    """A tracking store holding the model, registered as tulip-expanded."""
    root = tmp_path_factory.mktemp("store")
    uri = mlflow_store(root / "mlflow.db")
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("serve", artifact_location=str(root / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        log_embedding_model(model_dir, registered_model_name="tulip-expanded")
    mlflow.set_tracking_uri(None)
    return uri


@pytest.fixture(scope="module")
def server(store):
    """The scoring server on a free port of 127.0.0.1 (stopped after the module's tests)."""
    with scoring_server("models:/tulip-expanded/latest", store) as url:
        yield url


def test_served_embeddings_equal_load_models(server, store, model_dir, monkeypatch):
    picture = image_bytes((30, 90, 200))
    status, answer = invoke(f"{server}/invocations", {"dataframe_split": {
        "columns": ["text", "image"],
        "data": [[LONG, None], [None, base64.b64encode(picture).decode()]]}})
    assert status == 200, answer
    rows = answer["predictions"]
    assert [row["truncated"] for row in rows] == [0, 0]
    assert rows[0]["image_embedding"] is None and rows[1]["text_embedding"] is None

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    model, preprocess, tokenizer = load_model("models:/tulip-expanded/latest")

    with torch.no_grad():
        text = model.encode_text(tokenizer([LONG]), normalize=True)[0].numpy()
        with Image.open(io.BytesIO(picture)) as image:
            pixels = preprocess(image.convert("RGB")).unsqueeze(0)
        image_features = model.encode_image(pixels, normalize=True)[0].numpy()
    for served, expected in ((rows[0]["text_embedding"], text),
                             (rows[1]["image_embedding"], image_features)):
        served = np.asarray(served, dtype=np.float64)
        assert served.shape == expected.shape
        cosine = served @ expected / (np.linalg.norm(served) * np.linalg.norm(expected))
        assert cosine > 0.9999


def test_a_file_that_is_not_an_image_is_a_400_with_a_message(server):
    status, answer = invoke(f"{server}/invocations", {"dataframe_split": {
        "columns": ["image"],
        "data": [[base64.b64encode(image_bytes("red")).decode()],
                 [base64.b64encode(b"plain text, not an image").decode()]]}})
    assert status == 400
    assert "could not be decoded: row 1" in json.loads(answer)["message"]


@pytest.mark.parametrize("columns, data, message", [
    (["caption"], [["a red square"]],
     "the columns received: ['caption']"),  # not dropped unseen by a signature
    (["text"], [[""]], "rows [0]: text is empty or whitespace only"),
    (["text", "image"], [["   ", None]], "rows [0]: text is empty or whitespace only"),
])
def test_a_wrong_column_or_a_blank_text_is_a_400_naming_it(server, columns, data, message):
    status, answer = invoke(f"{server}/invocations",
                            {"dataframe_split": {"columns": columns, "data": data}})
    assert status == 400, answer
    assert message in json.loads(answer)["message"]
