"""S4D layer against an independent ZOH discretization and recurrence; the two VAEs; KL schedule; collapse alarm."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.signal import cont2discrete

from ssr_cli.models.s4d import (
    CNN_VAE_SIZES,
    S4D,
    S4D_VAE_SIZES,
    CNNVAE,
    S4DVAE,
    fft_conv,
    is_ssm_parameter,
    positional_encoding_2d,
    s4d_param_groups,
)
from ssr_cli.models.tokenizer import DiagonalGaussian
from ssr_cli.vae_objective import PosteriorCollapseAlarm, PosteriorCollapseWarning, kl_weight_schedule, nelbo


# one xdist group: under `--dist loadgroup` the module-scoped trained models are made once
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("s4d")]

# ----------------------------------------------------------------------------------------------- S4D layer


def _real_zoh_systems(layer: S4D, kernel_index: int):
    """Per channel: scipy's ZOH discretization of the real 2×2-block form of the layer's continuous system.

    Each complex mode (a, c) with B = 1 stands for a conjugate pair; with x = p + iq it is the real system
    p' = Re(a)p − Im(a)q + u, q' = Im(a)p + Re(a)q, contribution 2·Re(c·x) = 2(Re c·p − Im c·q).
    """
    dt, a, c = (t.detach().cpu().numpy() for t in layer.kernel.ssm())
    c = c[kernel_index]
    systems = []
    for h in range(a.shape[0]):
        modes = a.shape[1]
        A = np.zeros((2 * modes, 2 * modes))
        B = np.zeros((2 * modes, 1))
        C = np.zeros((1, 2 * modes))
        for n in range(modes):
            ar, ai = a[h, n].real, a[h, n].imag
            A[2 * n:2 * n + 2, 2 * n:2 * n + 2] = [[ar, -ai], [ai, ar]]
            B[2 * n, 0] = 1.0
            C[0, 2 * n:2 * n + 2] = [2 * c[h, n].real, -2 * c[h, n].imag]
        Ad, Bd, Cd, _, _ = cont2discrete((A, B, C, np.zeros((1, 1))), float(dt[h]), method="zoh")
        systems.append((Ad, Bd[:, 0], Cd[0]))
    return systems


def _scan(system, u: np.ndarray) -> np.ndarray:
    """S4's convention: x_k = Ā x_{k−1} + B̄ u_k, y_k = C x_k (x_{−1} = 0), step by step."""
    Ad, Bd, Cd = system
    x = np.zeros(Ad.shape[0])
    out = np.empty_like(u)
    for k, uk in enumerate(u):
        x = Ad @ x + Bd * uk
        out[k] = Cd @ x
    return out


def _layer(bidirectional: bool, d_model: int = 3, d_state: int = 8) -> S4D:
    layer = S4D(d_model, d_state, bidirectional=bidirectional).double()
    with torch.no_grad():  # move off the init so the test covers general A, Δ, D
        layer.kernel.log_a_real.add_(0.3 * torch.randn_like(layer.kernel.log_a_real))
        layer.kernel.a_imag.add_(torch.randn_like(layer.kernel.a_imag))
        layer.kernel.log_dt.fill_(math.log(0.05)).add_(torch.rand_like(layer.kernel.log_dt))
    return layer


def test_init_is_s4d_lin():
    layer = S4D(4, 16)
    dt, a, _ = layer.kernel.ssm()
    n = torch.arange(8, dtype=torch.float32)
    assert torch.allclose(a.real, torch.full((4, 8), -0.5))
    assert torch.allclose(a.imag, math.pi * n.expand(4, 8))
    assert ((dt >= 1e-3 - 1e-9) & (dt <= 1e-1 + 1e-9)).all()


