"""Shared test fixtures. Everything runs on CPU; nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# torch is imported inside the functions: the xdist controller loads this file too and needs no torch (2.5 s before
# it starts the workers).

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _set_up_xdist_worker() -> None:
    """Under ``pytest -n N`` (pytest-xdist), undo the worker's COLUMNS=80 and give worker k its own share of
    this process's CPUs: its torch threads and every command it starts (``run.threads = 0`` means the CPU set's cores) then use those cores
    only, instead of N workers × all cores fighting over them (OpenMP threads slow down many times over when
    oversubscribed). With more workers than CPUs the scheduler is left alone."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count:
        return
    # xdist starts its workers with COLUMNS=80; rich would fix every module-level console at 80 columns and
    # ignore the COLUMNS a test passes to CliRunner, so the worker sees the terminal a serial run sees.
    if os.environ.get("COLUMNS") == "80":
        del os.environ["COLUMNS"]
    if not hasattr(os, "sched_setaffinity"):
        return
    cpus, index, count = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw")), int(count)
    if count > len(cpus):
        return
    share = cpus[index * len(cpus) // count:(index + 1) * len(cpus) // count]
    os.sched_setaffinity(0, share)
    import torch

    torch.set_num_threads(len(share))


_set_up_xdist_worker()


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny models: on a small shared CPU two threads mostly wait on
    each other (OpenMP barriers), which makes these tiny ops many times slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the project; tests using it are skipped with a reason where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def ssr_in_process(monkeypatch, one_thread):
    """A ``run_command(args)`` for the study drivers that runs ``ssr <args>`` in this process, from the repository
    root as the child process would, raising CalledProcessError (with the command's output) where the child
    would have exited non-zero. It saves each command a fresh interpreter's imports (torch, torch._dynamo,
    torchvision: ~5 s on one core); the command line, recipe and outputs are the same."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from ssr_cli.cli import app

    monkeypatch.chdir(Path(__file__).resolve().parents[1])

    def run_command(args: list[str]) -> None:
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
        print(result.output, end="")
        if result.exit_code != 0:
            raise subprocess.CalledProcessError(result.exit_code, [sys.executable, "-m", "ssr_cli", *args],
                                                output=result.output)

    return run_command
