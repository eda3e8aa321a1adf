"""End to end: `ssr pipeline recipes/quickstart.toml` as a user runs it, then each stage's promises.

One quickstart run (about a minute on two cores) is shared by the tests of this module: the
artifacts of every stage are checked against independent readings of them, interrupted stages are
re-run from their checkpoints and must end bit for bit where the uninterrupted run ended.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from scipy.stats import spearmanr
from typer.testing import CliRunner

from ssr_cli.cli import app
from ssr_cli.engine.checkpoint import load_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.toml"

# the quickstart pipeline: minutes. One xdist group: under `--dist loadgroup` the module-scoped run is made once.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow, pytest.mark.xdist_group("pipeline")]


def ssr(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ without ties: the Pearson correlation of the ranks."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def full_decode_psnr(run: Path) -> float:
    """Mean PSNR (dB, uint8 by rounding) of decode(encode(x)) over the probe's image pool, from the run's files."""
    from ssr_cli.recipe import load
    from ssr_cli.stages.common import image_dataset, load_tokenizer_for_run

    cfg = load(run / "recipe.resolved.toml")
    tokenizer = load_tokenizer_for_run(cfg)[0].eval()
    ds = image_dataset(cfg, augment=False, image_size=cfg.probe.image_size or cfg.data.image_size)
    n_pool = min(len(ds), max(cfg.probe.score_images, cfg.probe.num_images))
    stride = max(1, len(ds) // n_pool)
    pool = torch.stack([ds[(i * stride, None)][0] for i in range(n_pool)])
    with torch.no_grad():
        recon = tokenizer.decode(tokenizer.encode_latent(pool)).float().clamp(-1, 1)
    u8 = [np.round((a.numpy().astype(np.float32) + np.float32(1)) * np.float32(127.5)).clip(0, 255).astype(np.float64)
          for a in (recon, pool)]
    mse = ((u8[0] - u8[1]) ** 2).reshape(n_pool, -1).mean(axis=1)
    return float(np.mean(10.0 * np.log10(255.0**2 / mse)))


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("quickstart")
    result = ssr("pipeline", QUICKSTART, "--set", f'run.out_dir="{out}"')
    assert result.exit_code == 0, result.output
    return out / "quickstart"


def test_every_stage_ran_and_the_summary_reports_it(run):
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["stages"]) == ["finetune", "encode-latents", "train-dit", "sample", "evaluate", "probe-channels"]
    assert all(v.endswith(" s") for v in summary["stages"].values())  # all ran, none skipped
    rec = summary["eval"]["reconstruction"]
    # The fine-tuned tiny AE reconstructs far better than the best constant image (the data mean).
    from ssr_cli.data import build_dataset
    from ssr_cli.metrics import psnr_uint8

    ds = build_dataset("builtin", image_size=32, builtin_crops=512, seed=0)
    x = torch.stack([ds[(i, None)][0] for i in range(100)])
    baseline = float(psnr_uint8(x.mean(dim=0, keepdim=True).expand_as(x), x).mean())
    assert rec["psnr"] > baseline + 5.0
    assert 0.3 < rec["ssim"] <= 1.0
    assert "lpips" in rec["unavailable"] and "Inception" in summary["eval"]["generation"]["unavailable"]["all"]
    metrics = [json.loads(line) for line in (run / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert {"recon", "kl", "ssr_latent", "ssr_pixel", "branch", "delta", "abar_norm", "lr"} <= set().union(*metrics)
    for stage in ("finetune", "dit"):
        assert Image.open(run / stage / "curves.png").format == "PNG"
    assert not (run / "pretrain").exists()  # the quickstart starts from pretrained weights: no pretraining stage


def test_rerun_skips_completed_stages(run):
    result = ssr("pipeline", QUICKSTART, "--set", f'run.out_dir="{run.parent}"')
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["stages"].values()) == {"skipped (complete)"}
    # Changed evaluation settings: only evaluate is redone.
    result = ssr("pipeline", QUICKSTART, "--set", f'run.out_dir="{run.parent}"', "--set", "eval.num_images=50")
    assert result.exit_code == 0, result.output
    stages = json.loads((run / "summary.json").read_text())["stages"]
    assert stages.pop("evaluate").endswith(" s") and set(stages.values()) == {"skipped (complete)"}
    assert json.loads((run / "eval.json").read_text())["reconstruction"]["num_images"] == 50


def test_unmasking_grid_has_c_plus_1_columns_and_psnr_rises_with_k(run):
    probe = json.loads((run / "probe" / "probe.json").read_text())
    channels = 16
    assert sorted(probe["frequency_order"]) == list(range(channels))
    grid = np.asarray(Image.open(probe["figures"]["unmasking"]).convert("RGB"))
    body = grid[16:]  # below the column labels
    filled = ~(body == 255).all(axis=(0, 2))  # pad columns are white over the whole height
    starts = np.flatnonzero(filled[1:] & ~filled[:-1]) + 1
    assert len(starts) + int(filled[0]) == channels + 1  # input + one column per k
    psnr = np.asarray(probe["psnr_vs_k"])
    assert psnr.shape == (channels,)
    # SSR-trained: the channels in basis frequency order rise almost monotonically.
    assert spearmanr(np.arange(channels), psnr).statistic > 0.95
    # k = C keeps every channel, so it is the plain reconstruction of the probe's pool: recomputed here from the
    # run's tokenizer file and images, with PSNR written out by hand.
    assert probe["psnr_full"] == psnr[-1]
    assert psnr[-1] == pytest.approx(full_decode_psnr(run), abs=1e-4)
    # The Ā-prediction error is a ratio to the latents' spatial variance: finite, positive, well below 1.
    assert 0.0 < probe["dynamics_error"] < 0.5 and 0.0 < probe["dynamics_error_no_change"] < 0.5
    # The blur-decay order score is the rank correlation of the channels' decay, in frequency order, recomputed
    # here from probe.json's own decay values and order.
    assert len(probe["blur_decay"]) == channels
    decay = np.asarray(probe["blur_decay"])[probe["frequency_order"]]
    assert probe["blur_decay_spearman"] == pytest.approx(rank_correlation(np.arange(channels), -np.log(decay)),
                                                         abs=1e-9)
    for name in ("psnr_vs_k", "latent_dynamics"):
        assert Image.open(probe["figures"][name]).format == "PNG"


def test_samples_npz_layout_matches_pngs(run):
    with np.load(run / "samples" / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (100, 32, 32, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [i % 10 for i in range(100)]  # balanced over 10 classes
    for i in (0, 57, 99):
        np.testing.assert_array_equal(np.asarray(Image.open(run / "samples" / "png" / f"{i:06d}.png")), images[i])
    assert images.std() > 5  # not a blank batch


def test_samples_do_not_depend_on_batch_size(run, tmp_path):
    out = tmp_path / "again"
    result = ssr("sample", QUICKSTART, "--set", f'run.out_dir="{run.parent}"', "--set", f'sample.out_dir="{out}"',
                 "--set", "sample.batch_size=7", "--set", "sample.num_images=20")
    assert result.exit_code == 0, result.output
    with np.load(run / "samples" / "samples.npz") as a, np.load(out / "samples.npz") as b:
        diff = np.abs(a["arr_0"][:20].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # equal up to float rounding at uint8 boundaries


def _recipe() -> dict:
    import tomllib

    return tomllib.loads(QUICKSTART.read_text())


def _interrupt(run: Path, tmp_path: Path, stage_dir: str, keep_step: int, outputs: list[str]) -> Path:
    """A copy of the run as if it had been killed right after the checkpoint at ``keep_step``."""
    copy = tmp_path / "quickstart"
    shutil.copytree(run, copy)
    for ckpt in (copy / stage_dir / "checkpoints").glob("step_*.pt"):
        if int(ckpt.stem.split("_")[1]) > keep_step:
            ckpt.unlink()
    for name in outputs:
        (copy / name).unlink()
    return copy


def test_interrupted_finetune_resumes_to_identical_weights(run, tmp_path):
    train = _recipe()["train"]
    assert train["steps"] >= 2 * train["ckpt_every_steps"]  # a checkpoint mid-run to resume from
    copy = _interrupt(run, tmp_path, "finetune", train["ckpt_every_steps"], ["tokenizer.safetensors"])
    result = ssr("finetune", QUICKSTART, "--set", f'run.out_dir="{tmp_path}"')
    assert result.exit_code == 0, result.output
    assert "resum" in result.output.lower()
    a, b = load_file(str(run / "tokenizer.safetensors")), load_file(str(copy / "tokenizer.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_interrupted_train_dit_resumes_with_optimizer_state(run, tmp_path):
    dit = _recipe()["dit"]
    keep = dit["ckpt_every_steps"]
    assert dit["steps"] >= 2 * keep  # a checkpoint mid-run to resume from
    copy = _interrupt(run, tmp_path, "dit", keep, ["dit/dit_ema.safetensors"])
    state = load_checkpoint_file(copy / "dit" / "checkpoints" / f"step_{keep:08d}.pt")
    assert state["step"] == keep and state["optimizer"]["state"]  # Adam moments are in the checkpoint
    result = ssr("train-dit", QUICKSTART, "--set", f'run.out_dir="{tmp_path}"')
    assert result.exit_code == 0, result.output
    a, b = load_file(str(run / "dit" / "dit_ema.safetensors")), load_file(str(copy / "dit" / "dit_ema.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    last = [json.loads(line) for line in (copy / "dit" / "metrics.jsonl").read_text().splitlines()][-1]
    first = [json.loads(line) for line in (run / "dit" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == first["step"] == dit["steps"] and last["loss"] == first["loss"]


def test_dry_run_and_missing_inputs_exit_cleanly(tmp_path):
    result = ssr("train-dit", QUICKSTART, "--dry-run", "--set", "dit.steps=7")
    assert result.exit_code == 0 and "steps = 7" in result.output
    result = ssr("train-dit", QUICKSTART, "--set", f'run.out_dir="{tmp_path}"')
    assert result.exit_code == 2 and "ssr encode-latents" in result.output
    result = ssr("sample", QUICKSTART, "--set", f'run.out_dir="{tmp_path}"')
    assert result.exit_code == 2 and "ssr train-dit" in result.output
    result = ssr("evaluate", tmp_path / "nope.toml")
    assert result.exit_code == 2 and "nope.toml" in result.output
    result = ssr("finetune", QUICKSTART, "--set", "regularizer.grid=\"3x3\"", "--set", f'run.out_dir="{tmp_path}"')
    assert result.exit_code == 2 and "grid" in result.output


def test_probe_compare_draws_runs_side_by_side(run, tmp_path):
    other = tmp_path / "same_run.toml"
    other.write_text(QUICKSTART.read_text().replace('out_dir = "runs"', f'out_dir = "{run.parent}"'))
    out = tmp_path / "probe"
    result = ssr("probe-channels", QUICKSTART, "--set", f'run.out_dir="{run.parent}"', "--out", out, "--compare", other)
    assert result.exit_code == 0, result.output
    assert "comparison" in result.output and "same_run" in result.output  # the colliding run name: the file stem
    assert Image.open(out / "compare_psnr_vs_k.png").format == "PNG"
    # The same tokenizer probed twice gives the same numbers.
    a = json.loads((out / "probe.json").read_text())
    b = json.loads((run / "probe" / "probe.json").read_text())
    assert a["psnr_vs_k"] == pytest.approx(b["psnr_vs_k"], abs=1e-6)
