"""``mlflow models serve`` in the background, on 127.0.0.1 (what the serving test and
``bench/serve_latency.py`` start): :func:`scoring_server` starts it in this Python environment
(``--env-manager local``), waits for ``/ping`` and stops it, with its process group, on exit;
:func:`invoke` posts a request."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def invoke(url: str, payload: dict, timeout_s: float = 60.0) -> tuple[int, dict | str]:
    """POST ``payload`` (JSON) to ``url``: ``(status, the decoded answer)`` (an error's body as
    text)."""
    request = urllib.request.Request(url, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def scoring_server(model_uri: str, tracking_uri: str, timeout_s: float = 120.0,
                   workers: int = 1) -> Iterator[str]:
    """The server's base URL (``http://127.0.0.1:<free port>``) while it serves ``model_uri``
    from the store ``tracking_uri``. Raises ``RuntimeError`` with the end of its log when it
    exits or does not answer ``/ping`` within ``timeout_s``."""
    port = free_port()
    here = Path(sys.executable).parent  # the server starts `uvicorn` from the PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{here}{os.pathsep}{os.environ.get('PATH', '')}"}
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [str(here / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_for_ping(url, process, log, timeout_s)
            yield url
        finally:
            _stop(process)


def _wait_for_ping(url: str, process: subprocess.Popen, log, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the scoring server exited ({process.returncode}):\n"
                               f"{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the scoring server did not answer /ping in {timeout_s:.0f} s:\n"
                               f"{_tail(log)}")
        time.sleep(0.25)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]
