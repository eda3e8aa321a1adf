"""`ssr probe-channels` / `ssr evaluate` with no recipe act on the run in the current directory."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from ssr_cli.cli import app

QUICK = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"


def _run_folder(root: Path, name: str, mtime: float) -> Path:
    folder = root / "runs" / name
    folder.mkdir(parents=True)
    text = QUICK.read_text().replace('name = "quickstart"', f'name = "{name}"', 1)
    resolved = folder / "recipe.resolved.toml"
    resolved.write_text(text)
    os.utime(resolved, (mtime, mtime))
    return folder


def _invoke(args, cwd: Path):
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, args)
    finally:
        os.chdir(old)


def test_newest_run_in_cwd_is_picked(tmp_path):
    _run_folder(tmp_path, "older", 1_000_000)
    _run_folder(tmp_path, "newer", 2_000_000)
    for command in (["probe-channels"], ["evaluate", "--gfid"]):
        res = _invoke(command + ["--dry-run"], tmp_path)
        assert res.exit_code == 0, res.output
        assert "runs/newer" in res.output.replace("\n", "")
        assert 'name = "newer"' in res.output


def test_run_folder_itself_is_picked(tmp_path):
    folder = _run_folder(tmp_path, "older", 2_000_000)
    _run_folder(tmp_path, "other", 3_000_000)  # a sibling, not under the run folder
    res = _invoke(["probe-channels", "--dry-run"], folder)
    assert res.exit_code == 0, res.output
    assert 'name = "older"' in res.output


def test_no_run_says_what_to_pass(tmp_path):
    res = _invoke(["evaluate", "--gfid"], tmp_path)
    assert res.exit_code == 2
    assert "pass a recipe" in res.output
    assert "Traceback" not in res.output
