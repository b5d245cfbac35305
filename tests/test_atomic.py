"""Atomic writes: the old content or the new, never half, and nothing left behind."""

import os
import stat

import pytest

from tulip_pipelines import atomic


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(atomic.TMP_SUFFIX))


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_a_write_replaces_the_file_with_the_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "card.md"
    atomic.write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    atomic.write_text(path, "newer")
    assert path.read_text() == "newer" and _leftovers(path.parent) == []


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "old.txt").write_text("old")
    with pytest.raises(ValueError), atomic.atomic_directory(path) as tmp:
        (tmp / "weights").write_text("half")
        raise ValueError
    assert sorted(p.name for p in path.iterdir()) == ["old.txt"]
    with atomic.atomic_directory(path) as tmp:
        (tmp / "weights").write_text("w")
    assert sorted(p.name for p in path.iterdir()) == ["weights"]
    assert _leftovers(tmp_path) == []
