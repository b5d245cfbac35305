"""Models in MLflow: ``models:/<name>/<version|latest|@alias>`` (the Model Registry) and
``runs:/<run id>/<path>`` URIs resolved to a model bundle, and the registered versions a stage
run produced (what the evaluation tags with its recall).

A URI names either a pyfunc model logged by :mod:`.pyfunc` (its ``model`` artifact is the
model directory) or a plain model directory (a stage run's ``model``
artifact). An unknown registered name is an error that lists the names registered."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

MLFLOW_URI_PREFIXES = ("models:/", "runs:/")


def resolve_bundle(source, device: str = "cpu", **original_kwargs):
    """The :class:`~tulip_pipelines.models.ModelBundle` a user names: an MLflow URI
    (``models:/tulip-expanded/latest``, ``runs:/<run id>/model``, read from the current tracking
    store), a model directory or an authors' epoch_N.pt (``original_kwargs`` go to
    :func:`tulip_pipelines.models.load_bundle`)."""
    if isinstance(source, str) and source.startswith(MLFLOW_URI_PREFIXES):
        if original_kwargs:
            raise TypeError(f"{sorted(original_kwargs)} only apply to original TULIP files")
        return load_mlflow_model(source, device)
    from tulip_pipelines.models.files import load_bundle

    return load_bundle(source, device, **original_kwargs)


def registered_names() -> list[str]:
    """Every model name in the registry of the current tracking store, sorted."""
    import mlflow

    return sorted(m.name for m in mlflow.MlflowClient().search_registered_models())


def _check_registered(uri: str) -> None:
    """Raise with the registered names when ``models:/<name>/...`` names no registered model or
    no such version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    parts = uri[len("models:/"):].split("/")
    name = parts[0].split("@")[0]
    if name.startswith("m-") and len(parts) == 1:
        return  # a logged model id (models:/m-...), not a registered name
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        names = registered_names()
        raise ValueError(f"no registered model {name!r} in the MLflow store "
                         f"{mlflow.get_tracking_uri()}; registered: "
                         f"{', '.join(names) if names else 'none'}") from None
    version = parts[1] if len(parts) > 1 else None
    if version and version != "latest":
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        if version.isdigit() and int(version) not in versions:
            raise ValueError(f"model {name!r} has no version {version}; versions: {versions}")


def model_directory(local: str | Path) -> Path:
    """The model directory inside a downloaded MLflow artifact: the directory itself
    (a plain ``model`` artifact) or the pyfunc model's ``model`` artifact."""
    local = Path(local)
    if (local / "config.json").is_file():
        return local
    if (local / "MLmodel").is_file():
        from mlflow.models import Model

        from tulip_pipelines.serving.pyfunc import ARTIFACT

        flavor = Model.load(str(local)).flavors.get("python_function", {})
        artifact = (flavor.get("artifacts") or {}).get(ARTIFACT) or {}
        if artifact.get("path"):
            return local / artifact["path"]
    raise FileNotFoundError(f"{local} holds neither a model directory (config.json) nor a "
                            f"tulip_pipelines pyfunc model")


def load_mlflow_model(uri: str, device: str = "cpu"):
    """The :class:`~tulip_pipelines.models.ModelBundle` at an MLflow URI (downloaded into a
    temporary folder, loaded with :func:`tulip_pipelines.models.load_bundle`)."""
    import mlflow

    from tulip_pipelines.models.files import load_bundle

    if uri.startswith("models:/"):
        _check_registered(uri)
    with tempfile.TemporaryDirectory(prefix="tulip-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        bundle = load_bundle(model_directory(local), device=device)
    bundle.source_dir = None  # the download is gone
    return bundle


def versions_of_run(run_id: str) -> list:
    """The registered model versions whose source is the run ``run_id``."""
    import mlflow

    return list(mlflow.MlflowClient().search_model_versions(f"run_id='{run_id}'"))
