"""Project settings (Kedro defaults unless noted)."""

import os

# Nothing in this project may reach the network; Kedro's telemetry plugin asks otherwise.
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from kedro.config import OmegaConfigLoader  # noqa: E402

from tulip_pipelines.hooks import MlflowRunHooks, ProjectHooks  # noqa: E402

HOOKS = (ProjectHooks(), MlflowRunHooks())

CONFIG_LOADER_CLASS = OmegaConfigLoader
def _env(name: str, default: str | None = None) -> str | None:
    """``${env:NAME,default}`` in conf: an environment variable (Kedro allows its own ``oc.env``
    in credentials only; mlflow.yml reads MLFLOW_TRACKING_URI through this)."""
    return os.environ.get(name, default)


CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "custom_resolvers": {"env": _env},
    "default_run_env": "local",
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"]},
    # An environment's parameters are deltas: they deep-merge into base's, so an overlay holds
    # only the keys it changes (and a key added to base reaches every environment).
    "merge_strategy": {"parameters": "soft"},
}
