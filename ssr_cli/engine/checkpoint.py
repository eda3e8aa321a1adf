"""Atomic, resumable checkpoints.

Files are ``<dir>/step_00001000.pt``, each a ``torch.save`` of plain tensors, numbers, strings and
dicts (no pickled code), so they load with ``weights_only=True``. A write goes to a temporary file in
the same folder, is flushed to disk and then renamed over the target, so a crash never leaves a
half-written checkpoint under a real name. Loading walks from the newest file back and skips any that
fails to load, with a warning.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step_(\d{8,})\.pt$")


def atomic_torch_save(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Owns the checkpoint policy of one training run: where, how often, how many kept."""

    def __init__(self, directory: str | Path, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}.pt"

    def list(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        path = self.path_for(step)
        atomic_torch_save({**state, "step": step}, path)
        for _, old in self.list()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The newest checkpoint that loads; corrupt or truncated ones are skipped with a warning."""
        for step, path in reversed(self.list()):
            try:
                state = torch.load(path, map_location=map_location, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any failure means "unusable", try the previous one
                warnings.warn(f"skipping unreadable checkpoint {path}: {type(exc).__name__}: {exc}", stacklevel=2)
                continue
            if not isinstance(state, dict) or state.get("step") != step:
                warnings.warn(f"skipping checkpoint {path}: its content does not match its name", stacklevel=2)
                continue
            return state
        return None
