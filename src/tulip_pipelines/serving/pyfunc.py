"""A trained model as an MLflow ``pyfunc`` model: what the Model Registry versions and
``mlflow models serve`` answers with.

Input: a table with a ``text`` column (captions) and/or an ``image`` column (encoded image bytes,
or their base64 text, as JSON requests carry them); a row may hold either or both. Output, a row
per input row: ``text_embedding`` and ``image_embedding`` (L2-normalised, the model's width;
null where the row has no text or image) and ``truncated`` (how many tokens of the caption the
model did not read: captions longer than its context are cut as open_clip cuts them, end token
kept). An image that cannot be decoded fails the request with a message naming its row (the
scoring server answers 400).

The MLflow model holds the model directory (``model.safetensors``, ``config.json``,
``MODEL_CARD.md``) as its artifact ``model``; :meth:`TulipEmbedder.load_context` loads it with
the project's own :func:`tulip_pipelines.models.load_bundle`.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

logger = logging.getLogger(__name__)

ARTIFACT = "model"  # the MLflow model's artifact holding the model directory
COLUMNS = ("text", "image")
# What a served model needs from its environment; `--env-manager local` uses the running one.
PIP_REQUIREMENTS = ("torch", "open_clip_torch", "safetensors", "pillow", "pandas", "mlflow")


def bad_input(message: str) -> MlflowException:
    """An error the scoring server answers with 400 (never 500)."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def image_bytes(value: Any, row: int) -> bytes:
    """An ``image`` cell as bytes: bytes as they are, a string as base64."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise bad_input(f"row {row}: image is not valid base64 ({err})") from None
    raise bad_input(f"row {row}: image must be bytes or a base64 string, got "
                    f"{type(value).__name__}")


def _present(value: Any) -> bool:
    if value is None:
        return False
    return not (isinstance(value, float) and np.isnan(value))


class TulipEmbedder(mlflow.pyfunc.PythonModel):
    """Texts and images to embeddings with a model directory written by this project."""

    def __init__(self, batch_size: int = 64, device: str = "auto", autocast: str | None = None):
        """On the accelerator when there is one (``device``), in float32 unless ``autocast``
        (the served embeddings are then those of ``load_model``, on any device)."""
        self.batch_size, self.device_name, self.autocast = batch_size, device, autocast
        self.bundle = None

    def load_context(self, context) -> None:
        self.load(context.artifacts[ARTIFACT])

    def load(self, directory: str | Path) -> "TulipEmbedder":
        from tulip_pipelines.models import load_bundle
        from tulip_pipelines.models.device import resolve_device

        self.device = resolve_device(self.device_name)
        self.bundle = load_bundle(directory, device=str(self.device))
        return self

    def predict(self, context, model_input: pd.DataFrame,
                params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        from tulip_pipelines.serving.embed import embed_image_bytes, embed_texts

        frame = pd.DataFrame(model_input)
        if not set(COLUMNS) & set(frame.columns):
            raise bad_input(f"the input needs a `text` and/or an `image` column; the columns "
                            f"received: {[str(c) for c in frame.columns]}")
        n = len(frame)
        out = pd.DataFrame({"text_embedding": [None] * n, "image_embedding": [None] * n,
                            "truncated": np.zeros(n, dtype=np.int64)})
        texts = frame["text"] if "text" in frame else pd.Series([None] * n)
        rows = [i for i in range(n) if _present(texts.iloc[i])]
        bad = [i for i in rows if not isinstance(texts.iloc[i], str)]
        if bad:
            raise bad_input(f"rows {bad}: text must be a string")
        blank = [i for i in rows if not texts.iloc[i].strip()]
        if blank:
            raise bad_input(f"rows {blank[:10]}: text is empty or whitespace only (leave the cell "
                            f"null for a row with an image only)")
        images = frame["image"] if "image" in frame else pd.Series([None] * n)
        image_rows = [i for i in range(n) if _present(images.iloc[i])]
        blobs = [image_bytes(images.iloc[i], i) for i in image_rows]
        if image_rows:
            features, unreadable = embed_image_bytes(
                self.bundle, blobs, self.batch_size, device=self.device, autocast=self.autocast,
                show_progress=False)
            if unreadable:
                named = "; ".join(f"row {image_rows[k]}: {error}"
                                  for k, error in sorted(unreadable.items()))
                raise bad_input(f"{len(unreadable)} image(s) could not be decoded: {named}")
            out.loc[image_rows, "image_embedding"] = pd.Series(
                list(features.numpy()), index=image_rows, dtype=object)
        if rows:
            features, truncated = embed_texts(
                self.bundle, [texts.iloc[i] for i in rows], self.batch_size,
                device=self.device, autocast=self.autocast, show_progress=False)
            out.loc[rows, "text_embedding"] = pd.Series(list(features.numpy()), index=rows,
                                                        dtype=object)
            out.loc[rows, "truncated"] = truncated
        return out


def signature():
    """The output: the two embeddings (float arrays) and ``truncated`` (long). No input schema:
    MLflow would drop the columns it does not know before :meth:`TulipEmbedder.predict` sees
    them, so a request with a wrong column could not be told which columns it sent; predict
    checks the input itself (``text`` and ``image``, both optional strings, an image as base64
    text or, in Python, bytes: the module docstring)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    inputs = None
    outputs = Schema([ColSpec(Array(DataType.float), "text_embedding", required=False),
                      ColSpec(Array(DataType.float), "image_embedding", required=False),
                      ColSpec(DataType.long, "truncated")])
    return ModelSignature(inputs, outputs)


def input_example() -> pd.DataFrame:
    """A caption and a small PNG (base64): what a request looks like."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return pd.DataFrame({"text": ["A red square on a plain background."],
                         "image": [base64.b64encode(buffer.getvalue()).decode()]})


def log_embedding_model(directory: str | Path, name: str = "embedder",
                        registered_model_name: str | None = None,
                        card: str | None = None):
    """Log the model directory ``directory`` as a pyfunc MLflow model named ``name`` into the
    active run, and register it as a new version of ``registered_model_name`` (when given; the
    version's description is the model card ``card``). Returns MLflow's ``ModelInfo``."""
    info = mlflow.pyfunc.log_model(
        name=name, python_model=str(Path(__file__).with_name("model_code.py")),
        artifacts={ARTIFACT: str(directory)},
        signature=signature(), input_example=input_example(),
        pip_requirements=list(PIP_REQUIREMENTS), registered_model_name=registered_model_name,
        await_registration_for=0)
    if registered_model_name and card and info.registered_model_version:
        mlflow.MlflowClient().update_model_version(
            registered_model_name, info.registered_model_version, description=card)
    return info
