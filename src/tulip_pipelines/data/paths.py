"""Image paths of caption records: relative to the image root, never escaping it (no Kedro, no
heavy imports: the image writer processes of prepare_images use it too)."""

from __future__ import annotations

import posixpath


def check_image_path(image: str) -> str | None:
    """Normalised relative form of ``image``, or None if absolute or escaping the image root."""
    if image.startswith(("/", "\\")) or (len(image) > 1 and image[1] == ":"):
        return None
    normalised = posixpath.normpath(image.replace("\\", "/"))
    if normalised == ".." or normalised.startswith("../") or normalised == ".":
        return None
    return normalised