def test_causal_kernel_equals_zoh_recurrence():
    layer = _layer(bidirectional=False)
    u = torch.randn(2, 3, 24, dtype=torch.float64)
    y = layer(u).detach().numpy()
    systems = _real_zoh_systems(layer, 0)
    # the layer's own (Ā, B̄) are scipy's ZOH of each 2×2 block: Ā ↔ [[Re, −Im], [Im, Re]], B̄ ↔ [Re, Im]
    a_bar, b_bar, _ = (t.detach().numpy() for t in layer.kernel.discretized())
    for h, (Ad, Bd, _) in enumerate(systems):
        np.testing.assert_allclose(Ad[0::2, 0::2].diagonal(), a_bar[h].real, atol=1e-12)
        np.testing.assert_allclose(Ad[1::2, 0::2].diagonal(), a_bar[h].imag, atol=1e-12)
        np.testing.assert_allclose(Bd[0::2], b_bar[h].real, atol=1e-12)
        np.testing.assert_allclose(Bd[1::2], b_bar[h].imag, atol=1e-12)
    d = layer.D.detach().numpy()
    expected = np.empty_like(y)
    for b in range(2):
        for h in range(3):
            expected[b, h] = _scan(systems[h], u[b, h].numpy()) + d[h] * u[b, h].numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-9, atol=1e-9)


def test_bidirectional_equals_forward_plus_shifted_backward_recurrence():
    layer = _layer(bidirectional=True)
    u = torch.randn(1, 3, 17, dtype=torch.float64)
    y = layer(u).detach().numpy()[0]
    fwd, bwd = _real_zoh_systems(layer, 0), _real_zoh_systems(layer, 1)
    d = layer.D.detach().numpy()
    for h in range(3):
        seq = u[0, h].numpy()
        # backward scan over the reversed sequence, then shifted by one: position k sees only u_j with j > k
        back = _scan(bwd[h], seq[::-1])[::-1]
        back_shifted = np.concatenate([back[1:], [0.0]])
        expected = _scan(fwd[h], seq) + back_shifted + d[h] * seq
        np.testing.assert_allclose(y[h], expected, rtol=1e-9, atol=1e-9)


def test_fft_conv_equals_direct_convolution():
    length = 19
    u = torch.randn(2, 4, length, dtype=torch.float64)
    k = torch.randn(4, length, dtype=torch.float64)
    y = fft_conv(u, k).numpy()
    for b in range(2):
        for h in range(4):
            np.testing.assert_allclose(y[b, h], np.convolve(u[b, h].numpy(), k[h].numpy())[:length], atol=1e-10)
    # two-sided layout: taps at s ≥ L are the negative lags s − 2L
    k2 = torch.randn(4, 2 * length, dtype=torch.float64)
    y2 = fft_conv(u, k2).numpy()
    for h in range(4):
        for t in range(length):
            direct = sum(k2[h, (t - j) % (2 * length)].item() * u[0, h, j].item() for j in range(length))
            assert y2[0, h, t] == pytest.approx(direct, abs=1e-10)


