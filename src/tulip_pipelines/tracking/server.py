"""Is the MLflow tracking server there? Checked once before a run, so that a server that does
not answer stops the run at once with its address, rather than after MLflow's own retries (or
hours of training, at the first stage's run)."""

from __future__ import annotations

import urllib.error
import urllib.request

TIMEOUT_S = 10.0


class TrackingServerDown(RuntimeError):
    """The configured MLflow tracking server does not answer."""


def check_tracking_server(uri: str, timeout_s: float = TIMEOUT_S) -> None:
    """For an ``http(s)://`` tracking URI, one request to the server's ``/health`` endpoint
    (MLflow's tracking server has it) without retries; other URIs (sqlite, files, databricks)
    are not checked here."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
            if response.status >= 500:
                raise TrackingServerDown(f"{uri} answered {response.status} on /health")
    except urllib.error.HTTPError as err:
        if err.code >= 500:
            raise TrackingServerDown(
                f"MLflow tracking server {uri} answered {err.code}; fix it or set "
                f"MLFLOW_TRACKING_URI (conf/base/mlflow.yml) to a server that answers") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingServerDown(
            f"MLflow tracking server {uri} does not answer ({reason}); nothing was run. Start "
            f"it, or point MLFLOW_TRACKING_URI (or server.mlflow_tracking_uri in "
            f"conf/local/mlflow.yml) at one that answers, or unset it for the local sqlite "
            f"store") from None
