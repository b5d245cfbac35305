"""Building configuration dataclasses from parameter dicts (shared by every pipeline's config)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def known_params(cls: type, params: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """``params`` as a dict, or a ``ValueError`` naming every key that ``cls`` has no field for
    (``what`` words the message, e.g. ``"ingest parameter"``)."""
    params = dict(params or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; known: {sorted(known)}")
    return params
