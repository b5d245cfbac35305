"""Progress of long loops: a tqdm bar on a terminal, a log line per interval otherwise.

A bar written into a file or a CI log is one carriage-return frame per update (megabytes for a
training run); off a terminal this logs a plain line at most every ``interval_s`` seconds, and
one at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)
T = TypeVar("T")


def on_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


class _LogProgress:
    """The part of tqdm's interface the project uses, as log lines."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int, interval_s: float):
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.interval_s = initial, interval_s
        self.started = self.last = time.monotonic()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self._log(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _log(self, now: float) -> None:
        of = f"/{self.total}" if self.total else ""
        rate = self.n / max(now - self.started, 1e-9)
        logger.info("%s: %d%s %s (%.1f %s/s)%s", self.desc, self.n, of, self.unit, rate,
                    self.unit, f" {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        if self.n:
            self._log(time.monotonic())

    def __enter__(self) -> "_LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int | None = None, desc: str = "", unit: str = "it", *, initial: int = 0,
             enabled: bool = True, interval_s: float = 30.0):
    """A progress reporter with ``update(n)``, ``set_postfix(**kw)`` and ``close()``.

    ``enabled=False`` (e.g. on ranks other than 0) reports nothing.
    """
    if enabled and on_terminal():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=False)
    if not enabled:
        return tqdm(total=total, disable=True)
    return _LogProgress(total, desc, unit, initial, interval_s)


def track(iterable: Iterable[T], desc: str = "", unit: str = "it", total: int | None = None,
          **kwargs: Any) -> Iterator[T]:
    """Iterate ``iterable`` while reporting progress (see :func:`progress`)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with progress(total, desc, unit, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update(1)
