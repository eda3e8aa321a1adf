"""`ssr diffusability` proxies against closed forms (CPU, tiny)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssr_cli.engine.runtime import setup_runtime
from ssr_cli.metrics import frechet_distance, gaussian_stats, to_uint8
from ssr_cli.stages.diffusability import (
    TransformedTokenizer,
    equivariance_errors,
    flow_probe,
    ifid,
    latent_statistics,
    posterior_velocity_variance,
    radial_spectrum,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class PoolEncoder(nn.Module):
    """E(x) = 1×1 conv of the 4×4 block average: commutes exactly with block-average downsampling, rot90 and
    flip. D(z) = nearest-neighbour upsampling of a 1×1 conv back to RGB."""

    latent_channels = 4
    downsample_factor = 4

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.enc = nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64), requires_grad=False)
        self.dec = nn.Parameter(torch.linalg.pinv(self.enc), requires_grad=False)

    def encode_latent(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return torch.einsum("dc,nchw->ndhw", self.enc.to(x.dtype), F.avg_pool2d(x, 4))

    def encode(self, x):
        return self.encode_latent(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(torch.einsum("cd,ndhw->nchw", self.dec.to(z.dtype), z), scale_factor=4, mode="nearest")


def _grid_fraction(h: int, w: int, transform: str) -> float:
    if transform == "fft":
        ry, rx = 2 * np.abs(np.fft.fftfreq(h))[:, None], 2 * np.abs(np.fft.fftfreq(w))[None]
    else:
        ry, rx = (np.arange(h) / h)[:, None], (np.arange(w) / w)[None]
    return float((np.sqrt(ry ** 2 + rx ** 2) > 0.5).mean())


@pytest.mark.parametrize("transform", ["fft", "dct"])
def test_white_noise_has_flat_spectrum(transform):
    x = torch.randn(400, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    spec = radial_spectrum(x, transform)
    # Unit-variance white noise: every radial bin has power 1 (each bin averages >= 1600 χ²₁/χ²₂ draws).
    np.testing.assert_allclose(spec["power"], 1.0, rtol=0.12)
    assert spec["freq"][0] == 0.0 and spec["freq"][-1] > 1.0
    # Its energy above ½ Nyquist is the share of frequency cells there.
    assert spec["hf_fraction"] == pytest.approx(_grid_fraction(16, 16, transform), abs=0.01)


def test_smooth_fields_put_little_energy_above_half_nyquist():
    smooth = F.avg_pool2d(torch.randn(64, 2, 20, 20), 5, stride=1)  # 16×16, low-pass
    assert radial_spectrum(smooth)["hf_fraction"] < 0.3 * radial_spectrum(torch.randn(64, 2, 16, 16))["hf_fraction"]


def test_exactly_equivariant_encoder_has_zero_error():
    images = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    enc = PoolEncoder()
    errors = equivariance_errors(enc.encode_latent, images, [2, 4], mean=torch.zeros(4), std=torch.ones(4) * 2)
    assert set(errors) == {"down2", "down4", "rot90", "flip"}
    for name, err in errors.items():
        assert err is not None and err < 1e-12, name
    # A position-dependent encoder (a fixed bias pattern on the latent grid) is not equivariant.
    bias = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    broken = equivariance_errors(lambda x: enc.encode_latent(x) + (bias if x.shape[-1] == 32 else 0), images, [2])
    assert broken["rot90"] > 0.05 and broken["down2"] > 0.05


def test_ifid_at_weight_zero_is_rfid_of_the_same_images():
    images = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    enc = PoolEncoder()
    proj = torch.randn(3 * 4 * 4, 6, generator=torch.Generator().manual_seed(2))

    def features(u8: torch.Tensor) -> np.ndarray:
        return (F.avg_pool2d(u8.double() / 255, 4).flatten(1) @ proj.double()).numpy()

    z = enc.encode_latent(images).float()
    mean, std = z.mean(dim=(0, 2, 3)).reshape(1, -1, 1, 1), z.std(dim=(0, 2, 3)).reshape(1, -1, 1, 1)
    real = features(to_uint8(images))
    rfid = frechet_distance(*gaussian_stats(features(to_uint8(enc.decode(z).clamp(-1, 1)))), *gaussian_stats(real))
    decode = lambda x: enc.decode(x * std + mean)  # noqa: E731
    at_zero = ifid(decode, (z - mean) / std, real, features, weight=0.0, batch_size=16)
    assert at_zero["ifid"] == pytest.approx(rfid, rel=1e-9, abs=1e-12)
    assert ifid(decode, (z - mean) / std, real, features, weight=0.5, batch_size=16)["ifid"] != pytest.approx(rfid)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_velocity_variance_matches_gaussian_posterior(t):
    s = 1.5
    g = torch.Generator().manual_seed(4)
    ref, queries = s * torch.randn(6000, 1, generator=g), s * torch.randn(800, 1, generator=g)
    # x1 ~ N(0, s²): Var(x1 | x_t) = s²(1 − t)² / (t²s² + (1 − t)²), so Var(v | x_t) = s² / (t²s² + (1 − t)²).
    expected = s * s / (t * t * s * s + (1 - t) ** 2)
    got = posterior_velocity_variance(ref, queries, [t], seed=0)[0]
    assert got == pytest.approx(expected, rel=0.06)


def test_latent_statistics_of_isotropic_gaussian():
    x = torch.randn(300, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    stats = latent_statistics(3 * x + 1, x, kl=torch.full((300,), 32.0))
    assert stats["effective_rank"] == pytest.approx(4.0, abs=0.1)
    assert abs(stats["kurtosis_mean"]) < 0.15
    np.testing.assert_allclose(stats["channel_std"], 3.0, rtol=0.05)
    np.testing.assert_allclose(stats["channel_mean"], 1.0, atol=0.1)
    assert stats["kl_per_dim"] == pytest.approx(0.5)
    low = latent_statistics(x[:, :1].repeat(1, 4, 1, 1), x[:, :1].repeat(1, 4, 1, 1), None)
    assert low["effective_rank"] == pytest.approx(1.0, abs=1e-3) and low["pca_components_99"] <= 16


@pytest.mark.parametrize("kind", ["permute", "mix"])
def test_invertible_degradations_round_trip(kind):
    base = PoolEncoder()
    tok = TransformedTokenizer(base, kind, seed=7)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    z = tok.encode_latent(x)
    assert not torch.allclose(z, base.encode_latent(x))
    torch.testing.assert_close(tok.decode(z), base.decode(base.encode_latent(x)))


def _smooth_latents(n: int, seed: int) -> torch.Tensor:
    """2-channel 8×8 fields: random mixtures of three low-frequency cosine patterns (a 3-d manifold)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    patterns = torch.stack([torch.cos(np.pi * xx / 8), torch.cos(np.pi * yy / 8), torch.cos(np.pi * (xx + yy) / 8)])
    coeff = torch.randn(n, 2, 3, generator=g)
    z = torch.einsum("nck,khw->nchw", coeff, patterns)
    return (z - z.mean(dim=(0, 2, 3), keepdim=True)) / z.std(dim=(0, 2, 3), keepdim=True)


