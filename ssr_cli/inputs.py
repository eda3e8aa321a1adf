"""Content fingerprints of a stage's inputs, so a result made from other inputs is never reused.

A stage that caches its output (latent shards, DiT checkpoints, sample PNGs, pipeline stage records) writes
next to it the key its output was made with: SHA-256 hashes of the files it read and the recipe settings that
shape it. When the key differs on the next run, the stale output is deleted (with a message) and redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ssr_cli.engine.atomic import write_json_atomic

_HASHES: dict[tuple[str, int, int], str] = {}


def file_identity(path: str | Path) -> tuple[str, int, int, int, int]:
    """(real path, device, inode, size, modification time in ns) of a file as it is now: the key of the per-process
    caches of what is read from it (a tar's index, the Inception and LPIPS models)."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def file_sha256(path: str | Path | None) -> str | None:
    """SHA-256 of a file's bytes (None when there is no such file); memoised per (path, size, mtime)."""
    if path is None or not Path(path).is_file():
        return None
    st = Path(path).stat()
    memo = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


def settings(section, *drop: str) -> dict:
    """A recipe section as plain JSON values, without the keys in ``drop`` (ones that do not shape the output)."""
    values = section.model_dump(mode="json")
    for key in drop:
        values.pop(key, None)
    return values


def refresh(marker: Path, key: dict, stale: Iterable[Path], label: str, console=None) -> bool:
    """Compare ``key`` with the one recorded in ``marker``; when they differ, delete ``stale`` (files or folders),
    say what changed, and record ``key``. Returns True when stale output was discarded. No marker yet: the
    output (if any) is kept, as an interrupted first run must resume."""
    marker = Path(marker)
    discarded = False
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != key:
            changed = sorted(k for k in key if not isinstance(old, dict) or old.get(k) != key[k]) or ["format"]
            present = [p for p in stale if Path(p).exists()]
            if console is not None and present:
                console.print(f"[bold yellow]{label}: inputs changed ({', '.join(changed)}); discarding "
                              f"{len(present)} stale output(s) and redoing it")
            for p in present:
                shutil.rmtree(p) if Path(p).is_dir() else Path(p).unlink(missing_ok=True)
            discarded = bool(present)
    write_json_atomic(marker, key, indent=2, sort_keys=True)
    return discarded
