"""All-or-nothing writes of files and folders: a reader (or a run killed mid-save) never sees a half-written one."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block returns, fsync it and ``os.replace`` it onto
    ``path`` (atomic on POSIX within one filesystem). If the block raises, the temporary file is removed and
    ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_dir(folder: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``folder`` (named ``.tmp-<name>-…``); once the block returns, swap it
    into place with ``replace_dir``. If the block raises, the temporary folder is removed and ``folder`` is left as
    it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        yield tmp
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(complete: str | Path, folder: str | Path) -> None:
    """Move the finished folder ``complete`` onto ``folder`` (same filesystem). An existing ``folder`` is first
    renamed aside (``.tmp-old-<name>-<pid>``) and deleted after, so ``folder`` is always the old or the new one whole."""
    complete, folder = Path(complete), Path(folder)
    if not folder.exists():
        os.replace(complete, folder)
        return
    old = folder.with_name(f".tmp-old-{folder.name}-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    os.replace(complete, folder)
    shutil.rmtree(old, ignore_errors=True)
