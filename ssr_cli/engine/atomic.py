"""Atomic file writes: every file the package writes goes through here.

A write goes to a temporary file in the target's folder (``.<stem>.tmp<pid><suffix>``: hidden, unique per
process, same extension so writers that pick a format by extension still do), is flushed to disk and then
renamed over the target with ``os.replace``. A crash or an exception therefore never leaves a truncated file
under the real name: the target is either the old file (or absent) or the complete new one, and the temporary
file is removed on failure. This module imports no torch, so torch-free modules (``recipe.py``) can use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_path_for(path: str | os.PathLike) -> Path:
    """The temporary name a write of ``path`` uses: hidden, in the same folder, with the same suffix."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def commit(tmp: str | os.PathLike, path: str | os.PathLike, *, fsync: bool = True) -> Path:
    """Flush the finished ``tmp`` to disk (``fsync``) and rename it over ``path``; returns ``path``."""
    if fsync:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, path)
    return Path(path)


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on a normal exit it is committed over ``path``,
    on an exception it is removed and ``path`` is untouched. Creates ``path``'s folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        commit(tmp, path, fsync=fsync)
    finally:
        tmp.unlink(missing_ok=True)  # gone after a commit; a leftover of a failed write otherwise


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any], *, fsync: bool = True) -> Path:
    """Call ``writer(tmp)`` to write the file at the temporary path, then commit it over ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        writer(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """Write ``json.dumps(obj, **dumps_kwargs)`` to ``path`` atomically (pass ``indent=2`` etc. as before)."""
    return write_text_atomic(path, json.dumps(obj, **dumps_kwargs))
