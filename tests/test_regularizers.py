"""Regularizers of ``ssr finetune`` (regularizers.py, dynamics.py): dynamics, SSR / EQ-VAE / FT-SE losses, the grid check."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from ssr_cli.blur import gaussian_blur
from ssr_cli.dynamics import SSRDynamics, resolve_grid
from ssr_cli.models.tokenizer import DiagonalGaussian, Tokenizer
from ssr_cli.regularizers import (
    EQ_ROTATIONS,
    EQ_SCALES,
    EQVAERegularizer,
    ScaleRegularizer,
    SSRRegularizer,
    build_regularizer,
    reconstruction_loss,
)

# A sparse, strictly upper-triangular A (the polynomial-basis structure): j ≤ k − 2, j ≡ k (mod 2).
SPARSE_A = np.array([[(k * k - j * j) / 10.0 if (j <= k - 2 and (k - j) % 2 == 0) else 0.0 for k in range(6)]
                     for j in range(6)])


def fourier_a(width: int, height: int) -> np.ndarray:
    """Closed form of the normalised Fourier A (method.md §1): diag ∝ −(w²/W² + h²/H²), max|A| = 1."""
    diag = np.array([-((n % width) ** 2 / width**2 + (n // width) ** 2 / height**2) for n in range(width * height)])
    return np.diag(diag / np.abs(diag).max())


# ----------------------------------------------------------------------------------------------- toy tokenizers


class DCTToyTokenizer(Tokenizer):
    """A fixed linear encoder that is equivariant to Gaussian blur by construction.

    Channel n ↔ (w, h) = (n mod W, n div W). Its value is the DCT-II coefficient c_n of the (colour-summed)
    image for the mode cos(πw(j+½)/N)·cos(πh(i+½)/N). Under blur with reflect borders these cosines are exact
    eigenvectors, with eigenvalue ≈ exp(−τ(ω_w² + ω_h²)/2), ω = π·index/N (the sampled Gaussian's frequency
    response; equal to the continuum one up to the truncation/sampling error at small τ). The latent map is
    z_n(p) = m(x) + c_n(x)·u_n(p) with u_n fixed zero-mean patterns and m the image mean (blur keeps it), so the
    spatial mean is invariant and the fluctuation decays by exactly the factor Ā applies when Δ matches.
    """

    latent_channels = 4
    is_kl = False

    def __init__(self, size: int, grid: tuple[int, int] = (2, 2), latent_hw: int = 4, with_mean: bool = True):
        super().__init__()
        width, height = grid
        self.latent_channels = width * height
        pix = (torch.arange(size, dtype=torch.float64) + 0.5) / size
        modes = torch.stack([
            torch.outer(torch.cos(math.pi * (n // width) * pix), torch.cos(math.pi * (n % width) * pix))
            for n in range(width * height)
        ])  # (C, rows, cols): w along columns (x), h along rows (y)
        g = torch.Generator().manual_seed(7)
        patterns = torch.randn(width * height, latent_hw, latent_hw, generator=g, dtype=torch.float64)
        patterns = patterns - patterns.mean(dim=(-1, -2), keepdim=True)
        self.register_buffer("modes", modes.float())
        self.register_buffer("patterns", patterns.float())
        self.with_mean = with_mean
        self.downsample_factor = size // latent_hw
        self.decoder = nn.Conv2d(width * height, 3, 1)  # only there so D(ẑ2) exists

    def encode(self, x):
        grey = x.sum(dim=1)  # (B, H, W)
        coef = torch.einsum("bij,cij->bc", grey, self.modes) / grey[0].numel()
        z = coef[:, :, None, None] * self.patterns[None]
        if self.with_mean:
            z = z + grey.mean(dim=(-1, -2))[:, None, None, None]
        return z

    def decode(self, z):
        return F.interpolate(self.decoder(z), scale_factor=self.downsample_factor, mode="nearest")


class ConvToyTokenizer(Tokenizer):
    """A generic (non-equivariant) conv autoencoder; ``kl`` makes it a KL tokenizer."""

    def __init__(self, channels: int = 4, factor: int = 4, kl: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.latent_channels, self.downsample_factor, self.is_kl = channels, factor, kl
        self.encoder = nn.Conv2d(3, channels * (2 if kl else 1), factor, stride=factor)
        self.decoder = nn.ConvTranspose2d(channels, 3, factor, stride=factor)

    def encode(self, x):
        h = self.encoder(x)
        if self.is_kl:
            mean, logvar = h.chunk(2, dim=1)
            return DiagonalGaussian(mean, logvar)
        return h

    def decode(self, z):
        return self.decoder(z)


class PointwiseLinearTokenizer(Tokenizer):
    """E(x) = W·x per pixel (3 → 4 channels), D(z) = W⁺·z: commutes with any resize and rot90 (f = 1)."""

    latent_channels, downsample_factor = 4, 1

    def __init__(self):
        super().__init__()
        w = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        self.register_buffer("w", w.float())
        self.register_buffer("w_pinv", torch.linalg.pinv(w).float())

    def encode(self, x):
        return torch.einsum("kc,bchw->bkhw", self.w, x)

    def decode(self, z):
        return torch.einsum("ck,bkhw->bchw", self.w_pinv, z)


def _smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return gaussian_blur(torch.rand(n, 3, size, size, generator=g) * 2 - 1, 2.0)


# ----------------------------------------------------------------------------------------------- dynamics


def test_zoh_and_euler_match_scipy():
    dyn = SSRDynamics(SPARSE_A, delta_init=0.37, discretization="zoh")
    a = dyn.a_continuous().detach().double().numpy()
    np.testing.assert_allclose(a, SPARSE_A, atol=1e-7)  # float32 storage of the values
    delta = float(dyn.delta.detach())
    assert abs(delta - 0.37) < 1e-6
    np.testing.assert_allclose(dyn.a_bar().detach().numpy(), scipy.linalg.expm(delta * a), rtol=0, atol=1e-12)
    euler = SSRDynamics(SPARSE_A, delta_init=0.37, discretization="euler")
    np.testing.assert_allclose(euler.a_bar().detach().numpy(), np.eye(6) + delta * a, atol=1e-12)
    # the Fourier A from bases through the same path: Ā = diag(exp(Δ a_kk))
    fourier = SSRDynamics.from_basis("fourier", 4, 4, delta_init=0.1)
    expected = np.diag(np.exp(0.1 * np.diag(fourier_a(4, 4))))
    np.testing.assert_allclose(fourier.a_bar().detach().numpy(), expected, atol=1e-7)


def test_predict_is_a_mode1_product_around_the_spatial_mean():
    dyn = SSRDynamics(SPARSE_A, delta_init=0.5)
    z = torch.randn(2, 6, 5, 3)
    abar = dyn.a_bar().detach().numpy()
    zn = z.double().numpy()
    mean = zn.mean(axis=(2, 3), keepdims=True)
    expected = mean + np.einsum("kc,bchw->bkhw", abar, zn - mean)
    np.testing.assert_allclose(dyn.predict(z).detach().double().numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(dyn.predict(z, mean_centering=False).detach().double().numpy(),
                               np.einsum("kc,bchw->bkhw", abar, zn), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 6, h, w\)"):
        dyn.predict(torch.randn(1, 4, 2, 2))


def test_learned_a_keeps_its_zeros_and_delta_stays_positive():
    dyn = SSRDynamics(SPARSE_A, delta_init=0.1)
    mask = torch.from_numpy(SPARSE_A != 0)
    assert [p.shape.numel() for p in dyn.ssr_parameters()] == [int(mask.sum()), 1]
    opt = torch.optim.AdamW(dyn.ssr_parameters(), lr=0.05, weight_decay=0.1)
    z, target = torch.randn(4, 6, 3, 3), torch.randn(4, 6, 3, 3)  # a dense target pulls on every entry
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(dyn.predict(z, mean_centering=False), target).backward()
        opt.step()
    a = dyn.a_continuous().detach()
    assert torch.all(a[~mask] == 0)
    assert not torch.allclose(a[mask], torch.from_numpy(SPARSE_A)[mask].float())  # the nonzeros did train
    assert torch.all(dyn.a_bar().detach()[~torch.from_numpy(scipy.linalg.expm(SPARSE_A) != 0)] == 0)

    # a huge gradient pushing Δ down (plain SGD, no step-size bound) cannot make Δ ≤ 0
    sgd = torch.optim.SGD([dyn.log_delta], lr=1e4)
    for _ in range(3):
        sgd.zero_grad()
        (1e6 * dyn.delta).backward()
        sgd.step()
    assert float(dyn.delta.detach()) > 0 and torch.isfinite(dyn.a_bar()).all()


def test_learn_a_off_freezes_the_dynamics():
    dyn = SSRDynamics(SPARSE_A, learn_a=False)
    assert dyn.ssr_parameters() == []
    only_delta = SSRDynamics(SPARSE_A, learn_a=False, learn_delta=True)
    assert [p is only_delta.log_delta for p in only_delta.ssr_parameters()] == [True]


# ----------------------------------------------------------------------------------------------- grid


def test_grid_must_match_latent_channels():
    with pytest.raises(ValueError) as err:
        build_regularizer("ssr", latent_channels=32, grid="4x4")
    msg = str(err.value)
    assert "regularizer.grid" in msg and "32 channels" in msg and "8x4" in msg and "4x8" in msg
    assert resolve_grid(16) == (4, 4) and resolve_grid(32) == (8, 4) and resolve_grid(12) == (4, 3)
    assert resolve_grid(7) == (7, 1) and resolve_grid(32, "4x8") == (4, 8)
    reg = build_regularizer("ssr", latent_channels=32)
    assert isinstance(reg, SSRRegularizer) and reg.dynamics.channels == 32
    with pytest.raises(ValueError, match="regularizer.kind"):
        build_regularizer("vq", latent_channels=16)


# ----------------------------------------------------------------------------------------------- SSR


def _matched_delta(size: int, delta_tau: float, grid=(2, 2)) -> float:
    """Δ with exp(Δ·A_fourier) = the continuum decay exp(−Δ_I·ω²/2) of DCT mode (w, h), ω = π·index/N."""
    width, height = grid
    peak = max((n % width) ** 2 / width**2 + (n // width) ** 2 / height**2 for n in range(width * height))
    # Δ·(w²/W² + h²/H²)/peak = Δ_I·π²(w² + h²)/(2N²) needs W = H
    assert width == height
    return delta_tau * math.pi**2 * width**2 * peak / (2 * size**2)


@pytest.mark.parametrize("mean_centering", [True, False])
def test_equivariant_toy_encoder_gives_zero_latent_loss(mean_centering):
    size, delta_tau = 32, 4.0
    toy = DCTToyTokenizer(size, with_mean=mean_centering)
    reg = build_regularizer("ssr", latent_channels=4, grid="2x2", alpha=1.0, delta_init=_matched_delta(size, delta_tau),
                            tau_max=10.0, delta_tau=delta_tau, mean_centering=mean_centering, lambda_lpips=0.0)
    x = _smooth_images(4, size)
    z = toy.encode_latent(x)
    energy = (z - z.mean(dim=(-1, -2), keepdim=True)).pow(2).mean()  # of the fluctuation Ā acts on

    # the claim itself at fixed levels: E(I_τ+Δ) = Ā·E(I_τ) (around the mean), to the discretisation error
    for tau in (0.0, 0.5, 2.0, 6.0):
        z1 = toy.encode_latent(gaussian_blur(x, tau))
        z2 = toy.encode_latent(gaussian_blur(x, tau + delta_tau))
        err = (reg.dynamics.predict(z1, mean_centering) - z2).pow(2).mean() / energy
        assert err < 1e-8, (tau, float(err))

    generic = ConvToyTokenizer(channels=4, factor=8)
    mismatched = build_regularizer("ssr", latent_channels=4, grid="2x2", alpha=1.0, delta_init=0.1,
                                   mean_centering=mean_centering, lambda_lpips=0.0)
    for seed in range(3):
        out = reg.loss(toy, x, step_rng=torch.Generator().manual_seed(seed), target_encoder=toy.encode_latent)
        assert out["branch"] == 1
        assert out["ssr_latent"] / energy < 1e-6, float(out["ssr_latent"] / energy)
        # the same toy with the wrong step Δ is not equivariant: the test can fail
        wrong = mismatched.loss(toy, x, step_rng=torch.Generator().manual_seed(seed), target_encoder=toy.encode_latent)
        assert wrong["ssr_latent"] / energy > 1e-4, float(wrong["ssr_latent"] / energy)
        g_out = reg.loss(generic, x, step_rng=torch.Generator().manual_seed(seed), target_encoder=generic.encode_latent)
        g_energy = generic.encode_latent(x).pow(2).mean()
        assert g_out["ssr_latent"] / g_energy > 1e-3, float(g_out["ssr_latent"] / g_energy)


def test_ssr_loss_composition_and_gradient_paths():
    tok = ConvToyTokenizer(channels=4, factor=4, kl=True)
    ema = copy.deepcopy(tok)  # requires_grad left on on purpose: only the loss's no_grad may shield it
    lpips_fn = lambda a, b: (a - b).pow(2).mean(dim=(1, 2, 3))  # noqa: E731 - a differentiable stand-in metric
    reg = build_regularizer("ssr", latent_channels=4, alpha=1.0, lambda_latent=0.7, lambda_image=2.0,
                            lambda_mae_ssr=1.5, lambda_lpips_ssr=0.3, lpips_fn=lpips_fn)
    x = _smooth_images(2, 16)
    out = reg.loss(tok, x, step_rng=torch.Generator().manual_seed(0), target_encoder=ema.encode_latent)
    assert out["branch"] == 1
    torch.testing.assert_close(out["loss"], 0.7 * out["ssr_latent"] + 2.0 * out["ssr_pixel"])
    out["loss"].backward()
    assert all(p.grad is None for p in ema.parameters())
    assert tok.encoder.weight.grad.abs().sum() > 0 and tok.decoder.weight.grad.abs().sum() > 0
    assert reg.dynamics.a_values.grad.abs().sum() > 0 and reg.dynamics.log_delta.grad is not None
    torch.testing.assert_close(out["delta"], torch.tensor(0.1))
    expected_norm = np.linalg.norm(reg.dynamics.a_bar().detach().numpy(), 2)
    assert abs(float(out["abar_norm"]) - expected_norm) < 1e-6
    assert expected_norm <= 1.0 + 1e-12  # Fourier: the DC channel keeps 1

    # the pixel term by hand for the branch's own τ draw
    torch.manual_seed(11)
    out = reg.loss(tok, x, step_rng=torch.Generator().manual_seed(0), target_encoder=ema.encode_latent)
    torch.manual_seed(11)
    from ssr_cli.blur import sample_tau_pairs

    tau1, tau2 = sample_tau_pairs(2, 10.0, 4.0)
    i2 = gaussian_blur(x, tau2)
    x2_hat = tok.decode(reg.dynamics.predict(tok.encode(gaussian_blur(x, tau1)).mean))
    manual = 1.5 * (x2_hat - i2).abs().mean() + 0.3 * lpips_fn(x2_hat, i2).mean()
    torch.testing.assert_close(out["ssr_pixel"], manual, rtol=1e-5, atol=1e-6)


def test_branch_probability_extremes_and_agreement():
    tok = ConvToyTokenizer(channels=4, factor=4)
    x = _smooth_images(1, 8)
    never = build_regularizer("ssr", latent_channels=4, alpha=0.0)
    always = build_regularizer("ssr", latent_channels=4, alpha=1.0)
    half = build_regularizer("ssr", latent_channels=4, alpha=0.5)
    keys = None
    branches = []
    for seed in range(30):
        a = never.loss(tok, x, step_rng=torch.Generator().manual_seed(seed))
        b = always.loss(tok, x, step_rng=torch.Generator().manual_seed(seed), target_encoder=tok.encode_latent)
        assert a["branch"] == 0 and a["ssr_latent"] == 0 and a["recon"] > 0
        assert b["branch"] == 1 and b["recon"] == 0 and b["ssr_latent"] > 0
        assert set(a) == set(b) and all(v.numel() == 1 for v in a.values())
        keys = set(a)
        # the branch is a function of the step generator alone (what every rank shares)
        first = half.loss(tok, x, step_rng=torch.Generator().manual_seed(seed), target_encoder=tok.encode_latent)
        torch.manual_seed(1000 + seed)  # a different "rank": other global RNG state, same step generator
        second = half.loss(tok, x, step_rng=torch.Generator().manual_seed(seed), target_encoder=tok.encode_latent)
        assert first["branch"] == second["branch"]
        branches.append(int(first["branch"]))
    assert {"loss", "branch", "recon", "kl", "ssr_latent", "ssr_pixel", "delta", "abar_norm"} <= keys
    assert 0 < sum(branches) < 30


def test_reconstruction_loss_convention():
    g = torch.Generator().manual_seed(0)
    x, x_rec = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    post = DiagonalGaussian(mean, logvar)
    lp = lambda a, b: (a - b).abs().amax(dim=(1, 2, 3))  # noqa: E731
    out = reconstruction_loss(x, x_rec, lambda_mae=2.0, lambda_lpips=0.5, lpips_fn=lp, posterior=post, kl_weight=1e-2)
    kl = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["mae"], (x - x_rec).abs().mean())
    torch.testing.assert_close(out["lpips"], lp(x_rec, x).mean())
    torch.testing.assert_close(out["loss"], 2.0 * out["mae"] + 0.5 * out["lpips"] + 1e-2 * kl / (3 * 8 * 8))
    deterministic = reconstruction_loss(x, x_rec, posterior=mean)
    assert deterministic["kl"] == 0 and deterministic["lpips"] == 0


def test_none_regularizer_is_reconstruction():
    tok = ConvToyTokenizer(channels=4, factor=4, kl=True).eval()  # eval: decode the posterior mean
    x = _smooth_images(2, 16)
    out = build_regularizer("none", latent_channels=4, kl_weight=1e-3, lambda_lpips=0.0).loss(tok, x)
    post = tok.encode(x)
    expected = reconstruction_loss(x, tok.decode(post.mean), lambda_lpips=0.0, posterior=post, kl_weight=1e-3)
    torch.testing.assert_close(out["loss"], expected["loss"])
    assert out["kl"] > 0


# ----------------------------------------------------------------------------------------------- EQ-VAE, FT-SE


def test_eq_vae_and_ft_se_vanish_for_an_equivariant_pair():
    pair, generic = PointwiseLinearTokenizer(), ConvToyTokenizer(channels=4, factor=1)
    x = _smooth_images(2, 12)
    eq = build_regularizer("eq_vae", latent_channels=4, eq_probability=1.0, lambda_lpips=0.0)
    se = build_regularizer("scale", latent_channels=4, lambda_lpips=0.0)
    for seed in range(4):
        out = eq.loss(pair, x, step_rng=torch.Generator().manual_seed(seed))
        assert out["branch"] == 1 and out["eq"] < 1e-6
        assert eq.loss(generic, x, step_rng=torch.Generator().manual_seed(seed))["eq"] > 1e-2
        out = se.loss(pair, x, step_rng=torch.Generator().manual_seed(seed))
        assert out["se"] < 1e-6 and out["loss"] < 1e-6 and out["se_factor"] in (2.0, 4.0)
        assert se.loss(generic, x, step_rng=torch.Generator().manual_seed(seed))["se"] > 1e-2
    # every EQ-VAE transform on the equivariant pair, directly
    for scale in EQ_SCALES:
        for turns in EQ_ROTATIONS:
            z_t, x_t = EQVAERegularizer.transform_pair(pair.encode(x), x, scale, turns)
            torch.testing.assert_close(pair.decode(z_t), x_t, atol=1e-5, rtol=0)


def test_transformed_sizes_match_decoder_output():
    tok = ConvToyTokenizer(channels=4, factor=4)
    x = torch.zeros(1, 3, 24, 20)
    z = tok.encode(x)
    for scale in EQ_SCALES:
        for turns in EQ_ROTATIONS:
            z_t, x_t = EQVAERegularizer.transform_pair(z, x, scale, turns)
            assert tok.decode(z_t).shape == x_t.shape
    for factor in (2, 4):
        z_d, x_d = ScaleRegularizer.downsample_pair(z, x, factor)
        assert tok.decode(z_d).shape == x_d.shape
    assert EQVAERegularizer.transform_pair(z, x, 0.5, 1)[0].shape[-2:] == (2, 3)  # rotated (⌊0.5·6⌋, ⌊0.5·5⌋)


def test_eq_vae_branch_frequency_and_reproducibility():
    tok = ConvToyTokenizer(channels=4, factor=4)
    x = _smooth_images(1, 8)
    reg = build_regularizer("eq_vae", latent_channels=4)
    taken = [int(reg.loss(tok, x, step_rng=torch.Generator().manual_seed(s))["branch"]) for s in range(40)]
    assert 8 < sum(taken) < 32  # p = 0.5
    a = reg.loss(tok, x, step_rng=torch.Generator().manual_seed(3))
    b = reg.loss(tok, x, step_rng=torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dynamics_prediction_is_fp32_under_bf16_autocast():
    """Ā·z is computed in fp32 outside autocast: under CPU bf16 autocast ẑ2 agrees with an fp64 computation
    to fp32 rounding (in bf16 the slowest decay 1 − Ā would be off by tens of percent)."""
    from ssr_cli.dynamics import SSRDynamics

    dyn = SSRDynamics.from_basis("fourier", 4, 4, delta_init=0.1)
    z1 = torch.randn(3, 16, 5, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = dyn.predict(z1)
    assert pred.dtype == torch.float32
    abar = dyn.a_bar().detach()  # float64
    z = z1.double()
    mean = z.mean(dim=(-2, -1), keepdim=True)
    exact = mean + torch.einsum("kc,bchw->bkhw", abar, z - mean)
    err = (pred.double() - exact).abs().max().item()
    assert err < 1e-5 * exact.abs().max().item()
    # the change Ā makes (ẑ2 − z1) is the signal SSR trains on: it keeps fp32 accuracy too
    change, exact_change = pred.double() - z, exact - z
    assert (change - exact_change).norm() < 1e-4 * exact_change.norm()


def test_kl_of_scaled_shifted_posterior_is_the_raw_posteriors_closed_form():
    """KL is taken on the raw posterior (as LDM / EQ-VAE), not on scale·(μ − shift), logvar + 2 log scale."""
    from ssr_cli.models.registry import build_tokenizer

    tok = build_tokenizer("kl-ae", "tiny", scale_factor=0.3611, shift_factor=0.1159).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        post = tok.encode(x)
        mu, logvar = tok.raw_moments(x)
    mu, logvar = mu.double(), logvar.double().clamp(-30.0, 20.0)
    closed = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl().double(), closed, rtol=1e-5, atol=1e-4)
    # the scaled moments' KL is a different number (what was logged before)
    scaled = 0.5 * (post.mean.double().pow(2) + post.logvar.double().exp() - 1.0 - post.logvar.double()).sum(dim=(1, 2, 3))
    assert not torch.allclose(scaled, closed, rtol=1e-2)


def test_carried_mean_loss_is_the_centred_loss_plus_the_channel_mean_penalty():
    """MSE(z2, mean(z1) + Ā·C(z1)) = MSE(C(z2), Ā·C(z1)) + mean over (b, c) of (mean(z2) − mean(z1))² / 1 —
    exactly, since Ā·C(z1) has zero spatial mean (the per-element MSE divides both sides by B·C·h·w)."""
    from ssr_cli.dynamics import SSRDynamics
    from ssr_cli.regularizers import latent_mse

    g = torch.Generator().manual_seed(3)
    dyn = SSRDynamics.from_basis("fourier", 4, 4, delta_init=0.3)
    z1 = torch.randn(2, 16, 6, 5, generator=g, dtype=torch.float64).float() + 0.7
    z2 = torch.randn(2, 16, 6, 5, generator=g).float() - 0.4
    with torch.no_grad():
        z2_hat = dyn.predict(z1)
    carried = latent_mse(z2_hat, z2, "carried_mean").double()
    centred = latent_mse(z2_hat, z2, "centred").double()
    means_moved = (z2.double().mean(dim=(-2, -1)) - z1.double().mean(dim=(-2, -1))).pow(2).mean()
    assert abs(carried - (centred + means_moved)) < 1e-5 * carried
    # the centred reading does not see a shift of the target's channel means at all
    shifted = z2 + torch.randn(2, 16, 1, 1, generator=g)
    assert abs(latent_mse(z2_hat, shifted, "centred") - centred) < 1e-5
    with pytest.raises(ValueError, match="latent_loss|latent loss"):
        latent_mse(z2_hat, z2, "literal")


@pytest.mark.parametrize("side", [8, 16])
def test_lpips_loss_takes_the_small_pairs_of_eq_vae_and_ft_se(shared_data, side):
    """At CIFAR size the EQ-VAE / FT-SE pairs are 16² or 8², too small for AlexNet's pooling: the loss compares
    them after upsampling both to 32², which equals LPIPS of the upsampled pair, and is finite with a gradient."""
    from ssr_cli.metrics import load_lpips
    from ssr_cli.recipe import Recipe
    from ssr_cli.stages.common import LPIPS_MIN_SIDE, make_lpips

    weights = shared_data / "lpips" / "alexnet-owt-7be5be79.features-only.pth"
    cfg = Recipe.model_validate({"loss": {"lambda_lpips": 0.1, "lpips_weights": str(weights)}})
    loss_fn = make_lpips(cfg, 0.1, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, side, side, generator=g) * 2 - 1).requires_grad_(True)
    y = (x.detach() + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    got = loss_fn(x, y)
    up = [F.interpolate(t.detach(), size=(LPIPS_MIN_SIDE, LPIPS_MIN_SIDE), mode="bilinear", align_corners=False)
          for t in (x, y)]
    with torch.no_grad():
        expected = load_lpips("alex", weights)(*up).flatten()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_build_from_the_recipe_sections_takes_every_field_from_them(tmp_path):
    """regularizers.build(cfg.regularizer, cfg.loss, ...) — what finetune and --dry-run call — passes each recipe
    field to the regularizer it configures (non-default values everywhere, read back from the built objects)."""
    from ssr_cli.recipe import load
    from ssr_cli.regularizers import EQVAERegularizer, ScaleRegularizer, SSRRegularizer, build

    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[regularizer]\nkind = "ssr"\ngrid = "2x2"\nalpha = 0.7\nlambda_latent = 0.3\nlambda_image = 1.5\n'
        "lambda_pred_mae = 0.6\nlambda_pred_lpips = 0.0\nmean_centering = false\nlatent_loss = \"carried_mean\"\n"
        'latent_space = "raw"\ntau_max = 3.0\ndelta_tau = 0.5\ndelta_init = 0.2\neq_probability = 0.9\n'
        "se_weight = 0.4\nse_factors = [2]\n"
        "[loss]\nlambda_mae = 0.8\nlambda_lpips = 0.0\nkl_weight = 0.002\n")
    cfg = load(recipe)
    reg = build(cfg.regularizer, cfg.loss, latent_channels=4, image_size=32, seed=0)
    assert isinstance(reg, SSRRegularizer)
    got = {k: getattr(reg, k) for k in ("alpha", "lambda_latent", "lambda_image", "lambda_mae_ssr", "lambda_lpips_ssr",
                                        "mean_centering", "latent_loss", "latent_space", "tau_max", "delta_tau",
                                        "lambda_mae", "lambda_lpips", "kl_weight")}
    assert got == {"alpha": 0.7, "lambda_latent": 0.3, "lambda_image": 1.5, "lambda_mae_ssr": 0.6,
                   "lambda_lpips_ssr": 0.0, "mean_centering": False, "latent_loss": "carried_mean",
                   "latent_space": "raw", "tau_max": 3.0, "delta_tau": 0.5, "lambda_mae": 0.8, "lambda_lpips": 0.0,
                   "kl_weight": 0.002}
    assert float(reg.dynamics.delta_start) == pytest.approx(0.2)
    eq = build(cfg.regularizer, cfg.loss, kind="eq_vae", latent_channels=4, image_size=32, seed=0)
    se = build(cfg.regularizer, cfg.loss, kind="scale", latent_channels=4, image_size=32, seed=0)
    assert isinstance(eq, EQVAERegularizer) and isinstance(se, ScaleRegularizer)
    assert eq.p_equivariance == 0.9 and se.se_weight == 0.4 and tuple(se.factors) == (2,)
