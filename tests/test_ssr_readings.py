"""Issue 13 items 4–8: Δ from the blur gap, A normalisation, raw vs scaled latents, the image-shaped basis domain,
discretization "auto", the random-A ablation, and denoise's latent-loss reading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg as sla
import torch
import torch.nn.functional as F

from ssr_cli import bases as B
from ssr_cli.blur import gaussian_blur
from ssr_cli.dynamics import build_dynamics, dynamics_from_config, save_dynamics
from ssr_cli.recipe import RecipeError, from_dict
from ssr_cli.regularizers import SSRRegularizer


def _reg(**keys):
    return from_dict({"regularizer": keys}).regularizer


def _periodic_blur(img: np.ndarray, tau_px: float) -> np.ndarray:
    """Exact Gaussian blur of variance tau_px (px²) with periodic borders, through the DFT."""
    fy, fx = np.fft.fftfreq(img.shape[0]), np.fft.fftfreq(img.shape[1])
    gain = np.exp(-2 * np.pi**2 * tau_px * (fy[:, None] ** 2 + fx[None, :] ** 2))
    return np.real(np.fft.ifft2(np.fft.fft2(img) * gain))


# ----------------------------------------------------------------------------------------------- item 4


@pytest.mark.parametrize("normalization", ["max", "none"])
def test_blur_gap_delta_reproduces_periodic_blur_decay(normalization):
    """Δ from delta_source = "blur_gap": exp(Δ·A) applied to the Fourier coefficients of an image equals the
    coefficients of the image blurred (periodically) by Δ_I px², to 1e-3 — for the normalised and the raw A."""
    size, gap = 64, 4.0
    cfg = from_dict({"data": {"image_size": size},
                     "regularizer": {"delta_source": "blur_gap", "delta_tau": gap, "a_normalization": normalization}})
    dyn = dynamics_from_config(cfg.regularizer, 16, image_size=cfg.data.image_size, seed=cfg.run.seed)
    img = np.random.default_rng(0).normal(size=(size, size))  # any image: periodic blur acts per DFT mode
    c0 = B.project(img, "fourier", 4, 4, orthonormal=True)
    c1 = B.project(_periodic_blur(img, gap), "fourier", 4, 4, orthonormal=True)
    pred = dyn.a_bar().detach().numpy() @ c0
    assert np.max(np.abs(pred - c1)) / np.max(np.abs(c1)) < 1e-3
    # the coefficients do decay (the test is not passed by Ā = I), and Table 3's Δ = 0.1 does not fit
    assert np.max(np.abs(c0 - c1)) / np.max(np.abs(c1)) > 1e-2
    table3 = dynamics_from_config(_reg(), 16, image_size=size, seed=0)
    assert np.max(np.abs(table3.a_bar().detach().numpy() @ c0 - c1)) / np.max(np.abs(c1)) > 1e-2
    if normalization == "max":
        assert float(dyn.delta.detach()) == pytest.approx(B.delta_from_blur("fourier", 4, 4, gap, size), rel=1e-6)
        assert float(dyn.a_continuous().detach().abs().max()) == pytest.approx(1.0)


def test_blur_gap_delta_at_256_and_recorded(tmp_path):
    """The 4×4 Fourier blur-gap Δ at 256² (≈ 0.0217) is the start Δ, and it is written beside the learned Δ."""
    from safetensors.torch import load_file

    dyn = dynamics_from_config(_reg(delta_source="blur_gap"), 16, image_size=256, seed=0)
    assert float(dyn.delta.detach()) == pytest.approx(0.0217, abs=5e-4)
    with torch.no_grad():
        dyn.log_delta.add_(0.5)  # as if training had moved it
    saved = load_file(save_dynamics(dyn, tmp_path / "ssr_dynamics.safetensors"))
    start = B.delta_from_blur("fourier", 4, 4, 4.0, 256)
    assert float(saved["delta_init"]) == pytest.approx(start, rel=1e-6)
    assert float(saved["delta"]) == pytest.approx(start * np.exp(0.5), rel=1e-5)


def test_default_dynamics_are_table3():
    """Defaults: Δ = delta_init = 0.1, A = a_matrix / max|A|, ZOH — the dynamics before these keys existed."""
    r = _reg()
    assert (r.delta_source, r.a_normalization, r.latent_space, r.discretization) == ("fixed", "max", "scaled", "zoh")
    dyn = dynamics_from_config(r, 16, image_size=256, seed=0)
    assert float(dyn.delta.detach()) == pytest.approx(0.1)
    A = B.a_matrix("fourier", 4, 4)
    np.testing.assert_allclose(dyn.a_continuous().detach().numpy(), A, rtol=1e-6)
    np.testing.assert_allclose(dyn.a_bar().detach().numpy(), sla.expm(0.1 * A), atol=1e-6)


@pytest.mark.parametrize("keys, names", [
    ({"basis": "random", "delta_source": "blur_gap"}, "regularizer.delta_source"),
    ({"basis": "random", "a_normalization": "none"}, "regularizer.a_normalization"),
    ({"basis": "legendre", "delta_source": "blur_gap"}, "regularizer.orthonormal = true"),
    ({"delta_source": "gap"}, "delta_source"),
])
def test_invalid_combinations_are_one_clear_error(keys, names):
    with pytest.raises(RecipeError, match=names.replace(".", r"\.")):
        _reg(**keys)


def test_blur_gap_with_orthonormal_polynomials_is_accepted():
    r = _reg(basis="legendre", orthonormal=True, delta_source="blur_gap")
    raw = dynamics_from_config(r.model_copy(update={"a_normalization": "none"}), 16, image_size=64, seed=0)
    normed = dynamics_from_config(r, 16, image_size=64, seed=0)
    # the same physical step either way: Ā does not depend on how A is normalised
    np.testing.assert_allclose(normed.a_bar().detach().numpy(), raw.a_bar().detach().numpy(), atol=1e-6)


# ----------------------------------------------------------------------------------------------- item 5


def _scaled_tokenizer():
    from ssr_cli.models.kl_ae import build_kl_ae

    torch.manual_seed(0)
    return build_kl_ae("tiny", ch=8, ch_mult=(1, 2), z_channels=16, norm_groups=4, scale_factor=0.4,
                       shift_factor=0.3).eval()


@pytest.mark.parametrize("mean_centering", [True, False])
def test_raw_latent_space_equals_loss_on_raw_moments(mean_centering):
    tok = _scaled_tokenizer()
    dyn = build_dynamics("fourier", 16, delta_init=0.3)
    kw = dict(lambda_lpips_ssr=0.0, mean_centering=mean_centering, latent_loss="carried_mean")
    raw_reg = SSRRegularizer(dyn, latent_space="raw", **kw)
    scaled_reg = SSRRegularizer(dyn, latent_space="scaled", **kw)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    tau1 = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        terms = raw_reg.ssr_terms(tok, x, tau1)
        scaled = scaled_reg.ssr_terms(tok, x, tau1)
        # by hand on the encoder's raw moments (no scale/shift anywhere)
        i1, i2 = gaussian_blur(x, tau1), gaussian_blur(x, tau1 + 4.0)
        m1, m2 = tok.raw_moments(i1)[0].double(), tok.raw_moments(i2)[0].double()
        abar = dyn.a_bar().detach()
        if mean_centering:
            mu = m1.mean(dim=(-2, -1), keepdim=True)
            pred = mu + torch.einsum("kc,bchw->bkhw", abar, m1 - mu)
        else:
            pred = torch.einsum("kc,bchw->bkhw", abar, m1)
        latent = ((pred - m2) ** 2).mean()
        mae = (tok.decoder(pred.float()) - i2).abs().mean()  # the decoder on the raw prediction
    assert float(terms["ssr_latent"]) == pytest.approx(float(latent), rel=1e-4)
    assert float(terms["ssr_mae"]) == pytest.approx(float(mae), rel=1e-4)
    # the scaled reading is a different loss (1/scale² smaller with centring, not even proportional without)
    assert abs(float(scaled["ssr_latent"]) - float(latent)) > 0.05 * float(latent)
    if mean_centering:
        assert float(scaled["ssr_latent"]) == pytest.approx(0.4**2 * float(latent), rel=1e-4)


# ----------------------------------------------------------------------------------------------- item 6


@pytest.mark.parametrize("basis", list(B.BASES))
def test_rectangular_grid_on_square_image_is_symmetric(basis):
    """8×4 grid, square image: A is invariant under swapping x and y on the modes both directions have, so the
    (1,0) and (0,1) modes decay at the same rate; the 4×4 grid's A is unchanged."""
    a = dynamics_from_config(_reg(basis=basis, grid="8x4"), 32, image_size=64, seed=0).a_continuous().detach().numpy()
    n = lambda w, h: w + 8 * h  # noqa: E731
    for w in range(4):
        for h in range(4):
            for w2 in range(4):
                for h2 in range(4):
                    assert a[n(w, h), n(w2, h2)] == pytest.approx(a[n(h, w), n(h2, w2)], abs=1e-6)
    if basis == "fourier":
        assert a[n(1, 0), n(1, 0)] == pytest.approx(a[n(0, 1), n(0, 1)]) and a[n(1, 0), n(1, 0)] < 0
        old = B.a_matrix("fourier", 8, 4)  # the grid as domain: (0,1) decayed 4× faster than (1,0)
        assert old[n(0, 1), n(0, 1)] == pytest.approx(4 * old[n(1, 0), n(1, 0)])
    square = dynamics_from_config(_reg(basis=basis, grid="4x4"), 16, image_size=64, seed=0)
    np.testing.assert_allclose(square.a_continuous().detach().numpy(), B.a_matrix(basis, 4, 4), rtol=1e-6)


