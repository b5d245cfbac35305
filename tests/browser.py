"""A real browser for the tests that look at what a user sees: headless Chromium (Debian's
``chromium``, which ``.ci/run`` installs) driven by Playwright, and the local servers it looks
at (the MLflow UI, a static kedro-viz site), each on a free port of 127.0.0.1.

A test skips, saying why, only where no browser can be started here (no ``chromium`` binary or
no ``playwright`` package); CI installs both. Screenshots go to the test's folder and, when
``TULIP_SCREENSHOTS`` names a folder, there too (how the README's picture was taken)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("TULIP_CHROMIUM", "/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def chromium_page(width: int = 1600, height: int = 1000) -> Iterator:
    """A Playwright page in headless Chromium (skips when no browser can be started here)."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no browser: {CHROMIUM} is absent (apt-get install chromium; .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no browser driver: the playwright package is not installed (pip install "
                    "-e .[test])")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def screenshot(page, folder: Path, name: str, full_page: bool = False) -> Path:
    """A PNG of the page under ``folder`` (and ``$TULIP_SCREENSHOTS`` when set)."""
    path = Path(folder) / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    if os.environ.get("TULIP_SCREENSHOTS"):
        target = Path(os.environ["TULIP_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


def _wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server ended (exit {proc.returncode}):\n"
                               f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer in {timeout_s:.0f} s:\n"
                               f"{log.read_text()[-3000:]}")
        time.sleep(0.5)


@contextmanager
def _server(command: list[str], health: str, port: int, log: Path, cwd: Path,
            timeout_s: float = 120) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_http(f"{url}{health}", proc, log, timeout_s)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def mlflow_ui(store_uri: str, cwd: Path, log: Path) -> Iterator[str]:
    """``mlflow server`` over ``store_uri`` (its artifacts where the runs logged them) on a
    free port of 127.0.0.1; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with _server(command, "/health", port, log, cwd) as url:
        yield url


@contextmanager
def static_site(folder: Path, log: Path) -> Iterator[str]:
    """``folder`` served over HTTP on a free port of 127.0.0.1 (a kedro-viz build does not work
    from file://); yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
               "--directory", str(folder)]
    with _server(command, "/", port, log, folder) as url:
        yield url
