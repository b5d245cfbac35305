"""A tracking server that does not answer stops the run before any node, naming its address,
instead of after MLflow's retries (minutes) or at the first stage (hours)."""

import socket
import time

import pytest
from kedro.framework.session import KedroSession

from tulip_pipelines.tracking.server import TrackingServerDown


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed once the socket is


def test_unreachable_tracking_uri_stops_the_run_at_once(project_copy, monkeypatch):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(TrackingServerDown, match=uri.replace(".", r"\.")):
        with KedroSession.create(project_path=project_copy) as session:
            session.run(pipeline_names=["demo_data"])
    assert time.monotonic() - started < 60
    assert not (project_copy / "data/01_raw/sharegpt4v_demo").exists()  # nothing ran
