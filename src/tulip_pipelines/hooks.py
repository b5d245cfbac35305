"""Project hooks: check configuration and inputs before any heavy work starts (parameters, the
tracking server, the inputs on disk) and lock the run's training run dirs."""

from __future__ import annotations

import logging
from typing import Any

from kedro.framework.hooks import hook_impl

from tulip_pipelines.params_checks import check_parameters, params_classes
from tulip_pipelines.tracking_check import check_tracking_server
from tulip_pipelines.training import run_lock

logger = logging.getLogger(__name__)


class MissingInputsError(RuntimeError):
    """Inputs of the pipeline to run are not on disk and nothing in the run produces them."""


class ProjectHooks:
    def __init__(self) -> None:
        self._locked: list[str] = []

    @hook_impl(tryfirst=True)  # before kedro-mlflow contacts the server (MLflow's retries)
    def after_context_created(self, context) -> None:
        """A tracking server that does not answer stops the run now, naming its address."""
        try:
            server = (context.config_loader["mlflow"] or {}).get("server") or {}
        except Exception:  # noqa: BLE001 - no mlflow.yml: kedro-mlflow's defaults, nothing to check
            return
        check_tracking_server(str(server.get("mlflow_tracking_uri") or ""))

    @hook_impl(tryfirst=True)  # before kedro-mlflow starts a run
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        """Fail fast: validate parameters and check that every free input exists.

        A typo in ``parameters_distill.yml`` or a placeholder path in ``conf/sharegpt4v`` is
        reported here, before demo data is drawn or a model is trained, with every problem at once.
        """
        params = catalog.load("parameters") if "parameters" in catalog else {}
        read = {name[len("params:"):] for name in pipeline.inputs() if name.startswith("params:")}
        problems = check_parameters(params, pipeline_names=_node_tags(pipeline), shared=read)
        missing = [
            f"{name} ({_describe(catalog, name)})"
            for name in sorted(pipeline.inputs())
            if not name.startswith("params:") and name != "parameters" and not catalog.exists(name)
        ]
        if missing:
            problems.append(
                "inputs that are neither on disk nor produced by this run: "
                + "; ".join(missing)
                + ". Run the pipeline that produces them first, or point the catalog at your copy."
            )
        if problems:
            raise MissingInputsError(
                "configuration problems found before running:\n  - " + "\n  - ".join(problems)
            )
        logger.info(
            "checked parameters and %d inputs of the pipeline to run", len(pipeline.inputs())
        )
        self._lock_run_dirs(params, _node_tags(pipeline))

    def _lock_run_dirs(self, params: dict[str, Any], pipeline_names: set[str]) -> None:
        """Every training run dir of the run, locked until it ends: a second ``kedro run`` on
        them stops here, before any node, naming the run that holds them."""
        classes = params_classes()
        for name in sorted(pipeline_names & set(classes)):
            for run_dir in classes[name].from_all(params).run_dirs():
                try:
                    run_lock.acquire(run_dir)
                except run_lock.RunDirBusy:
                    self._release()
                    raise
                self._locked.append(run_dir)

    def _release(self) -> None:
        while self._locked:
            run_lock.release(self._locked.pop())

    @hook_impl
    def after_pipeline_run(self, run_params, run_result, pipeline, catalog) -> None:
        self._release()

    @hook_impl
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        self._release()


def _node_tags(pipeline) -> set[str]:
    tags: set[str] = set()
    for node in pipeline.nodes:
        tags |= set(node.tags)
    return tags


def _describe(catalog, name: str) -> str:
    try:
        dataset = catalog.get(name)
    except Exception:  # noqa: BLE001 - only used to word an error message
        return "not in the catalog"
    described = getattr(dataset, "_describe", lambda: {})()
    where = described.get("filepath") or described.get("path") or described
    return f"expected at {where}" if where else type(dataset).__name__
