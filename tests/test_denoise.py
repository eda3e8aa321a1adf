"""`ssr denoise` through Typer's CliRunner: baseline and SSR arms from one seed beat the noisy input, the
comparison is written, bad grids are refused with the key to change, and an interrupted arm resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ssr_cli.cli import app

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
SIDD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sidd_pairs"

RECIPE = """
[run]
name = "den"
out_dir = "runs"
device = "cpu"
precision = "fp32"
[data]
source = "builtin"
image_size = 32
builtin_crops = 64
[regularizer]
kind = "ssr"
grid = "4x4"
alpha = 0.5
tau_max = 6.0
delta_tau = 2.0
[train]
steps = 60
batch_size = 8
lr = 2e-3
lr_init = 0.0
lr_min = 0.0
warmup_frac = 0.0
cosine_frac = 1.0
ckpt_every_steps = 30
image_every_steps = 30
[denoise]
channels = 8
bottleneck_channels = 16
eval_count = 8
eval_crop = 48
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "den.toml").write_text(RECIPE)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, ["denoise", "den.toml", *args], env=ENV)

    return invoke


@pytest.mark.slow
def test_compare_both_arms_beat_the_noisy_input(run, tmp_path):
    pairs = SIDD if SIDD.is_dir() else None  # the real pairs when ../shared/data is there (CI has it)
    result = run("--set", "denoise.compare=true", *(["--set", f'denoise.eval_pairs="{pairs}"'] if pairs else []))
    assert result.exit_code == 0, result.output
    root = tmp_path / "runs" / "den"
    from ssr_cli.recipe import load
    from ssr_cli.stages import denoise

    cfg = load(tmp_path / "den.toml", ["denoise.compare=true"])
    assert denoise.is_complete(cfg) and not denoise.is_complete(load(tmp_path / "den.toml", ['run.name="other"']))
    comparison = json.loads((root / "comparison.json").read_text())
    arms = comparison["arms"]
    assert set(arms) == {"baseline", "ssr"}
    for arm in ("baseline", "ssr"):
        syn = arms[arm]["synthetic"]
        assert syn["count"] == 8
        assert syn["psnr"] > syn["psnr_input"] + 1.5, (arm, syn)  # σ = 25: input ≈ 20 dB
        assert syn["ssim"] > syn["ssim_input"], (arm, syn)
        assert (arms[arm]["real"]["count"] == 12) if pairs else arms[arm]["real"] is None
        assert (root / arm / "denoiser.safetensors").is_file() and (root / arm / "images" / "step_00000060.png").is_file()
    # same held-out images and noise for both arms: identical input scores
    assert arms["baseline"]["synthetic"]["psnr_input"] == arms["ssr"]["synthetic"]["psnr_input"]
    if pairs:
        assert 16.0 <= arms["ssr"]["real"]["psnr_input"] <= 35.0
        assert "real pairs" in result.output
    delta = comparison["delta_ssr_minus_baseline"]["synthetic"]["psnr"]
    assert delta == pytest.approx(arms["ssr"]["synthetic"]["psnr"] - arms["baseline"]["synthetic"]["psnr"])
    assert (root / "ssr" / "ssr_dynamics.safetensors").is_file()
    assert not (root / "baseline" / "ssr_dynamics.safetensors").exists()
    assert "SSR − baseline" in result.output
    # the SSR arm took its branch about alpha = 0.5 of the steps; the baseline never
    ssr_log = [json.loads(s) for s in (root / "ssr" / "metrics.jsonl").read_text().splitlines()]
    base_log = [json.loads(s) for s in (root / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert 0.25 < sum(r["branch"] for r in ssr_log) / len(ssr_log) < 0.75
    assert all(r["branch"] == 0.0 and r["ssr_latent"] == 0.0 for r in base_log)


def test_dry_run_and_grid_mismatch(run):
    ok = run("--dry-run")
    assert ok.exit_code == 0, ok.output
    assert "[denoise]" in ok.output and "dry run: built denoiser" in ok.output
    assert "SSR on the 16 bottleneck channels" in ok.output
    bad = run("--set", "denoise.bottleneck_channels=8")
    assert bad.exit_code == 2
    assert "regularizer.grid" in bad.output and "bottleneck_channels" in bad.output
    wrong_kind = run("--set", 'regularizer.kind="eq_vae"')
    assert wrong_kind.exit_code == 2 and "regularizer.kind" in wrong_kind.output


@pytest.mark.slow
def test_interrupted_arm_resumes_bit_exactly(run, tmp_path):
    args = ("--set", "train.steps=20", "--set", "train.ckpt_every_steps=10", "--set", "train.keep_last=5")
    first = run(*args)
    assert first.exit_code == 0, first.output
    arm = tmp_path / "runs" / "den" / "ssr"
    reference = load_file(str(arm / "denoiser.safetensors"))
    dynamics = load_file(str(arm / "ssr_dynamics.safetensors"))
    (arm / "checkpoints" / "step_00000020.pt").unlink()
    (arm / "denoiser.safetensors").unlink()
    resumed = run(*args)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from step 10" in resumed.output
    again = load_file(str(arm / "denoiser.safetensors"))
    assert all(torch.equal(again[k], reference[k]) for k in reference)
    assert torch.equal(load_file(str(arm / "ssr_dynamics.safetensors"))["A"], dynamics["A"])
