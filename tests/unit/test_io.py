"""Atomic writes (fm/io.py): a half-written file or folder never replaces a good one, and leaves nothing behind.

    .venv/bin/python -m pytest -q tests/unit/test_io.py
"""

from __future__ import annotations

import os
import stat

import pytest

from fm.io import atomic_dir, atomic_path, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ordinary_mode(kind: str) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if kind == "dir" else 0o666) & ~umask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    out = atomic_write_text(tmp_path / "a.json", "good\n")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert out.read_text() == "good\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_write_replaces_the_file_with_its_suffix_kept_and_ordinary_permissions(tmp_path):
    out = tmp_path / "deep" / "fig.png"  # the folder is created
    with atomic_path(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".fig.png.tmp-") and tmp.suffix == ".png"
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and _mode(out) == _ordinary_mode("file")
    assert sorted(p.name for p in out.parent.iterdir()) == ["fig.png"]


def test_a_failed_folder_keeps_the_old_one_and_a_new_one_is_swapped_in_whole(tmp_path):
    out = tmp_path / "release"
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("old")
    for target in (out, tmp_path / "new"):
        with pytest.raises(RuntimeError, match="disk full"), atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("half")
            raise RuntimeError("disk full")
    assert (out / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "sub").mkdir()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "sub"]
    assert (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]  # the old folder is gone
    assert _mode(out) == _mode(out / "sub") == _ordinary_mode("dir")  # not mkdtemp's 0700
    assert _mode(out / "config.json") == _ordinary_mode("file")
