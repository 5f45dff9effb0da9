"""Atomic writes: a file or folder is written under a temporary name beside its target, then renamed onto it.

A reader (or a rerun after a kill) never sees half a file: the target is either the old one, untouched, or the whole
new one. Every writer in fm and data_prep that replaces a user's or a corpus's file goes through here.

    with atomic_path("corpus/shards/part-00000.arrow") as tmp:    # any writer that takes a path
        write_something(tmp)
    atomic_write_text("corpus/manifest.json", text)
    with atomic_dir("releases/fm-velocity") as tmp:                 # a folder, swapped in whole
        (tmp / "config.json").write_text("{}")

Temporary names are hidden (``.NAME.tmp-PID-XXXXXXXX.SUFFIX``, the target's suffix kept for writers that read it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import anndata

TMP_MARK = ".tmp-"  # in every temporary name: a rerun removes `.*.tmp-*` files a killed run left


def temporary_name(path: Path) -> Path:
    """A hidden, unique name beside ``path`` with its suffix (``.x.h5ad.tmp-123-0a1b2c3d.h5ad``)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, rename it onto ``path``.

    On any error (or KeyboardInterrupt) the temporary file is removed and ``path`` is left as it was. The parent
    folder is created. The file gets the permissions an ordinary new file gets.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_h5ad_atomic(adata: anndata.AnnData, path: str | os.PathLike) -> Path:
    """``adata.write_h5ad`` atomically."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new, empty temporary folder beside ``path``; when the block ends without an error, swap it in.

    An existing folder at ``path`` is moved aside first and removed only once the new one is in place, so ``path``
    is always either the old folder or the whole new one. On any error the temporary folder is removed and ``path``
    is left as it was. The folder and its files get the permissions ordinary new ones get (not mkdtemp's 0700).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        _make_readable(tmp)
        _swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def _swap_into_place(new: Path, out: Path) -> None:
    if not out.exists():
        os.replace(new, out)
        return
    old = temporary_name(out.with_name(out.name + ".old"))
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old)
