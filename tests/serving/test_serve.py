"""``mlflow models serve -m models:/tulip-expanded/latest --env-manager local`` answers
``/invocations`` with the embeddings ``load_model`` gives, and a bad image with a 400."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from tests.serving.conftest import LONG, image_bytes
from tulip_pipelines import load_model
from tulip_pipelines.serving.pyfunc import log_embedding_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(scope="module")
def store(model_dir, tmp_path_factory):
    """A tracking store holding the model, registered as tulip-expanded."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("serve", artifact_location=str(root / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        log_embedding_model(model_dir, registered_model_name="tulip-expanded")
    mlflow.set_tracking_uri(None)
    return uri


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """The scoring server on a free port of 127.0.0.1; stopped (its process group) after."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store,
           # the server runs `uvicorn` from the PATH: this interpreter's environment
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve",
         "-m", "models:/tulip-expanded/latest", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, _tail(log)
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no /ping answer in 120 s\n" + _tail(log)
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]


def test_served_embeddings_equal_load_models(server, store, model_dir, monkeypatch):
    picture = image_bytes((30, 90, 200))
    status, answer = post(f"{server}/invocations", {"dataframe_split": {
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
    status, answer = post(f"{server}/invocations", {"dataframe_split": {
        "columns": ["image"],
        "data": [[base64.b64encode(image_bytes("red")).decode()],
                 [base64.b64encode(b"plain text, not an image").decode()]]}})
    assert status == 400
    assert "could not be decoded: row 1" in json.loads(answer)["message"]
