"""What the evaluation writes into MLflow: each model's recall in the stage run that trained it,
the registered versions' tags and cards, the ``champion`` alias, and the parent run's headline
(metrics ``long_r1/<model>``, the report and its charts)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

from tulip_pipelines.tracking.stage_runs import CHAMPION, tracking_enabled

logger = logging.getLogger(__name__)

LONG_R1_TAG = "long_r1"  # a registered version's mean R@1 over the long-caption benchmarks
NOTE_CHARS = 8000  # MLflow's limit on a tag value


def eval_metrics(metrics, accuracy=None) -> dict[str, float]:
    """One model's rows of ``retrieval_metrics`` (and of ``classification_metrics``) as the
    metrics of the run that trained it: ``eval/<benchmark>/<direction>_r<k>`` and
    ``eval/<benchmark>/top<k>`` (the same names in every stage run, so that the runs table, the
    charts and the compare page put the models side by side)."""
    out = {f"eval/{r.benchmark}/{r.direction}_r{r.k}": float(r.recall)
           for r in metrics.itertuples()}
    if accuracy is not None:
        out.update({f"eval/{r.benchmark}/top{r.k}": float(r.accuracy)
                    for r in accuracy.itertuples()})
    return out


def long_r1(metrics, long_benchmarks) -> dict[str, float]:
    """Each model's R@1 on the long-caption benchmarks: the mean over them and both directions
    (model -> recall in percent; models without such rows left out)."""
    rows = metrics[(metrics["k"] == 1) & metrics["benchmark"].isin(list(long_benchmarks))]
    return {str(k): float(v) for k, v in rows.groupby("model", sort=False)["recall"].mean().items()}


def log_eval_to_stage_run(run_id: str | None, metrics, accuracy=None) -> bool:
    """Log ``eval_metrics(metrics, accuracy)`` into the stage run ``run_id`` (step 0). False,
    with a log line, when tracking is off or that run is not in this store."""
    if not run_id or not tracking_enabled():
        return False
    import mlflow
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    now = int(time.time() * 1000)
    try:
        mlflow.MlflowClient().log_batch(
            run_id, metrics=[Metric(k, v, now, 0)
                             for k, v in eval_metrics(metrics, accuracy).items()])
    except MlflowException as err:
        logger.warning("evaluation metrics not logged to run %s: %s", run_id, err)
        return False
    return True


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


def move_champion() -> str | None:
    """Put the ``champion`` alias on the registered version with the highest :data:`LONG_R1_TAG`
    among every registered model of the store (taking it from wherever it was). Returns
    ``"<name>/<version>"`` of the champion, None when no version has the tag."""
    import mlflow

    client = mlflow.MlflowClient()
    best, holders = None, []
    for model in client.search_registered_models():
        if CHAMPION in (model.aliases or {}):
            holders.append(model.name)
        for version in client.search_model_versions(f"name='{model.name}'"):
            value = version.tags.get(LONG_R1_TAG)
            if value is not None and (best is None or float(value) > best[0]):
                best = (float(value), version.name, str(version.version))
    if best is None:
        return None
    for name in holders:
        if name != best[1]:
            client.delete_registered_model_alias(name, CHAMPION)
    client.set_registered_model_alias(best[1], CHAMPION, best[2])
    logger.info("@%s: %s version %s (long-caption R@1 %.2f)", CHAMPION, best[1], best[2],
                best[0])
    return f"{best[1]}/{best[2]}"


def log_headline(run_id: str, headline: dict[str, float], report: str, figures) -> None:
    """The parent run's metrics ``long_r1/<model>`` (step 0), ``retrieval_report.md`` and the
    charts; its description: the report's recall table."""
    import time

    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"long_r1/{model}", value, now, 0)
                                      for model, value in headline.items()])
    client.log_text(run_id, report, "retrieval_report.md")
    # the run's description in the UI (Markdown): the recall table, the report's first section
    client.set_tag(run_id, "mlflow.note.content", report.split("\n## ")[0][:NOTE_CHARS])
    for name, figure in figures.items():
        client.log_figure(run_id, figure, name)
    logger.info("parent MLflow run %s: long-caption R@1 %s", run_id,
                ", ".join(f"{m} {v:.1f}" for m, v in headline.items()))


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
