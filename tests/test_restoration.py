"""The compact denoiser: shapes, noise model, a short CPU training with and without SSR, SIDD pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssr_cli.dynamics import SSRDynamics
from ssr_cli.images import load_image_pairs, random_crops
from ssr_cli.metrics import psnr_uint8
from ssr_cli.models.restoration import Denoiser
from ssr_cli.restoration import add_gaussian_noise, denoise_loss, evaluate_denoiser, ssr_feature_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def _photos() -> list[torch.Tensor]:
    from skimage import data

    imgs = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    return [torch.tensor(np.asarray(im), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1 for im in imgs]


def test_shapes_features_and_identity_at_init():
    model = Denoiser(channels=8, depth=2, bottleneck_channels=16)
    x = torch.randn(2, 3, 30, 34)
    out, feats = model(x, return_features=True)
    assert out.shape == x.shape
    assert feats.shape == (2, 16, 8, 9)  # padded to 32×36, then /4
    # scale-fixed features (GroupNorm(1), no affine): zero mean, unit mean square per image
    assert torch.allclose(feats.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(feats.pow(2).mean(dim=(1, 2, 3)), torch.ones(2), atol=1e-3)
    assert torch.equal(out, x)  # zero-initialised head: an untrained denoiser returns its input
    assert torch.equal(model.bottleneck_features(x), feats)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        model(torch.zeros(1, 1, 8, 8))


def test_gaussian_noise_std_and_reproducibility():
    x = torch.zeros(4, 3, 64, 64)
    a = add_gaussian_noise(x, 25.0, generator=torch.Generator().manual_seed(3))
    b = add_gaussian_noise(x, 25.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert float(a.std()) * 127.5 == pytest.approx(25.0, rel=0.02)
    assert float(a.mean()) == pytest.approx(0.0, abs=0.01)
    assert add_gaussian_noise(x + 0.99, 25.0, clip=True).max() <= 1.0


def test_ssr_term_needs_matching_channels_and_trains_a_and_delta():
    model = Denoiser(channels=8, depth=2, bottleneck_channels=16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match="bottleneck_channels"):
        ssr_feature_loss(model, SSRDynamics.from_basis("fourier", 3, 3), x, x)
    dynamics = SSRDynamics.from_basis("fourier", 4, 4)
    terms = denoise_loss(model, x, add_gaussian_noise(x, 25.0), dynamics=dynamics, alpha=1.0, lambda_ssr=1.0)
    assert float(terms["branch"]) == 1.0 and float(terms["ssr_latent"].detach()) > 0
    terms["loss"].backward()
    assert dynamics.a_values.grad is not None and dynamics.a_values.grad.abs().sum() > 0
    assert dynamics.log_delta.grad is not None
    assert model.to_features.weight.grad.abs().sum() > 0
    baseline = denoise_loss(model, x, add_gaussian_noise(x, 25.0), dynamics=None)
    assert float(baseline["branch"]) == 0.0 and float(baseline["ssr_latent"]) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("with_ssr", [False, True])
def test_short_cpu_training_improves_psnr_over_noisy_input(with_ssr):
    torch.manual_seed(0)
    photos = _photos()
    train_imgs, test_img = photos[:3], photos[3]
    gen = torch.Generator().manual_seed(0)
    test_clean = random_crops([test_img], 32, 8, generator=gen)
    test_noisy = add_gaussian_noise(test_clean, 25.0, generator=gen)

    model = Denoiser(channels=16, depth=2, bottleneck_channels=16)
    dynamics = SSRDynamics.from_basis("fourier", 4, 4) if with_ssr else None
    params = list(model.parameters()) + (dynamics.ssr_parameters() if dynamics is not None else [])
    opt = torch.optim.Adam(params, lr=2e-3)
    # linear decay to 0: at a constant 2e-3 single Adam steps swing the held-out PSNR by several dB
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / 100)
    ssr_terms = []
    for _ in range(100):
        clean = random_crops(train_imgs, 32, 8, generator=gen)
        noisy = add_gaussian_noise(clean, 25.0, generator=gen)
        terms = denoise_loss(model, clean, noisy, dynamics=dynamics, alpha=0.5, lambda_ssr=0.1, tau_max=6.0,
                             delta_tau=2.0, step_rng=gen)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        schedule.step()
        if float(terms["branch"]):
            ssr_terms.append(float(terms["ssr_latent"].detach()))

    result = evaluate_denoiser(model, list(zip(test_noisy, test_clean)))
    assert result["psnr_input"] == pytest.approx(float(psnr_uint8(test_noisy.clamp(-1, 1), test_clean).mean()))
    assert result["psnr"] > result["psnr_input"] + 2.0, result
    assert result["ssim"] > result["ssim_input"], result
    if with_ssr:
        assert len(ssr_terms) > 20 and np.isfinite(ssr_terms).all()


def test_sidd_pairs_and_identity_evaluation(shared_data):
    pairs = load_image_pairs(shared_data / "sidd_pairs" / "NOISY", shared_data / "sidd_pairs" / "GT")
    assert len(pairs) == 12
    assert all(n.shape == c.shape and n.shape[0] == 3 for n, c in pairs)
    small = sorted(pairs, key=lambda p: p[0].numel())[:3]
    result = evaluate_denoiser(Denoiser(channels=4, depth=2), small)  # untrained: returns its input
    assert result["psnr"] == pytest.approx(result["psnr_input"])
    assert result["ssim"] == pytest.approx(result["ssim_input"])
    assert 16.0 <= result["psnr_input"] <= 30.0  # the README's range of noisy-vs-clean PSNR
