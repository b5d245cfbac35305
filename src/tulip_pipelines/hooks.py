"""Project hooks: check configuration and inputs before any heavy work starts (parameters, the
tracking server, the inputs on disk) and lock the run's training run dirs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from tulip_pipelines.params_checks import check_parameters, params_classes
from tulip_pipelines.tracking.server import check_tracking_server
from tulip_pipelines.training import run_dir as locks  # the run dirs' locks

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
                    locks.acquire(run_dir)
                except locks.RunDirBusy:
                    self._release()
                    raise
                self._locked.append(run_dir)

    def _release(self) -> None:
        while self._locked:
            locks.release(self._locked.pop())

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
    """Where a missing input was expected, for the error message."""
    try:
        dataset = catalog.get(name)
    except Exception:  # noqa: BLE001 - only used to word an error message
        return "not in the catalog"
    where = _filepath(catalog, name) or getattr(dataset, "_describe", lambda: {})()
    return f"expected at {where}" if where else type(dataset).__name__


class MlflowRunHooks:
    """What kedro-mlflow's run of a ``kedro run`` (the parent of the stage runs) shows: the
    experiment marked as model training, a name for what ran and when, readable tags, a link
    that opens it in the UI's Model training view; and, around each node, its catalogued inputs
    for the stage run it may open (logged as that run's datasets)."""

    @hook_impl(trylast=True)  # after kedro-mlflow started its run
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        import mlflow

        run = mlflow.active_run()
        if run is None:
            return
        from tulip_pipelines.tracking.stage_runs import mark_model_training

        mark_model_training(run.info.experiment_id)
        mlflow.set_tags(parent_run_tags(run_params, run.info.start_time, Path.cwd()))

    @hook_impl(tryfirst=True)  # before kedro-mlflow ends its run
    def after_pipeline_run(self) -> None:
        import mlflow

        run = mlflow.active_run()
        if run is not None:
            logger.info("MLflow: this run is %s", run_link(mlflow.get_tracking_uri(),
                                                          run.info.experiment_id,
                                                          run.info.run_id))

    @hook_impl
    def before_node_run(self, node, catalog, inputs: dict[str, Any]) -> None:
        from tulip_pipelines.tracking.stage_runs import set_node_inputs

        set_node_inputs({name: (value, _filepath(catalog, name)) for name, value in inputs.items()
                         if not name.startswith("params:") and name != "parameters"})

    @hook_impl
    def after_node_run(self, node) -> None:
        from tulip_pipelines.tracking.stage_runs import set_node_inputs

        set_node_inputs({})

    @hook_impl
    def on_node_error(self, node) -> None:
        from tulip_pipelines.tracking.stage_runs import set_node_inputs

        set_node_inputs({})


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where the UI shows the run, in its Model training view (MLflow 3.17 opens in GenAI unless
    the link says ``workflowType=machine_learning``); for a local store, the ``mlflow ui`` that
    serves it first."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return (f"http://127.0.0.1:5000/{page} (after `mlflow ui --backend-store-uri {tracking_uri} "
            f"--port 5000`)")


def parent_run_tags(run_params: dict[str, Any], start_time_ms: int,
                    project: Path) -> dict[str, str]:
    """The parent run's name (``mlflow.runName``: pipelines, Kedro environment, start time in
    UTC), its ``runner`` (the class name, not the object's repr), ``env`` and, in a git
    checkout, ``mlflow.source.git.commit``."""
    from datetime import datetime, timezone

    pipelines = run_params.get("pipeline_names") or [run_params.get("pipeline_name")
                                                      or "__default__"]
    shown = "+".join("default" if name == "__default__" else name for name in pipelines)
    env = run_params.get("env") or "local"  # settings: default_run_env
    started = datetime.fromtimestamp(start_time_ms / 1000, tz=timezone.utc)
    tags = {"mlflow.runName": f"{shown} · {env} · {started:%Y-%m-%d %H:%M:%S} UTC",
            "runner": _class_name(run_params.get("runner")), "env": env}
    commit = _git_commit(project)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _class_name(runner: Any) -> str:
    """``<kedro.runner.sequential_runner.SequentialRunner object at 0x..>`` -> its class name."""
    import re

    if runner is None or runner == "None":  # KedroSession.run without one: its default
        return "SequentialRunner"
    if not isinstance(runner, str):
        return type(runner).__name__
    found = re.match(r"<([\w.]+) object at", runner)
    return found.group(1).rsplit(".", 1)[-1] if found else runner.rsplit(".", 1)[-1]


def _git_commit(project: Path) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _filepath(catalog, name: str) -> str | None:
    try:
        described = getattr(catalog.get(name), "_describe", lambda: {})()
    except Exception:  # noqa: BLE001 - only names a dataset's source
        return None
    where = described.get("filepath") or described.get("path")
    return str(where) if where else None
