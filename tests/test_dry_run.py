"""`--dry-run` of evaluate, probe-channels, diffusability and denoise builds what the run would build (tokenizer,
probe dynamics, flow-probe DiT, LPIPS network, denoiser) without data or weights, and so fails where the run would:
exit 2 with one line naming what to change; a good recipe exits 0 and says what it built."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ssr_cli.cli import app

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
QUICK = str(RECIPES / "quickstart.toml")
DENOISE = str(RECIPES / "denoise.toml")
ENV = {"COLUMNS": "400", "NO_COLOR": "1"}  # wide enough that rich does not wrap the one error line

pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args), env=ENV)


def one_error_line(result) -> str:
    """The single line a user error prints on stderr (and that there is exactly one, with no traceback)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("command, recipe, override, message", [
    ("evaluate", QUICK, 'tokenizer.size="huge"', "tokenizer.size = 'huge' is not a kl-ae size"),
    ("probe-channels", QUICK, 'regularizer.grid="8x8"',
     "regularizer.grid = '8x8' has W·H = 64 basis functions, but the tokenizer's latent has 16 channels"),
    ("diffusability", QUICK, 'diffusability.probe_model="DiT-Q/9"', "unknown DiT model 'DiT-Q/9'"),
    ("diffusability", QUICK, "diffusability.probe_heads=3",
     "probe_heads: hidden_size 128 is not divisible by num_heads 3"),
    ("denoise", DENOISE, "denoise.bottleneck_channels=8", "denoise.bottleneck_channels = 8"),
])
def test_dry_run_fails_with_one_line_where_the_run_would(command, recipe, override, message):
    line = one_error_line(_invoke(command, recipe, "--dry-run", "--set", override))
    assert message in line


@pytest.mark.parametrize("command, recipe, extra, built", [
    ("evaluate", QUICK, (), "dry run: built tokenizer kl-ae/tiny; reconstruction at 32x32"),
    ("evaluate", QUICK, ("--set", 'eval.lpips_weights="alex.pth"', "--set", "eval.image_size=64"),
     "reconstruction at 64x64; LPIPS alex"),
    ("probe-channels", QUICK, (), "probe dynamics fourier 4x4 at 32x32"),
    ("diffusability", QUICK, (), "latent transform none on latents (16, 8, 8); flow-probe DiT DiT-S/2"),
    ("denoise", DENOISE, (), "SSR on the 16 bottleneck channels"),
])
def test_dry_run_of_a_good_recipe_builds_and_exits_0(command, recipe, extra, built):
    result = _invoke(command, recipe, "--dry-run", *extra)
    assert result.exit_code == 0, result.output
    assert built in " ".join(result.stdout.split())
    assert "[run]" in result.stdout  # the resolved recipe is printed first


def test_dry_run_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in ("evaluate", "probe-channels", "diffusability"):
        assert _invoke(command, QUICK, "--dry-run").exit_code == 0
    assert not any(tmp_path.iterdir())  # no run folder, no lock, no resolved recipe
