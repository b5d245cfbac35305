"""MLflow tracking of training and evaluation stages (this module only talks to MLflow; running a
stage is :mod:`tulip_pipelines.training.stages.run`).

``kedro run`` opens one MLflow run (kedro-mlflow); each stage opens a *nested* run named after it
with its parameters, the DeepSpeed config, per-step metrics (logged as they come, by the launched
rank 0 too), system metrics, final metrics and its exported model (as plain files, and as a
pyfunc MLflow model registered in the Model Registry under the stage's ``registered_model_name``:
:mod:`tulip_pipelines.serving.pyfunc`).
Outside Kedro a stage logs only when a tracking URI is configured (``MLFLOW_TRACKING_URI``);
otherwise nothing is logged. Only rank 0 ever calls this module.
"""

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


class StageTracker:
    """What a stage logs into its MLflow run (a no-op when ``run_id`` is None);
    ``parent_run_id``: the run it is nested in (kedro-mlflow's run of the ``kedro run``)."""

    def __init__(self, run_id: str | None, parent_run_id: str | None = None,
                 send_every_s: float = SEND_EVERY_S):
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.send_every_s = send_every_s
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
            self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
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
                "send_every_s": self.send_every_s}

    def log_final(self, metrics: Mapping[str, float]) -> None:
        self.log({f"final/{k}": float(v) for k, v in metrics.items()}, step=0)

    def log_figure(self, figure, name: str) -> None:
        if self.run_id:
            self.client.log_figure(self.run_id, figure, name)

    def log_table(self, frame, name: str) -> None:
        """A table as a Parquet artifact of this run (with its row count as a final metric)."""
        if not self.run_id:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            frame.to_parquet(path, index=False)
            self.client.log_artifact(self.run_id, str(path))
        self.log({f"final/{Path(name).stem}": float(len(frame))}, step=0)

    def log_model(self, model_bundle, artifact_path: str = "model",
                  registered_model_name: str | None = None) -> None:
        """The exported model (safetensors, config and model card) as an artifact of this run;
        the tag ``tulip.model_card`` names the card's artifact path (``tulip-compare`` links
        it). The same directory is also logged as a pyfunc MLflow model (named
        :data:`MLFLOW_MODEL`), registered as a new version of ``registered_model_name`` when
        that is given (its description: the model card)."""
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
                self._log_mlflow_model(directory, registered_model_name)

    def _log_mlflow_model(self, directory: Path, registered_model_name: str | None) -> None:
        import mlflow

        from tulip_pipelines.models.card import CARD
        from tulip_pipelines.serving.pyfunc import log_embedding_model

        started = time.perf_counter()
        active = mlflow.active_run()
        here = active is not None and active.info.run_id == self.run_id
        with nullcontext() if here else mlflow.start_run(self.run_id, nested=active is not None):
            info = log_embedding_model(directory, MLFLOW_MODEL, registered_model_name,
                                       (directory / CARD).read_text(encoding="utf-8"))
        logger.info("MLflow model %s%s logged in %.1f s", info.model_uri,
                    f" registered as {registered_model_name} version "
                    f"{info.registered_model_version}" if registered_model_name else "",
                    time.perf_counter() - started)


MODEL_CARD_TAG = "tulip.model_card"
MLFLOW_MODEL = "embedder"  # the pyfunc model's name in a stage run


def update_registered_versions(run_id: str | None, tags: Mapping[str, str],
                               description: str | None = None) -> int:
    """Set ``tags`` (and the ``description``) on every registered model version logged by the
    stage run ``run_id``. Returns how many versions; 0, with a log line, when tracking is off or
    the store has none."""
    if not run_id or not tracking_enabled():
        return 0
    import mlflow
    from mlflow.exceptions import MlflowException

    from tulip_pipelines.serving.registry import versions_of_run

    client = mlflow.MlflowClient()
    try:
        versions = versions_of_run(run_id)
        for version in versions:
            for key, value in tags.items():
                client.set_model_version_tag(version.name, version.version, key, value)
            if description is not None:
                client.update_model_version(version.name, version.version,
                                            description=description)
    except MlflowException as err:
        logger.warning("registered versions of run %s not tagged: %s", run_id, err)
        return 0
    for version in versions:
        logger.info("registered model %s version %s: %d tags", version.name, version.version,
                    len(tags))
    return len(versions)


def recall_at_1_tags(metrics) -> dict[str, str]:
    """A model's R@1 rows of ``retrieval_metrics`` as registry tags:
    ``r1/<benchmark>/<direction>`` -> recall in percent (two decimals)."""
    rows = metrics[metrics["k"] == 1]
    return {f"r1/{r.benchmark}/{r.direction}": f"{float(r.recall):.2f}"
            for r in rows.itertuples()}


def log_model_card(card: str | Path, run_id: str | None, artifact_path: str = "model") -> bool:
    """Replace the model card in the ``model/`` artifact of the stage run ``run_id`` (e.g. after
    the evaluation added its retrieval rows). False, with a log line, when tracking is off or
    that run is not in this tracking store."""
    if not run_id or not tracking_enabled():
        return False
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().log_artifact(run_id, str(card), artifact_path)
    except MlflowException as err:
        logger.warning("model card %s not logged to run %s: %s", card, run_id, err)
        return False
    return True


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


def tracking_enabled() -> bool:
    import mlflow

    return mlflow.active_run() is not None or bool(os.environ.get("MLFLOW_TRACKING_URI"))


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any], ds_config: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[StageTracker]:
    """An MLflow run for one stage, nested in the active run if any."""
    if not tracking_enabled():
        yield StageTracker(None)
        return
    import mlflow

    outer = mlflow.active_run()
    # system metrics (CPU, memory, disk, network; GPUs with nvidia-ml-py) every
    # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (MLflow's default: 10) while the stage runs
    with mlflow.start_run(run_name=stage, nested=outer is not None,
                          log_system_metrics=True) as run:
        mlflow.set_tags({"tulip.stage": stage, **dict(tags or {})})
        mlflow.log_params(flatten({stage: dict(params)}))
        if ds_config:
            mlflow.log_params(flatten({"deepspeed": dict(ds_config)}))
            mlflow.log_text(json.dumps(dict(ds_config), indent=2), "deepspeed_config.json")
        logger.info("MLflow run %s for stage %s", run.info.run_id, stage)
        tracker = StageTracker(run.info.run_id, outer.info.run_id if outer else None)
        try:
            yield tracker
        finally:
            tracker.flush()
