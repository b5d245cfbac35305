"""Parameter classes: how every pipeline turns its ``params:<pipeline>`` block into a checked
object (no Kedro).

Each pipeline's parameters are one dataclass deriving from :class:`Params`. It checks its own
values in ``__post_init__`` (collecting every problem with :class:`Problems`, so a user sees them
all at once) and, in :meth:`Params.check_with`, the rules that span pipelines (e.g. the student's
context against the teacher's). The project hook runs both for every pipeline of a run before any
node starts (``params_checks.py``); the nodes build the same objects again from their inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypeVar

P = TypeVar("P", bound="Params")


def is_int(value: Any, minimum: int | None = None) -> bool:
    """True for an ``int`` (not a ``bool``), at least ``minimum`` when given."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    return ok and (minimum is None or value >= minimum)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Problems:
    """Collects what is wrong with one parameter block; :meth:`raise_if_any` reports them all."""

    def __init__(self, where: str):
        self.where = where
        self.items: list[str] = []

    def add(self, name: str, message: str) -> None:
        self.items.append(f"{self.where}.{name} {message}")

    def check(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            self.add(name, message)

    def int_at_least(self, name: str, value: Any, low: int, *, optional: bool = False) -> None:
        if optional and value is None:
            return
        self.check(is_int(value, low), name,
                   f"must be an integer >= {low}{' or null' if optional else ''}, got {value!r}")

    def number_in(self, name: str, value: Any, low: float | None = None, high: float | None = None,
                  *, low_open: bool = False, optional: bool = False) -> None:
        if optional and value is None:
            return
        ok = is_number(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value <= high
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bounds.append(f"<= {high}")
        bound_text = (" " + " and ".join(bounds)) if bounds else ""
        self.check(ok, name, f"must be a number{bound_text}, got {value!r}")

    def one_of(self, name: str, value: Any, choices: Iterable[Any]) -> None:
        choices = list(choices)
        self.check(value in choices, name, f"must be one of {choices}, got {value!r}")

    def boolean(self, name: str, value: Any) -> None:
        self.check(isinstance(value, bool), name, f"must be true or false, got {value!r}")

    def raise_if_any(self) -> None:
        if self.items:
            raise ValueError("; ".join(self.items))


class Params:
    """Base of every pipeline's parameter dataclass.

    ``section`` is the parameter key the class reads (``"distill"`` for ``params:distill``); it
    words the messages. Subclasses are dataclasses that check their values in ``__post_init__``.
    """

    section: ClassVar[str] = ""

    @classmethod
    def from_params(cls: type[P], params: Mapping[str, Any] | None) -> P:
        """Build from a parameters dict; unknown keys are an error that names them."""
        return cls(**known_params(cls, params, f"{cls.section} parameter"))

    @classmethod
    def from_all(cls: type[P], all_params: Mapping[str, Any]) -> P:
        """Build from every parameter of the run (a class that reads another pipeline's block
        overrides this)."""
        return cls.from_params(all_params.get(cls.section))

    def check_with(self, all_params: Mapping[str, Any]) -> None:
        """Rules that span pipelines, given every parameter of the run (default: none)."""

    def run_dirs(self) -> list[str]:
        """The training run dirs this pipeline writes (locked for the run; default: none)."""
        return []

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def known_params(cls: type, params: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """``params`` as a dict, or a ``ValueError`` naming every key that ``cls`` has no field for
    (``what`` words the message, e.g. ``"ingest parameter"``)."""
    params = dict(params or {})
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; known: {sorted(known)}")
    return params
