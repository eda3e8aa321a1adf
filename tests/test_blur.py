"""Gaussian blur by variance τ and the blur-pair sampling (ssr_cli/blur.py), against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from ssr_cli.blur import gaussian_blur, reflect_indices, sample_tau_pairs


def _scipy_blur(x: np.ndarray, taus) -> np.ndarray:
    return np.stack([
        np.stack([ndimage.gaussian_filter(x[b, c], sigma=np.sqrt(taus[b]), mode="reflect") for c in range(x.shape[1])])
        for b in range(x.shape[0])
    ])


@pytest.mark.parametrize(
    "size, taus",
    [
        ((9, 7), [0.0, 0.3, 2.5, 10.0]),  # τ = 0 next to blurred images in one batch
        ((16, 12), [4.0, 6.0, 0.05, 1.0]),
        ((5, 4), [9.0, 36.0, 0.01, 1.0]),  # kernel radius 12 and 24 > image size: repeated reflection
        ((3, 2), [100.0, 50.0, 0.2, 0.0]),
    ],
)
def test_matches_scipy_gaussian_filter_reflect(size, taus):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((len(taus), 3, *size))
    got = gaussian_blur(torch.from_numpy(x), torch.tensor(taus, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, _scipy_blur(x, taus), rtol=0, atol=1e-12)
    # float32 images: same result to float32 precision
    got32 = gaussian_blur(torch.from_numpy(x).float(), torch.tensor(taus, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got32, _scipy_blur(x, taus), rtol=0, atol=2e-6)


def test_scalar_tau_and_reflect_is_half_sample_symmetric():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 1, 6, 6))
    got = gaussian_blur(torch.from_numpy(x), 2.0).numpy()
    np.testing.assert_allclose(got, _scipy_blur(x, [2.0, 2.0]), atol=1e-12)
    # scipy's "mirror" (torch's "reflect") gives a different answer: the border convention is checked above
    mirror = ndimage.gaussian_filter(x[0, 0], sigma=np.sqrt(2.0), mode="mirror")
    assert np.abs(mirror - got[0, 0]).max() > 1e-3
    assert reflect_indices(3, 4).tolist() == [2, 2, 1, 0, 0, 1, 2, 2, 1, 0, 0]  # (c c b a | a b c | c b a a)


def test_linear_in_the_image():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 11, 13, generator=g, dtype=torch.float64)
    y = torch.randn(3, 2, 11, 13, generator=g, dtype=torch.float64)
    tau = torch.tensor([0.7, 3.0, 10.0], dtype=torch.float64)
    lhs = gaussian_blur(2.5 * x - 0.75 * y, tau)
    rhs = 2.5 * gaussian_blur(x, tau) - 0.75 * gaussian_blur(y, tau)
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-12)


def test_tau_zero_is_exact_identity_and_mass_is_conserved():
    x = torch.rand(3, 3, 10, 10)
    out = gaussian_blur(x, torch.tensor([0.0, 5.0, 0.0]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert torch.equal(gaussian_blur(x, 0.0), x)
    # zero-flux (reflect) borders keep each channel's sum: the heat equation with Neumann borders
    torch.testing.assert_close(out.sum(dim=(-1, -2)), x.sum(dim=(-1, -2)), rtol=1e-5, atol=1e-4)


def test_gradient_reaches_the_image():
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    gaussian_blur(x, torch.tensor([1.0, 4.0])).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_rejects_bad_arguments():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=">= 0"):
        gaussian_blur(x, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="one variance per image"):
        gaussian_blur(x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="B, C, H, W"):
        gaussian_blur(torch.zeros(4, 4), 1.0)
    with pytest.raises(ValueError, match="tau_max"):
        sample_tau_pairs(4, tau_max=3.0, delta_tau=4.0)


def test_pair_sampling_follows_the_linear_density():
    tau_max, delta = 10.0, 4.0
    span = tau_max - delta
    tau1, tau2 = sample_tau_pairs(20000, tau_max, delta, generator=torch.Generator().manual_seed(0))
    t1 = tau1.double().numpy()
    assert t1.min() >= 0 and t1.max() <= span
    np.testing.assert_allclose(tau2.double().numpy() - t1, delta, atol=1e-5)

    def cdf(x):  # ∫ (2/L)(1 − s/L) ds
        return 1.0 - (1.0 - np.clip(x, 0, span) / span) ** 2

    assert stats.kstest(t1, cdf).pvalue > 0.01
    # the test discriminates: the same draws are far from a uniform density on [0, L]
    assert stats.kstest(t1, stats.uniform(0, span).cdf).pvalue < 1e-6
    # mean of the density is L/3
    assert abs(t1.mean() - span / 3) < 0.05


def test_pair_sampling_is_reproducible():
    a = sample_tau_pairs(8, generator=torch.Generator().manual_seed(5))
    b = sample_tau_pairs(8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
