"""The pyfunc model's predict: texts and images (bytes or base64) to the model's own
embeddings, captions cut as open_clip cuts them (end token kept) with the tokens lost counted,
and bad input answered with an error the scoring server turns into a 400."""

import base64
import io

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from tests.serving.conftest import LONG, SHORT, TOO_LONG, image_bytes
from tulip_pipelines.models import load_bundle
from tulip_pipelines.serving.pyfunc import TulipEmbedder

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def embedder(model_dir):
    return TulipEmbedder(device="cpu").load(model_dir)


@pytest.fixture(scope="module")
def bundle(model_dir):
    return load_bundle(model_dir)


def _text(bundle, tokens):
    with torch.no_grad():
        return bundle.model.encode_text(torch.tensor([tokens]), normalize=True)[0].numpy()


def _image(bundle, data):
    with Image.open(io.BytesIO(data)) as image, torch.no_grad():
        pixels = bundle.preprocess(image.convert("RGB")).unsqueeze(0)
        return bundle.model.encode_image(pixels, normalize=True)[0].numpy()


def test_texts_are_embedded_as_the_model_reads_them_long_ones_cut_with_the_end_token(
        embedder, bundle):
    out = embedder.predict(None, pd.DataFrame({"text": [SHORT, LONG, TOO_LONG]}))
    assert list(out["truncated"]) == [0, 0, 302 - 248]
    # the first two read whole: their padded tokens; the third: start, 246 x 'a', end
    tokenizer = bundle.tokenizer
    a = tokenizer.encode("a")[0]
    for row, text in enumerate([SHORT, LONG]):
        tokens = [SOT, *tokenizer.encode(text), EOT]
        tokens += [0] * (248 - len(tokens))
        assert np.allclose(out["text_embedding"][row], _text(bundle, tokens), atol=1e-5)
    cut = _text(bundle, [SOT] + [a] * 246 + [EOT])
    assert np.allclose(out["text_embedding"][2], cut, atol=1e-5)
    for row in range(3):
        assert np.linalg.norm(out["text_embedding"][row]) == pytest.approx(1, abs=1e-5)
        assert out["image_embedding"][row] is None
    width = bundle.model.text_projection.shape[1]
    assert len(out["text_embedding"][0]) == width


def test_images_as_bytes_or_base64_give_the_models_image_features(embedder, bundle):
    red, green = image_bytes((200, 20, 20)), image_bytes((20, 160, 20), fmt="JPEG")
    frame = pd.DataFrame({"text": [SHORT, None, None],
                          "image": [red, base64.b64encode(green).decode(), green]})
    out = embedder.predict(None, frame)
    assert np.allclose(out["image_embedding"][0], _image(bundle, red), atol=1e-5)
    assert np.allclose(out["image_embedding"][1], _image(bundle, green), atol=1e-5)
    assert np.allclose(out["image_embedding"][2], out["image_embedding"][1], atol=1e-6)
    assert out["text_embedding"][0] is not None and out["text_embedding"][1] is None
    assert not np.allclose(out["image_embedding"][0], out["image_embedding"][1], atol=1e-3)


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"image": [image_bytes("red"), b"not an image"]}),
     r"1 image\(s\) could not be decoded: row 1: "),
    (pd.DataFrame({"image": ["%%% not base64"]}), "row 0: image is not valid base64"),
    (pd.DataFrame({"caption": ["a"], "picture": ["b"]}),
     r"needs a `text` and/or an `image` column; the columns received: \['caption', 'picture'\]"),
    (pd.DataFrame({"text": ["a red square", ""]}), r"rows \[1\]: text is empty or whitespace"),
    (pd.DataFrame({"text": ["   ", "\t"]}), r"rows \[0, 1\]: text is empty or whitespace"),
])
def test_bad_input_is_an_invalid_parameter_error(embedder, frame, message):
    with pytest.raises(MlflowException, match=message) as raised:
        embedder.predict(None, frame)
    assert raised.value.get_http_status_code() == 400
