"""The study drivers stay runnable: each on a toy size, checking that it writes its report and skips finished runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # four CLI runs in child processes
def test_quickstart_seed_driver_reports_and_skips_finished_runs(tmp_path, capsys):
    driver = _load(ROOT / "studies" / "quickstart_seeds" / "driver.py")
    argv = ["--seeds", "0", "--steps", "1", "--pretrain-steps", "2", "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results")]
    driver.main(argv)
    report = json.loads((tmp_path / "results" / "report.json").read_text())
    assert sorted(r["arm"] for r in report["runs"]) == ["none", "ssr"]
    assert all(r["finetune_s"] > 0 for r in report["runs"])
    stamp = (tmp_path / "runs" / "s0-ssr" / "probe" / "probe.json").stat().st_mtime_ns
    capsys.readouterr()
    driver.main(argv)
    assert "s0-ssr: finished, skipped" in capsys.readouterr().out
    assert (tmp_path / "runs" / "s0-ssr" / "probe" / "probe.json").stat().st_mtime_ns == stamp
