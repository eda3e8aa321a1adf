"""probe-channels building blocks against independent computations (the figure itself is checked end to
end in test_pipeline.py on the SSR-trained quickstart tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from ssr_cli.probe import blur_decay, dynamics_error, partial_decodes, radial_centroid


class PixelTokenizer(torch.nn.Module):
    """A 'tokenizer' whose latent channels are the image's colour channels at full resolution, each with
    its own gain, and whose decoder is the identity: everything about it is known in closed form."""

    def __init__(self, gains=(1.0, 2.0, -0.5)) -> None:
        super().__init__()
        self.gains = torch.tensor(gains, dtype=torch.float64).reshape(1, -1, 1, 1)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() * self.gains

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.gains


def test_blur_decay_matches_scipy_filter():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(-1, 1, size=(3, 3, 24, 20)))
    tau = 4.0
    decay = blur_decay(PixelTokenizer(), images, tau)
    blurred = gaussian_filter(images.numpy(), sigma=(0, 0, np.sqrt(tau), np.sqrt(tau)), mode="reflect")
    for c in range(3):
        def norm(a):
            a = a[:, c]
            return np.sqrt(((a - a.mean(axis=(-2, -1), keepdims=True)) ** 2).sum())
        assert decay[c] == pytest.approx(norm(blurred) / norm(images.numpy()), rel=1e-5)  # gains cancel
    assert np.all(decay < 1.0)  # blur only removes detail


def test_partial_decodes_fill_and_unmask_in_order():
    tok = PixelTokenizer()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    z = tok.encode_latent(x)
    fill = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    out = partial_decodes(tok, z, [2, 0, 1], fill)
    assert len(out) == 3
    expected = (fill.reshape(1, -1, 1, 1) / tok.gains).expand_as(x).clone()
    for k, ch in enumerate([2, 0, 1]):
        expected[:, ch] = x[:, ch]
        torch.testing.assert_close(out[k].double(), expected.clamp(-1, 1))
    torch.testing.assert_close(out[-1].double(), x)  # all channels kept: the input itself


def test_radial_centroid_of_pure_cosines():
    h = w = 32
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for cycles in (2, 5, 9):
        img = np.cos(2 * np.pi * cycles * xx / w)
        t = torch.from_numpy(np.repeat(img[None, None], 3, axis=1))
        assert radial_centroid(t) == pytest.approx(cycles / w, rel=1e-9)  # all power at f = cycles / W


class IdentityDynamics(torch.nn.Module):
    def predict(self, z1: torch.Tensor, mean_centering: bool = True) -> torch.Tensor:
        return z1


class ScaleDynamics(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def predict(self, z1: torch.Tensor, mean_centering: bool = True) -> torch.Tensor:
        mean = z1.mean(dim=(-2, -1), keepdim=True)
        return mean + self.factor * (z1 - mean)


def test_dynamics_error_against_scipy_blur():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.uniform(-1, 1, size=(2, 3, 20, 20))).float()
    pairs = [(0.0, 2.0), (1.0, 3.0)]
    tok = PixelTokenizer(gains=(1.0, 1.0, 1.0))
    identity = dynamics_error(tok, images, IdentityDynamics(), pairs)
    assert identity["relative"] == pytest.approx(identity["no_change"], rel=1e-12)
    # By hand with scipy: Σ‖z1 − z2‖² / Σ‖z2 − mean‖² over the pairs.
    x = images.numpy().astype(np.float64)
    num = den = 0.0
    for t1, t2 in pairs:
        b1 = gaussian_filter(x, sigma=(0, 0, np.sqrt(t1), np.sqrt(t1)), mode="reflect") if t1 else x
        b2 = gaussian_filter(x, sigma=(0, 0, np.sqrt(t2), np.sqrt(t2)), mode="reflect")
        num += ((b1 - b2) ** 2).sum()
        den += ((b2 - b2.mean(axis=(-2, -1), keepdims=True)) ** 2).sum()
    assert identity["no_change"] == pytest.approx(num / den, rel=1e-4)
    # A contraction of the detail (what blur does) predicts better than "no change".
    assert dynamics_error(tok, images, ScaleDynamics(0.8), pairs)["relative"] < identity["no_change"]

