"""Every registered pipeline name resolves through Kedro's own CLI, as a user types it:
``kedro registry describe NAME`` and ``kedro run --pipelines NAME`` (stopped by a sentinel in the
project hook right before the first node, so the heavy pipelines only resolve)."""

import pytest
import yaml
from click.testing import CliRunner
from kedro.framework.cli.cli import KedroCLI
from kedro.framework.hooks import hook_impl

from tulip_pipelines.hooks import ProjectHooks
from tulip_pipelines.pipeline_registry import COMPOSITES, DEFAULT_ORDER

NAMES = sorted({*DEFAULT_ORDER, *COMPOSITES})


class _Resolved(Exception):
    pass


@pytest.fixture(scope="module")
def cli(project_root, tmp_path_factory):
    """Kedro's CLI in one copy of the project for the module (the commands only read it), the
    working directory meanwhile."""
    from kedro.framework.startup import bootstrap_project

    from tests.conftest import copy_project

    project = copy_project(project_root, tmp_path_factory.mktemp("registry") / "project")
    mp = pytest.MonkeyPatch()
    mp.chdir(project)
    mp.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    bootstrap_project(project)
    yield KedroCLI(project)
    mp.undo()


def test_registry_lists_every_pipeline_and_composite(cli):
    listed = CliRunner().invoke(cli, ["registry", "list"], catch_exceptions=False)
    assert sorted(yaml.safe_load(listed.output)) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_registry_describes_every_name(cli, name):
    result = CliRunner().invoke(cli, ["registry", "describe", name])
    assert result.exit_code == 0, result.output
    nodes = yaml.safe_load(result.output)["Nodes"]
    parts = COMPOSITES.get(name, (name,))
    assert nodes and {node.split(" ")[0] for node in nodes} >= _node_names(parts[0])


@pytest.mark.parametrize("name,env", [("tulip", "sharegpt4v"), ("__default__", None),
                                      ("distill", None), ("ingest", "sharegpt4v")])
def test_kedro_run_resolves_the_pipeline_by_name(cli, monkeypatch, name, env):
    seen = {}

    @hook_impl
    def stop(self, run_params, pipeline, catalog):
        seen["nodes"] = {node.name for node in pipeline.nodes}
        raise _Resolved

    monkeypatch.setattr(ProjectHooks, "before_pipeline_run", stop)
    args = ["run", "--pipelines", name] + (["--env", env] if env else [])
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, _Resolved), result.output
    expected = set().union(*(_node_names(p) for p in COMPOSITES.get(name, (name,))))
    assert seen["nodes"] == expected


def _node_names(pipeline_name: str) -> set[str]:
    import importlib

    module = importlib.import_module(f"tulip_pipelines.pipelines.{pipeline_name}")
    return {node.name for node in module.create_pipeline().nodes}
