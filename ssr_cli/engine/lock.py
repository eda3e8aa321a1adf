"""One writer per run folder: ``<run>/.lock`` names the holder (PID, host, start time).

Taken by rank 0 of a job when a command starts writing a run folder, removed when it ends; the other ranks
of the same ``torchrun`` job write only where rank 0 decides, so they share rank 0's lock. A second command
on the same folder is refused with the holder's PID and host. A lock left by a process that no longer
exists on this host (killed, crashed) is stale and taken over with a note; a lock from another host cannot
be checked from here and is refused with what to delete if that job is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ssr_cli.errors import UserError

LOCK_NAME = ".lock"


class RunLocked(UserError):
    """Another live process is writing this run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False
        self.note: str | None = None
        """Set when a stale lock was taken over (what it said)."""

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # being written right now, or garbage: look again, then treat as stale
                    time.sleep(0.05)
                    holder = self._read()
                if holder is not None and holder.get("host") != me["host"]:
                    raise RunLocked(f"{self.path.parent} is in use by PID {holder.get('pid')} on host "
                                    f"{holder.get('host')} (lock {self.path}); wait for it, use another run.name, or "
                                    "delete the lock file if that job is no longer running")
                if holder is not None and holder.get("pid") != me["pid"] and _alive(int(holder.get("pid", -1))):
                    raise RunLocked(f"{self.path.parent} is in use by PID {holder['pid']} on this host "
                                    f"({holder['host']}); wait for it to finish or use another run.name")
                self.note = f"took over a stale lock of PID {holder.get('pid') if holder else '?'} (no longer running)"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise RunLocked(f"could not take the lock {self.path}; another process keeps creating it")

    def _read(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) and "pid" in data else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            holder = self._read()
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


@contextlib.contextmanager
def exclusive(path: str | Path, *, blocking: bool) -> Iterator[bool]:
    """An advisory exclusive lock (``flock``) on ``path`` for the ``with`` block: yields True when held, or
    False at once when another process holds it and not ``blocking``. The kernel drops it when the holder
    exits, however it exits, so it never goes stale. Used by the study drivers to share work between
    processes (one per core): each takes the next step nobody holds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
