"""Project hooks: check configuration and inputs before any heavy work starts."""

from __future__ import annotations

import logging
from typing import Any

from kedro.framework.hooks import hook_impl

from tulip_pipelines.config_checks import check_parameters

logger = logging.getLogger(__name__)


class MissingInputsError(RuntimeError):
    """Inputs of the pipeline to run are not on disk and nothing in the run produces them."""


class ProjectHooks:
    @hook_impl
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
