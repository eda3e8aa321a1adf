"""`ssr derive-a` through Typer's CliRunner, as users type it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from ssr_cli import bases
from ssr_cli.cli import app

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, ["derive-a", *args], env=ENV)

    return invoke


def test_readme_example_writes_png(run, tmp_path):
    result = run("--basis", "legendre", "--size", "8", "--plot")
    assert result.exit_code == 0, result.output
    png = tmp_path / "A_legendre_8x8.png"
    assert png.is_file() and "A_legendre_8x8.png" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    out = result.output
    assert "64 × 64" in out and "strictly upper triangular" in out and "192 of 4096" in out
    assert "0 | 1 8 | 2 9 16" in out  # frequency order groups


def test_plot_path_and_hermite(run, tmp_path):
    target = tmp_path / "figs" / "herm.png"
    result = run("--basis", "hermite", "--size", "2x3", "--plot-path", str(target))
    assert result.exit_code == 0, result.output
    with Image.open(target) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_npy_output_equals_library(run, tmp_path):
    result = run("--basis", "chebyshev", "--size", "4x8", "--out", "a.npy")
    assert result.exit_code == 0, result.output
    A = np.load(tmp_path / "a.npy")
    assert A.dtype == np.float64 and A.shape == (32, 32)
    np.testing.assert_array_equal(A, bases.a_matrix("chebyshev", 4, 8))
    result = run("--basis", "chebyshev", "--size", "4x8", "--raw", "--orthonormal", "--out", "b.npy")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"),
                                  bases.a_matrix("chebyshev", 4, 8, normalize=False, orthonormal=True))


def test_safetensors_and_pt_outputs(run, tmp_path):
    result = run("--basis", "fourier", "--size", "3", "--discretization", "euler", "--delta", "0.5",
                 "--out", "a.safetensors")
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "a.safetensors"), "np") as f:
        meta = f.metadata()
        A, A_bar = f.get_tensor("A"), f.get_tensor("A_bar")
    np.testing.assert_array_equal(A, bases.a_matrix("fourier", 3, 3))
    np.testing.assert_allclose(A_bar, np.eye(9) + 0.5 * A)
    assert meta["basis"] == "fourier" and meta["size"] == "3x3" and meta["normalization"] == "max_abs_1"
    assert float(meta["delta"]) == 0.5 and meta["discretization"] == "euler"

    result = run("--basis", "legendre", "--size", "3x2", "--raw", "--out", "a.pt")
    assert result.exit_code == 0, result.output
    blob = torch.load(tmp_path / "a.pt", weights_only=True, map_location="cpu")
    A = bases.a_matrix("legendre", 3, 2, normalize=False)
    np.testing.assert_array_equal(blob["A"].numpy(), A)
    np.testing.assert_allclose(blob["A_bar"].numpy(), bases.discretize(A, 0.1, "zoh"))
    assert blob["meta"]["normalization"] == "raw"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "0"], "grid size must be at least 1x1"),
        (["--size", "8x"], "grid size must be"),
        (["--basis", "wavelet"], "unknown basis 'wavelet'"),
        (["--discretization", "rk4"], "unknown discretization"),
        (["--delta", "-1"], "delta must be a positive number"),
        (["--out", "a.txt"], "use a file name ending in .npy"),
        (["--set", "regularizer.basis=\"hermite\""], "--set needs a RECIPE"),
    ],
)
def test_bad_arguments_exit_2(run, args, message):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_recipe_defaults_and_overrides(run, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[regularizer]\nbasis = "legendre"\ngrid = "2x3"\ndiscretization = "euler"\ndelta_init = 0.25\n')
    result = run(str(recipe), "--out", "r.safetensors")
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "r.safetensors"), "np") as f:
        meta = f.metadata()
        A_bar = f.get_tensor("A_bar")
    assert (meta["basis"], meta["size"], meta["discretization"], meta["delta"]) == ("legendre", "2x3", "euler", "0.25")
    np.testing.assert_allclose(A_bar, np.eye(6) + 0.25 * bases.a_matrix("legendre", 2, 3))
    # --set changes the recipe, an explicit option wins over both
    result = run(str(recipe), "--set", 'regularizer.basis="hermite"', "--size", "2", "--out", "s.safetensors")
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "s.safetensors"), "np") as f:
        assert (f.metadata()["basis"], f.metadata()["size"]) == ("hermite", "2x2")
    result = run(str(tmp_path / "missing.toml"))
    assert result.exit_code == 2 and "not found" in result.output


def test_verify_prints_numbers(run):
    result = run("--basis", "fourier", "--size", "2", "--verify")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "verify (a)" in out and "PASS" in out
    assert "verify (b)" in out and "fourier / periodic" in out and "no change (baseline)" in out


def test_blur_gap_prints_physical_delta_and_a_bar(run):
    result = run("--basis", "fourier", "--size", "4", "--blur-gap", "4", "--image-size", "256")
    assert result.exit_code == 0, result.output
    # independent truth: the top (3,3) Fourier mode of a 4 px² blur at 256² decays by exp(-2π²·4·2·(3/256)²)
    top = np.exp(-2 * np.pi ** 2 * 4 * 2 * (3 / 256) ** 2)
    assert "0.0216861" in result.output and f"{top:.5f}" in result.output
    bad = run("--basis", "fourier", "--size", "4", "--blur-gap", "4")
    assert bad.exit_code != 0 and "--image-size" in bad.output
