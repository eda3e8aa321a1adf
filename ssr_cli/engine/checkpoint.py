"""Atomic, resumable checkpoints.

Files are ``<dir>/step_00001000.pt``, each a ``torch.save`` of plain tensors, numbers, strings and
dicts (no pickled code), so they load with ``weights_only=True``. A write goes to a temporary file in
the same folder, is flushed to disk and then renamed over the target, so a crash never leaves a
half-written checkpoint under a real name. Each file starts with a header (magic + SHA-256 of the
``torch.save`` payload that follows), verified at load: a flipped byte is detected like a truncated file.
Loading walks from the newest file back and skips any that fails to load or to verify, with a warning; a
file that ``weights_only`` refuses (pickled code or other objects, which ssr never writes) stops the run
instead (:class:`CheckpointRefused`): it was put there, not damaged, and is neither used nor pruned.
Old checkpoints are pruned (keep-last-K) only after the new one has been read back and verified, so the
only valid checkpoint is never deleted; a write that fails (a full disk) leaves the previous ones intact.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ssr_cli.engine.atomic import atomic_path
from ssr_cli.errors import UserError, one_line

_NAME = re.compile(r"^step_(\d{8,})\.pt$")
MAGIC = b"SSRCKPT1"
"""First bytes of a checksummed checkpoint; the 32-byte SHA-256 of the payload follows, then the payload."""


class CheckpointRefused(UserError):
    """A checkpoint holds pickled code or objects other than tensors: not loaded, and the run stops."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (full disk, no permission); the previous ones are intact."""


def atomic_torch_save(obj: Any, path: Path, *, checksum: bool = False) -> None:
    """``torch.save`` to a temporary file, flushed to disk, renamed over ``path``; on any failure the temporary
    file is removed and ``path`` (if it existed) is untouched. ``checksum``: write the verified format."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        if checksum:
            buf = io.BytesIO()
            torch.save(obj, buf)
            payload = buf.getbuffer()
            fh.write(MAGIC + hashlib.sha256(payload).digest())
            fh.write(payload)
        else:
            torch.save(obj, fh)


def _verified_payload(path: Path) -> memoryview | None:
    """The payload of a checksummed checkpoint (ValueError when it does not match its checksum), or None for a
    file without the header (written before checksums)."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        return None
    digest, payload = data[len(MAGIC):len(MAGIC) + 32], memoryview(data)[len(MAGIC) + 32:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch: the file was modified or damaged after it was written")
    return payload


def load_checkpoint_file(path: Path) -> Any:
    """Read a checkpoint on the CPU with ``weights_only=True`` (no pickled code), verifying its checksum; a
    mismatch raises ValueError. Files without the header (written before checksums) load with a warning."""
    payload = _verified_payload(path)
    if payload is None:
        warnings.warn(f"{path} has no checksum (written by an older ssr); loading it unverified", stacklevel=3)
        payload = memoryview(Path(path).read_bytes())
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


class Checkpointer:
    """Owns the checkpoint policy of one training run: where, how often, how many kept."""

    def __init__(self, directory: str | Path, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self._verified: dict[tuple[str, int, int], bool] = {}

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
        """Write step ``step`` (CheckpointWriteError when that fails, older ones untouched), then prune."""
        path = self.path_for(step)
        try:
            atomic_torch_save({**state, "step": step}, path, checksum=True)
        except OSError as exc:
            previous = [p.name for s, p in self.list() if s != step]
            raise CheckpointWriteError(
                f"could not write checkpoint {path} ({exc.strerror or exc}); the previous checkpoints are intact "
                f"({', '.join(previous) or 'none yet'}); free space in {self.directory} and run again to resume"
            ) from exc
        # Prune: keep the newest ``keep_last`` checkpoints that verify (and anything newer than the oldest of
        # them), so damaged files never push the last valid one out.
        valid = 0
        for _, p in reversed(self.list()):
            if valid >= self.keep_last:
                p.unlink(missing_ok=True)
            elif self._verifies(p):
                valid += 1
        return path

    def _verifies(self, path: Path) -> bool:
        st = path.stat()
        memo = (str(path), st.st_size, st.st_mtime_ns)
        if memo not in self._verified:
            try:
                self._verified[memo] = _verified_payload(path) is not None
            except (OSError, ValueError):
                self._verified[memo] = False
        return self._verified[memo]

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The newest checkpoint that loads and verifies (on the CPU; ``map_location`` is kept for callers and
        ignored); corrupt, truncated or modified ones are skipped with a warning; one that ``weights_only``
        refuses raises :class:`CheckpointRefused`."""
        for step, path in reversed(self.list()):
            try:
                state = load_checkpoint_file(path)
            except pickle.UnpicklingError as exc:  # weights_only refused it: not damage but foreign content
                raise CheckpointRefused(
                    f"{path} holds pickled code or objects other than tensors ({one_line(exc)}); ssr never writes "
                    "such a checkpoint, so it is not loaded: delete it (or restore a trusted copy) and run again "
                    "to resume from the previous one") from None
            except Exception as exc:  # noqa: BLE001 - any other failure means "unusable", try the previous one
                warnings.warn(f"skipping unreadable checkpoint {path}: {type(exc).__name__}: {one_line(exc)}",
                              stacklevel=2)
                continue
            if not isinstance(state, dict) or state.get("step") != step:
                warnings.warn(f"skipping checkpoint {path}: its content does not match its name", stacklevel=2)
                continue
            return state
        return None
