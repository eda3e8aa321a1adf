"""Rich progress bars, the metrics.jsonl log (rank 0 only) and the one helper that prints result tables."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ssr_cli.engine.atomic import write_text_atomic

console = Console(stderr=True)


def print_result_table(title: str, labels: Sequence[str], values: Sequence[str],
                       rows: Iterable[Sequence[str]]) -> Table:
    """Print one result table to the console and return it: the ``labels`` columns (what a row is) left-aligned,
    then the ``values`` columns (one per run, arm or value) right-aligned; each row gives every column's text."""
    table = Table(title=title)
    for name in labels:
        table.add_column(name)
    for name in values:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return table


class PlainProgress:
    """What :func:`make_progress` gives when the output is not a terminal (a log file, a scheduler): one plain
    line per task every ``1/lines`` of its total and at its end — done/total, the status (loss), the rate, ETA."""

    def __init__(self, stream=None, lines: int = 20, disable: bool = False) -> None:
        self.stream = stream
        self.lines = lines
        self.disable = disable
        self.tasks: dict[int, dict] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: int | None = None, completed: int = 0, **fields) -> int:
        key = len(self.tasks)
        every = max(1, (total or 0) // self.lines)
        self.tasks[key] = {"name": description, "total": total, "done": completed, "start": completed,
                           "t0": time.perf_counter(), "every": every, "next": (completed // every + 1) * every,
                           "fields": dict(fields)}
        return key

    def update(self, key: int, *, advance: int | None = None, completed: int | None = None, **fields) -> None:
        task = self.tasks[key]
        task["fields"].update(fields)
        if completed is not None:
            task["done"] = completed
        if advance is not None:
            task["done"] += advance
        total = task["total"]
        if task["done"] >= task["next"] or (total is not None and task["done"] >= total and not task.get("ended")):
            task["next"] = (task["done"] // task["every"] + 1) * task["every"]
            task["ended"] = total is not None and task["done"] >= total
            self._line(task)

    def _line(self, task: dict) -> None:
        if self.disable:
            return
        elapsed = time.perf_counter() - task["t0"]
        moved = task["done"] - task["start"]
        parts = [task["name"], f"{task['done']}/{task['total']}" if task["total"] is not None else str(task["done"])]
        parts += [str(v) for v in task["fields"].values() if v]
        if moved > 0 and task["total"] is not None:
            eta = (task["total"] - task["done"]) * elapsed / moved
            if not task["fields"].get("rate"):  # the caller's own rate readout wins
                parts.append(f"{moved / elapsed:.2f} it/s" if elapsed > 0 else "")
            parts.append(f"elapsed {_hms(elapsed)} ETA {_hms(eta)}")
        print(" | ".join(p for p in parts if p), file=self.stream or sys.stdout, flush=True)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def make_progress(disable: bool = False) -> Progress | PlainProgress:
    """A progress bar showing step/total, a free-text status (loss), it/s and ETA; plain lines
    (:class:`PlainProgress`) when the output is not a terminal."""
    if not console.is_terminal:
        return PlainProgress(stream=console.file, disable=disable)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )


class RateMeter:
    """Iterations per second over the recent window."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.n = 0

    def tick(self, n: int = 1) -> None:
        self.n += n

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.n / dt if dt > 0 else 0.0

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.n = 0


class MetricsLog:
    """Append-only JSON lines, one record per logged step; truncated to a step on resume."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records beyond ``step`` (written after the checkpoint a resumed run starts from)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