PROBE = dict(t_grid=[0.3, 0.6, 0.9], batch_size=32, lr=2e-3, seed=0, model="DiT-S/2", depth=1, hidden=32, heads=2,
             log_every=1000)


def test_flow_probe_ranks_structured_above_permuted(tmp_path):
    rt = setup_runtime("cpu", "fp32")
    z = _smooth_latents(448, 0)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    zp = z.flatten(2)[:, :, perm].reshape(z.shape)
    runs = {}
    for name, data in (("structured", z), ("permuted", zp)):
        runs[name], _ = flow_probe(data[:384], data[384:], tmp_path / name, rt, steps=120, ckpt_every=1000, **PROBE)
    assert runs["structured"]["flow_loss_mean"] < 0.9 * runs["permuted"]["flow_loss_mean"]


def test_flow_probe_resumes_where_it_stopped(tmp_path):
    rt = setup_runtime("cpu", "fp32")
    z = _smooth_latents(96, 2)
    whole, _ = flow_probe(z[:64], z[64:], tmp_path / "whole", rt, steps=6, ckpt_every=3, **PROBE)
    flow_probe(z[:64], z[64:], tmp_path / "split", rt, steps=3, ckpt_every=3, **PROBE)  # "interrupted" at step 3
    resumed, _ = flow_probe(z[:64], z[64:], tmp_path / "split", rt, steps=6, ckpt_every=3, **PROBE)
    assert resumed["flow_loss"] == whole["flow_loss"]
    again, _ = flow_probe(z[:64], z[64:], tmp_path / "split", rt, steps=6, ckpt_every=3, **PROBE)  # complete: reloads
    assert again["flow_loss"] == whole["flow_loss"]


def test_command_compares_two_runs_side_by_side(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from ssr_cli.cli import app

    monkeypatch.chdir(tmp_path)
    toy = Path(__file__).resolve().parents[1] / "studies" / "diffusability" / "toy.toml"
    other = tmp_path / "other.toml"
    other.write_text(toy.read_text().replace('name = "dfz-toy"', 'name = "dfz-other"')
                     .replace("[diffusability]", '[diffusability]\nproxies = ["stats", "spectrum"]'))
    from ssr_cli.models.weights import save_weights
    from ssr_cli.recipe import load
    from ssr_cli.stages.common import EXPORT_NAME, build_tokenizer

    for recipe in (toy, other):  # a run needs its tokenizer: a seeded from-scratch one, as `ssr finetune` would start
        cfg = load(recipe)
        save_weights(build_tokenizer(cfg, weights=None), cfg.run_dir() / EXPORT_NAME)
    out = tmp_path / "main"
    code = app(["diffusability", str(toy), "--out", str(out), "--set", 'diffusability.proxies=["stats","spectrum"]',
                "--compare", str(other)], standalone_mode=False)
    assert code in (None, 0)
    compared = json.loads((out / "compare_diffusability.json").read_text())
    assert set(compared["runs"]) == {"dfz-toy", "dfz-other"}
    assert sorted(compared["ranking"]["latent_hf_fraction"]) == ["dfz-other", "dfz-toy"]
    assert compared["ranking"]["flow_loss_mean"] == []  # not computed: no rank
    assert (out / "compare_diffusability.png").is_file() and "| iFID |" in (out / "compare_ranking.md").read_text()
    single = json.loads((out / "diffusability.json").read_text())
    assert set(single["proxies"]) == {"stats", "spectrum"} and single["summary"]["ifid"] is None
    # what each proxy cost is recorded beside it, and read back (not remeasured) when the proxy is cached
    assert set(single["seconds"]) == {"stats", "spectrum"} and all(s >= 0 for s in single["seconds"].values())
    parts = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.json")}
    code = app(["diffusability", str(toy), "--out", str(out), "--set", 'diffusability.proxies=["stats","spectrum"]'],
               standalone_mode=False)
    assert json.loads((out / "diffusability.json").read_text())["seconds"] == single["seconds"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.json")} == parts  # read, not redone
