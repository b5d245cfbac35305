"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Everything is written to a temporary sibling in the same folder (same filesystem, so the rename
is atomic) whose name ends in :data:`TMP_SUFFIX`; the rename happens only when the write ended
without error, and the temporary is removed otherwise. One place for the project's files:
checkpoint side files, the teacher text embeddings' parts and manifest, model directories,
model cards, prepared shards and their index, heartbeats, the image cache.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".partial"  # what a leftover of an interrupted write ends with


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file path to write ``path``'s content to; renamed onto ``path`` (replacing
    it) when the block ends without error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """``path``'s content becomes ``text`` (UTF-8) at once."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A temporary folder to fill; it replaces ``path`` (an earlier folder there is removed)
    when the block ends without error, and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _sibling(path: Path) -> Path:
    """A name no other process or thread uses, beside ``path`` (created by the writer, so with
    the permissions its umask gives, unlike ``tempfile``'s private 0600 files)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