def test_rectangular_grid_fourier_decay_matches_square_blur():
    """8×4 Fourier on a square image with the blur-gap Δ: Ā reproduces the periodic blur of the image in the
    8×4 orthonormal coefficients (with the domain now square, the modes are the image's true frequencies)."""
    size, gap = 64, 4.0
    dyn = dynamics_from_config(_reg(grid="8x4", delta_source="blur_gap", delta_tau=gap), 32, image_size=size, seed=0)
    img = np.random.default_rng(1).normal(size=(size, size))
    domain = B.image_domain(8, 4)
    assert domain == (8.0, 8.0)
    c0 = B.project(img, "fourier", 8, 4, domain=domain)
    c1 = B.project(_periodic_blur(img, gap), "fourier", 8, 4, domain=domain)
    pred = np.diag(dyn.a_bar().detach().numpy()) * c0  # Fourier Ā is diagonal
    assert np.max(np.abs(pred - c1)) / np.max(np.abs(c1)) < 1e-3


# ----------------------------------------------------------------------------------------------- item 7


@pytest.mark.parametrize("basis", list(B.BASES) + ["random"])
def test_auto_discretization_is_zoh(basis):
    auto = dynamics_from_config(_reg(basis=basis, discretization="auto"), 16, image_size=64, seed=0)
    assert auto.discretization == "zoh"
    a = auto.a_continuous().detach().double().numpy()
    np.testing.assert_allclose(auto.a_bar().detach().numpy(), sla.expm(0.1 * a), atol=1e-7)