def test_param_groups_flag_a_and_dt_without_weight_decay():
    model = S4DVAE(**S4D_VAE_SIZES["tiny"])
    flagged = {name for name, p in model.named_parameters() if is_ssm_parameter(p)}
    assert flagged and all(name.rsplit(".", 1)[-1] in {"log_dt", "log_a_real", "a_imag"} for name in flagged)
    assert not any(name.endswith((".c", ".D")) for name in flagged)
    groups = s4d_param_groups(model, base_lr=2e-4, ssm_lr=1e-3, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["ssm"]["weight_decay"] == 0.0 and by_name["ssm"]["lr"] == 1e-3
    assert by_name["ssm"]["lr_mult"] == pytest.approx(5.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # AdamW with zero gradients: only the main group decays
    opt = torch.optim.AdamW(groups)
    before = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in by_name["ssm"]["params"]:
        assert torch.equal(p, before[id(p)])
    assert any(not torch.equal(p, before[id(p)]) for p in by_name["main"]["params"] if p.abs().sum() > 0)


def test_positional_encoding_layout():
    pe = positional_encoding_2d(8, 3, 5)
    assert pe.shape == (8, 15)
    # raster order: the row half depends on the row only, the column half on the column only
    grid = pe.reshape(8, 3, 5)
    assert torch.allclose(grid[:4], grid[:4, :, :1].expand(4, 3, 5))
    assert torch.allclose(grid[4:], grid[4:, :1, :].expand(4, 3, 5))
    assert torch.allclose(grid[0, :, 0], torch.sin(torch.arange(3.0)))


# ----------------------------------------------------------------------------------------------- VAEs


def _batch(size: int = 16, n: int = 4) -> torch.Tensor:
    from skimage import data
    from skimage.transform import resize

    img = resize(data.astronaut(), (4 * size, 4 * size), anti_aliasing=True)  # float in [0, 1]
    crops = [img[i * size:(i + 1) * size, j * size:(j + 1) * size] for i, j in [(0, 1), (1, 2), (2, 1), (3, 3)]]
    x = torch.tensor(np.stack(crops[:n]), dtype=torch.float32).permute(0, 3, 1, 2)
    return x * 2 - 1


def _train(model, x, steps: int, lr: float = 2e-3, ssm_lr: float = 2e-3, alarm=None, warmup_steps: int = 0):
    opt = torch.optim.Adam(s4d_param_groups(model, base_lr=lr, ssm_lr=ssm_lr))
    fired = []
    for step in range(steps):
        kl_weight = kl_weight_schedule(step, "linear_warmup", warmup_steps=warmup_steps) if warmup_steps else 1.0
        terms = nelbo(model, x, kl_weight=kl_weight)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        if alarm is not None:
            fired.append(alarm.update(terms["kl_per_dim"]))
    return fired


def _eval_nelbo(model, x) -> float:
    model.eval()
    with torch.no_grad():
        value = float(nelbo(model, x, generator=torch.Generator().manual_seed(1))["nelbo"])
    model.train()
    return value


@pytest.fixture(scope="module")
def trained_cnn():
    torch.manual_seed(0)
    model = CNNVAE(**CNN_VAE_SIZES["tiny"])
    x = _batch()
    before = _eval_nelbo(model, x)
    # a fresh encoder gives μ ≈ 0 (KL ≈ 0) until the decoder learns to use z: judged after the warm-up only
    alarm = PosteriorCollapseAlarm(threshold_nats_per_dim=0.01, patience_steps=5, grace_steps=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PosteriorCollapseWarning)  # the alarm must stay silent
        fired = _train(model, x, steps=60, alarm=alarm, warmup_steps=40)
    return model, x, before, fired


@pytest.mark.parametrize("family", ["cnn", "s4d"])
def test_vae_interface(family):
    model = CNNVAE(**CNN_VAE_SIZES["tiny"]) if family == "cnn" else S4DVAE(**S4D_VAE_SIZES["tiny"])
    model.eval()  # no dropout: encode is deterministic, so nelbo's KL must equal the posterior's
    x = _batch()
    post = model.encode(x)
    assert isinstance(post, DiagonalGaussian) and post.mean.shape == (4, 8, 1, 1)
    assert model.decode(post.mean).shape == x.shape
    assert model.decode(post.mean[:, :, 0, 0]).shape == x.shape
    samples = model.sample_prior(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 3, 16, 16) and samples.abs().max() <= 1
    terms = nelbo(model, x, kl_weight=0.5)
    assert terms["kl_per_dim"].shape == (8,)
    assert torch.allclose(terms["kl"], post.kl().mean(), rtol=1e-5)  # matches the Tokenizer's own KL
    assert torch.allclose(terms["loss"], terms["rec"] + 0.5 * terms["kl"])
    assert torch.allclose(terms["nelbo"], terms["rec"] + terms["kl"])
    names = model.frozen_block_names()
    assert len(names) == 4 and all(any(n.startswith(p) for n, _ in model.named_parameters()) for p in names)
    with pytest.raises(ValueError, match="image_size=16"):
        model.encode(torch.zeros(1, 3, 8, 8))


def test_gaussian_rec_term_closed_form():
    model = CNNVAE(**CNN_VAE_SIZES["tiny"], sigma_x=0.5, learn_sigma_x=False)
    x = _batch(n=2)
    with torch.no_grad():
        post = model.encode(x)
        torch.manual_seed(3)
        terms = nelbo(model, x)
        torch.manual_seed(3)
        x_rec = model.decode(post.sample())
    from scipy.stats import norm

    expected = -norm.logpdf(x.numpy(), loc=x_rec.numpy(), scale=0.5).reshape(2, -1).sum(1).mean()
    assert float(terms["rec"]) == pytest.approx(expected, rel=1e-5)


def test_cnn_vae_nelbo_decreases(trained_cnn):
    model, x, before, _ = trained_cnn
    after = _eval_nelbo(model, x)
    assert after < before - 0.1 * abs(before), (before, after)


def test_s4d_vae_nelbo_decreases():
    torch.manual_seed(0)
    model = S4DVAE(**S4D_VAE_SIZES["tiny"])
    x = _batch()
    before = _eval_nelbo(model, x)
    _train(model, x, steps=30)
    after = _eval_nelbo(model, x)
    assert after < before - 0.1 * abs(before), (before, after)


# ----------------------------------------------------------------------------------------------- KL schedule, alarm


def test_kl_weight_schedule():
    assert kl_weight_schedule(0) == 1.0
    assert kl_weight_schedule(50, "linear_warmup", warmup_steps=100) == pytest.approx(0.5)
    assert kl_weight_schedule(500, "linear_warmup", warmup_steps=100, max_weight=0.3) == pytest.approx(0.3)
    cyc = [kl_weight_schedule(s, "cyclical", cycle_steps=100, ramp_fraction=0.5) for s in (0, 25, 50, 99, 100, 125)]
    assert cyc == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="warmup_steps"):
        kl_weight_schedule(1, "linear_warmup")
    with pytest.raises(ValueError, match="linear_warmup"):
        kl_weight_schedule(1, "cosine")


class _IgnoresLatent(CNNVAE):
    """A VAE forced to ignore its latent: q(z|x) = N(0, I) exactly, so every KL term is exactly 0."""

    def encode(self, x):
        zeros = torch.zeros(x.shape[0], self.latent_dim, 1, 1) + 0.0 * self.encoder(x).sum()
        return DiagonalGaussian(zeros, zeros.clone())


def test_collapse_alarm_fires_for_a_model_ignoring_its_latent():
    model = _IgnoresLatent(**CNN_VAE_SIZES["tiny"])
    alarm = PosteriorCollapseAlarm(threshold_nats_per_dim=0.01, patience_steps=5)
    with pytest.warns(PosteriorCollapseWarning, match="8/8 latent dims"):
        fired = _train(model, _batch(), steps=8, alarm=alarm)
    assert fired == [False] * 4 + [True] * 4
    assert alarm.collapsed_dims == 8 and "POSTERIOR COLLAPSE" in alarm.message


def test_collapse_alarm_silent_for_a_trained_model(trained_cnn):
    model, x, _, fired = trained_cnn
    assert not any(fired)
    with torch.no_grad():
        kl = nelbo(model, x)["kl_per_dim"]
    assert kl.sum() > 1.0  # the latent carries information


def test_collapse_alarm_patience_and_rearm():
    alarm = PosteriorCollapseAlarm(threshold_nats_per_dim=0.01, patience_steps=3, collapsed_fraction=0.5)
    low, mixed, high = torch.tensor([0.0, 0.001, 0.5, 2.0]), torch.tensor([0.0, 0.5, 0.5, 2.0]), torch.ones(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        states = [alarm.update(v) for v in (low, low, mixed, low, low, low, low, high, low, low, low)]
    assert states == [False, False, False, False, False, True, True, False, False, False, True]
    assert sum(issubclass(w.category, PosteriorCollapseWarning) for w in caught) == 2
    graced = PosteriorCollapseAlarm(patience_steps=1, grace_steps=2)
    with pytest.warns(PosteriorCollapseWarning):
        assert [graced.update(torch.zeros(4)) for _ in range(3)] == [False, False, True]
