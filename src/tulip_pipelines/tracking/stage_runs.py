"""A training stage's MLflow run: :func:`stage_run` opens it (nested in ``kedro run``'s run) with
the stage's parameters, DeepSpeed config, lineage and inputs (the running node's catalogued
inputs, set by the project hook, logged as MLflow datasets: :func:`log_datasets`); its
:class:`StageTracker` logs the per-step curves, the figures, the tables and the model directory
(also as a registered MLflow model). Only rank 0 ever calls this module."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAX_PARAM_CHARS = 250  # MLflow's limit on a parameter value
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit on one log_batch
SEND_EVERY_S = 5.0  # per-step metrics reach the store this often (live, in few transactions)
# The experiment's kind, as MLflow records it: a model-training experiment, not a GenAI one
# (mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT). MLflow 3.17's UI picks its view
# from a switch kept in the browser (default GenAI) instead: links to the UI name
# ``workflowType=machine_learning`` (:func:`tulip_pipelines.hooks.run_link`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
CHAMPION = "champion"  # the alias of the registered version with the best long-caption R@1
MODEL_CARD_TAG = "tulip.model_card"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, values cut to MLflow's 250 characters."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:MAX_PARAM_CHARS]
    return out


def tracking_enabled() -> bool:
    import mlflow

    return mlflow.active_run() is not None or bool(os.environ.get("MLFLOW_TRACKING_URI"))


def mark_model_training(experiment_id: str) -> None:
    """Tag the experiment as a model-training one (:data:`EXPERIMENT_KIND_TAG`), so that the UI
    opens it on its runs; an experiment already of that kind is left alone."""
    import mlflow

    client = mlflow.MlflowClient()
    if client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any], ds_config: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None, loss_kind: str | None = None,
              datasets: Mapping[str, Any] | None = None) -> Iterator[StageTracker]:
    """An MLflow run for one stage, nested in the active run if any. Its parameters are logged
    without the stage prefix (``train.lr``, not ``distill.train.lr``); ``loss_kind`` names its
    loss curves (:func:`loss_named`) and is its tag ``tulip.loss``; ``datasets`` (catalog name
    -> (table or image source, file path); None: the running node's catalogued inputs) are
    logged as its inputs (:func:`log_datasets`)."""
    if not tracking_enabled():
        yield StageTracker(None)
        return
    import mlflow

    outer = mlflow.active_run()
    # system metrics (CPU, memory, disk, network; GPUs with nvidia-ml-py) every
    # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (MLflow's default: 10) while the stage runs
    with mlflow.start_run(run_name=stage, nested=outer is not None,
                          log_system_metrics=True) as run:
        mark_model_training(run.info.experiment_id)
        mlflow.set_tags({"tulip.stage": stage, **({"tulip.loss": loss_kind} if loss_kind else {}),
                         **dict(tags or {})})
        mlflow.log_params(flatten(dict(params)))
        if ds_config:
            mlflow.log_params(flatten({"deepspeed": dict(ds_config)}))
            mlflow.log_text(json.dumps(dict(ds_config), indent=2), "deepspeed_config.json")
        log_datasets(node_inputs() if datasets is None else datasets, stage)
        logger.info("MLflow run %s for stage %s", run.info.run_id, stage)
        tracker = StageTracker(run.info.run_id, outer.info.run_id if outer else None,
                               loss_kind=loss_kind)
        try:
            yield tracker
        finally:
            tracker.flush()


class StageTracker:
    """What a stage logs into its MLflow run (a no-op when ``run_id`` is None);
    ``parent_run_id``: the run it is nested in (kedro-mlflow's run of the ``kedro run``)."""

    def __init__(self, run_id: str | None, parent_run_id: str | None = None,
                 send_every_s: float = SEND_EVERY_S, loss_kind: str | None = None):
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.send_every_s = send_every_s
        self.loss_kind = loss_kind
        self._pending: list = []
        self._sent_at = time.monotonic()

    @property
    def client(self):
        import mlflow

        return mlflow.MlflowClient()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Metrics of ``step``, stamped now. They reach the store in one batch every
        ``send_every_s`` seconds (and at :meth:`flush`), so that a training step seldom waits
        for it (``bench/train_step.py --mlflow``)."""
        if self.run_id:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._pending.extend(Metric(loss_named(k, self.loss_kind), float(v), now, step)
                                 for k, v in metrics.items())
            if time.monotonic() - self._sent_at >= self.send_every_s:
                self.flush()

    def flush(self) -> None:
        """Send every metric logged so far."""
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id,
                                  metrics=pending[start:start + MAX_METRICS_PER_BATCH])
        self._sent_at = time.monotonic()

    def target(self) -> dict[str, str] | None:
        """Where another process (a launched rank 0) logs into this run: tracking URI and run
        id (None when tracking is off)."""
        if not self.run_id:
            return None
        import mlflow

        return {"tracking_uri": mlflow.get_tracking_uri(), "run_id": self.run_id,
                "send_every_s": self.send_every_s, "loss_kind": self.loss_kind}

    def log_figure(self, figure, name: str) -> None:
        if self.run_id:
            self.client.log_figure(self.run_id, figure, name)

    def log_table(self, frame, name: str) -> None:
        """A table as a Parquet artifact of this run."""
        if not self.run_id:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            frame.to_parquet(path, index=False)
            self.client.log_artifact(self.run_id, str(path))

    def log_model(self, model_bundle, artifact_path: str = "model",
                  registered_model_name: str | None = None, name: str = "model") -> None:
        """The model directory (safetensors, config and model card) as an artifact of this run;
        the tag ``tulip.model_card`` names the card's artifact path (``tulip-compare`` links
        it). The same directory is also logged as a pyfunc MLflow model named ``name`` (the
        stage), registered as a new version of ``registered_model_name`` when that is given
        (the version's description: the model card; the registered model's: what it is, with
        the tags ``stage``, ``base_model`` and ``context_length``)."""
        if not self.run_id:
            return
        from tulip_pipelines.models import save_model
        from tulip_pipelines.models.card import CARD

        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / artifact_path
            save_model(model_bundle, directory)
            self.client.log_artifacts(self.run_id, str(directory), artifact_path)
            self.client.set_tag(self.run_id, MODEL_CARD_TAG, f"{artifact_path}/{CARD}")
            import torch

            # logging loads the model to check its input example: that must not move the
            # random numbers of what runs next (a stage's initialisation) when tracking is on
            with torch.random.fork_rng(devices=[]):
                self._log_mlflow_model(directory, registered_model_name, name)
            if registered_model_name:
                describe_registered_model(registered_model_name, model_bundle)

    def _log_mlflow_model(self, directory: Path, registered_model_name: str | None,
                          name: str) -> None:
        import mlflow

        from tulip_pipelines.models.card import CARD
        from tulip_pipelines.serving.pyfunc import log_embedding_model

        started = time.perf_counter()
        active = mlflow.active_run()
        here = active is not None and active.info.run_id == self.run_id
        with nullcontext() if here else mlflow.start_run(self.run_id, nested=active is not None):
            info = log_embedding_model(directory, name, registered_model_name,
                                       (directory / CARD).read_text(encoding="utf-8"))
        logger.info("MLflow model %s%s logged in %.1f s", info.model_uri,
                    f" registered as {registered_model_name} version "
                    f"{info.registered_model_version}" if registered_model_name else "",
                    time.perf_counter() - started)


def loss_named(key: str, kind: str | None) -> str:
    """``train/loss`` -> ``train/loss_<kind>`` (``val/`` too): a chart of the runs compared puts
    only losses of one kind together (the distillation's cosine distance is no contrastive
    loss). Other keys, or no kind, unchanged."""
    if kind and key in ("train/loss", "val/loss"):
        return f"{key}_{kind}"
    return key


def describe_registered_model(name: str, bundle) -> None:
    """The registered model's description and tags: its stage, base model and context length
    (set again with every version: the latest version's)."""
    import mlflow

    spec = bundle.spec
    stage = spec.extra.get("stage", "")
    client = mlflow.MlflowClient()
    client.update_registered_model(
        name, description=f"Text-image embedding model trained by the `{stage}` stage of "
                          f"tulip_pipelines ({spec.model_name}, {spec.kind} text positions, "
                          f"{spec.context_length}-token context). Each version's description "
                          f"is its model card; `@{CHAMPION}` marks the project's best version "
                          f"on the long-caption benchmarks.")
    for key, value in {"stage": stage, "base_model": spec.model_name,
                       "context_length": str(spec.context_length)}.items():
        client.set_registered_model_tag(name, key, value)


def lineage(bundle) -> tuple[dict[str, str], dict[str, str]]:
    """Tags and params that tie a stage's run to the model it starts from.

    Tag ``tulip.parent_run_id``: the MLflow run that produced ``bundle`` (from its
    ``spec.extra["mlflow_run_id"]``), when it was tracked. Param ``init_model``: that run's
    model artifact (``runs:/<id>/model``), else the file or pretrained tag the model came from.
    """
    extra = bundle.spec.extra
    run_id = extra.get("mlflow_run_id")
    if run_id:
        source = f"runs:/{run_id}/model"
    elif extra.get("file") or extra.get("pretrained"):
        source = f"{bundle.spec.model_name}:{extra.get('file') or extra.get('pretrained')}"
    else:
        source = f"{bundle.spec.model_name}:{extra.get('stage', 'untracked')}"
    return ({"tulip.parent_run_id": run_id} if run_id else {}), {"init_model": source}


# The catalogued inputs of the Kedro node running now (name -> (value, file path)), set by the
# project hook around each node: what a stage run opened inside it logs as its datasets.
_node_inputs: dict[str, tuple[Any, str | None]] = {}


def set_node_inputs(inputs: Mapping[str, tuple[Any, str | None]]) -> None:
    _node_inputs.clear()
    _node_inputs.update(inputs)


def node_inputs() -> dict[str, tuple[Any, str | None]]:
    return dict(_node_inputs)


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def mlflow_dataset(name: str, value: Any, source: str | None):
    """An MLflow dataset for a catalogued input: a table (its rows, schema and a digest of its
    content) or prepared image shards (their index as digest, the samples as rows); None for
    anything else (models, embeddings caches)."""
    import mlflow.data
    import pandas as pd
    from mlflow.data.meta_dataset import MetaDataset

    from tulip_pipelines.data.images import FolderImages, PreparedImages

    where = str(Path(source).resolve()) if source else name
    if isinstance(value, pd.DataFrame):
        return mlflow.data.from_pandas(value, source=where, name=name)
    if isinstance(value, (PreparedImages, FolderImages)):
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        folder = Path(getattr(value, "folder", None) or getattr(value, "root", ""))
        index = folder / "index.json"
        described = json.dumps(value.to_dict(), sort_keys=True, default=str)
        digest = _digest(index.read_text() if index.is_file() else described)
        rows = value.to_dict().get("n_samples")

        class _Images(MetaDataset):
            @property
            def profile(self):
                return {"num_rows": rows} if rows is not None else None

            def to_dict(self) -> dict[str, str]:
                out = super().to_dict()
                if self.profile is not None:
                    out["profile"] = json.dumps(self.profile)
                return out

        return _Images(resolve_dataset_source(str(folder.resolve())), name=name, digest=digest)
    return None


def log_datasets(datasets: Mapping[str, tuple[Any, str | None]], context: str) -> int:
    """Log each ``name -> (value, file path)`` that is a table or an image source as an input of
    the active run (``mlflow.log_input``, with ``context``: the stage). Returns how many."""
    import mlflow

    logged = 0
    for name, (value, source) in datasets.items():
        try:
            dataset = mlflow_dataset(name, value, source)
        except Exception as err:  # noqa: BLE001 - a dataset's description never stops a stage
            logger.warning("dataset %s not logged: %s", name, err)
            continue
        if dataset is not None:
            mlflow.log_input(dataset, context=context)
            logged += 1
    return logged
