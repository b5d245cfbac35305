"""Both ends of a parameter check: the values at a bound are accepted, one step past it rejected
with a message that names the field (issue 29, item 6: a bound moved by one must fail a test)."""

import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest


def assert_bounds(make: Callable[..., Any], field: str, accepted: Iterable[Any],
                  rejected: Iterable[Any], message: str | None = None) -> None:
    """``make(**{field: value})`` builds for every ``accepted`` value and raises a ``ValueError``
    naming ``field`` (or matching ``message``) for every ``rejected`` one."""
    for value in accepted:
        try:
            make(**{field: value})
        except ValueError as err:
            raise AssertionError(f"{field}={value!r} is within the bound but rejected: {err}")
    for value in rejected:
        with pytest.raises(ValueError, match=message or re.escape(field)):
            make(**{field: value})
            pytest.fail(f"{field}={value!r} is past the bound but accepted")