# ----------------------------------------------------------------------------------------------- item 8


def test_random_a_is_seeded_normalised_and_stable():
    r = _reg(basis="random")
    a0 = dynamics_from_config(r, 16, image_size=64, seed=0).a_continuous().detach().double().numpy()
    again = dynamics_from_config(r, 16, image_size=64, seed=0).a_continuous().detach().double().numpy()
    other = dynamics_from_config(r, 16, image_size=64, seed=1).a_continuous().detach().double().numpy()
    np.testing.assert_array_equal(a0, again)
    assert np.max(np.abs(a0 - other)) > 0.1
    assert np.max(np.abs(a0)) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(a0, a0.T, atol=1e-7)
    assert np.linalg.eigvalsh(a0).max() <= 1e-7  # negative semi-definite: exp(ΔA) is a contraction
    assert np.count_nonzero(a0) == a0.size  # dense, every entry learnable
    dyn = dynamics_from_config(r, 16, image_size=64, seed=0)
    assert bool(dyn.mask.all()) and np.linalg.norm(dyn.a_bar().detach().numpy(), 2) <= 1 + 1e-9


# ----------------------------------------------------------------------------------------------- denoise


@pytest.mark.parametrize("reading", ["centred", "carried_mean"])
def test_denoise_ssr_feature_loss_follows_latent_loss(reading):
    from ssr_cli.models.restoration import Denoiser
    from ssr_cli.restoration import ssr_feature_loss

    torch.manual_seed(0)
    model = Denoiser(channels=8, depth=1, bottleneck_channels=16, blocks_per_level=1)
    dyn = build_dynamics("fourier", 16, delta_init=0.3)
    i1, i2 = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        got = ssr_feature_loss(model, dyn, i1, i2, latent_loss=reading)
        z1, z2 = model.bottleneck_features(i1), model.bottleneck_features(i2)
        pred = dyn.predict(z1)
        if reading == "centred":
            centre = lambda z: z - z.mean(dim=(-2, -1), keepdim=True)  # noqa: E731
            want = F.mse_loss(centre(pred), centre(z2))
        else:
            want = F.mse_loss(pred, z2)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    # the two readings differ by the squared change of the channel means (nonzero for different inputs)
    with torch.no_grad():
        other = ssr_feature_loss(model, dyn, i1, i2, latent_loss="carried_mean" if reading == "centred" else "centred")
    assert abs(float(other) - float(got)) > 1e-6


# ----------------------------------------------------------------------------------------------- derive-a


def test_derive_a_with_recipe_readings(tmp_path):
    """derive-a on a recipe: discretization "auto" prints ZOH's Ā; a random-A recipe is one clear error."""
    from typer.testing import CliRunner

    from ssr_cli.cli import app

    recipe = tmp_path / "r.toml"
    recipe.write_text('[regularizer]\ndiscretization = "auto"\n')
    out = tmp_path / "A.npy"
    result = CliRunner().invoke(app, ["derive-a", str(recipe), "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "zoh" in result.output
    recipe.write_text('[regularizer]\nbasis = "random"\n')
    result = CliRunner().invoke(app, ["derive-a", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "pass --basis" in result.output


# ----------------------------------------------------------------------------------------------- finetune


@pytest.mark.parametrize("keys", [{"delta_source": "blur_gap"}, {"basis": "random", "latent_space": "raw"}])
def test_tiny_finetune_records_the_start_delta(tmp_path, keys, one_thread):
    """A 3-step SSR fine-tune with the new readings: it runs, logs delta, and saves the Δ it started from."""
    from safetensors.torch import load_file

    from ssr_cli.engine.runtime import setup_runtime
    from ssr_cli.stages.finetune import run_finetune

    cfg = from_dict({
        "run": {"name": "t", "out_dir": str(tmp_path), "device": "cpu", "precision": "fp32"},
        "data": {"source": "builtin", "image_size": 16, "builtin_crops": 8},
        "tokenizer": {"family": "kl-ae", "size": "tiny"},
        "regularizer": {"kind": "ssr", "alpha": 1.0, "lambda_pred_lpips": 0.0, **keys},
        "loss": {"lambda_lpips": 0.0},
        "train": {"steps": 3, "batch_size": 4, "ckpt_every_steps": 10, "log_every_steps": 1,
                  "image_every_steps": 100, "lr": 1e-3, "lr_min": 1e-5},
    })
    run_finetune(cfg, setup_runtime("cpu", "fp32"))
    saved = load_file(tmp_path / "t" / "finetune" / "ssr_dynamics.safetensors")
    start = B.delta_from_blur("fourier", 4, 4, 4.0, 16) if "delta_source" in keys else 0.1
    assert float(saved["delta_init"]) == pytest.approx(start, rel=1e-6)
    lines = (tmp_path / "t" / "finetune" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(np.isfinite(json.loads(x)["ssr_latent"]) for x in lines)
