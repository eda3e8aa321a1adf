"""Rectified flow: loss at known inputs, ODE solvers on fields with exact solutions, CFG, per-image seeds."""

from __future__ import annotations

import pytest
import torch

from ssr_cli.models.dit import build_dit
from ssr_cli.models.flow import (
    cfg_velocity,
    flow_loss,
    initial_noise,
    sample_ode,
    sample_t_logit_normal,
    time_grid,
    timestep_shift,
)


def test_flow_loss_hand_computed():
    # One pixel, two channels: data (3, 4), noise 0 → target velocity (3, 4); prediction (4, 3).
    x1 = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    noise = torch.zeros_like(x1)
    seen = {}

    def model(x, t, y):
        seen["x"], seen["t"], seen["y"] = x, t, y
        return torch.tensor([4.0, 3.0]).view(1, 2, 1, 1)

    t = torch.tensor([0.25])
    out = flow_loss(model, x1, torch.tensor([7]), t=t, noise=noise, cosine_weight=0.5)
    assert out["mse"].item() == pytest.approx(1.0)  # ((4−3)² + (3−4)²) / 2
    assert out["cos"].item() == pytest.approx(1 - 24 / 25)  # cos = (12 + 12) / 25
    assert out["loss"].item() == pytest.approx(1.0 + 0.5 * 0.04)
    torch.testing.assert_close(seen["x"], 0.25 * x1)
    assert seen["t"] is t and seen["y"].item() == 7


def test_flow_loss_interpolates_and_targets_velocity():
    g = torch.Generator().manual_seed(0)
    x1, noise = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])

    def oracle(x, tt, y):  # knows the pair, so it can give the exact velocity from x_t
        tb = tt.view(-1, 1, 1, 1)
        torch.testing.assert_close(x, tb * x1 + (1 - tb) * noise)
        return x1 - noise

    out = flow_loss(oracle, x1, torch.zeros(4, dtype=torch.long), t=t, noise=noise, cosine_weight=1.0)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-6)

    def zero(x, tt, y):
        return torch.zeros_like(x)

    out = flow_loss(zero, x1, torch.zeros(4, dtype=torch.long), t=t, noise=noise, cosine_weight=0.0)
    assert out["mse"].item() == pytest.approx((x1 - noise).square().mean().item(), rel=1e-6)


def test_timestep_shift():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(timestep_shift(t, 1.0), t)
    s = timestep_shift(t, 0.3)
    assert s[0] == 0 and s[-1] == 1 and torch.all(s.diff() > 0) and torch.all(s[1:-1] < t[1:-1])
    assert s[5].item() == pytest.approx(0.3 * 0.5 / (1 - 0.7 * 0.5))
    # s and 1/s are inverse maps.
    torch.testing.assert_close(timestep_shift(s, 1 / 0.3), t)


def test_logit_normal_times():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_t_logit_normal(20000, g1, "cpu", mean=0.5, std=0.8)
    b = sample_t_logit_normal(20000, g2, "cpu", mean=0.5, std=0.8)
    assert torch.equal(a, b) and a.shape == (20000,)
    assert torch.all((a > 0) & (a < 1))
    logits = torch.log(a / (1 - a))
    assert logits.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logits.std().item() == pytest.approx(0.8, abs=0.03)
    torch.manual_seed(5)
    c = sample_t_logit_normal(8, None, "cpu")
    torch.manual_seed(5)
    assert torch.equal(c, sample_t_logit_normal(8, None, "cpu"))


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_constant_velocity_is_exact(method):
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    c = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    out = sample_ode(lambda x, t: c.expand_as(x), x0, steps=3, method=method, shift=0.3)
    torch.testing.assert_close(out, x0 + c)


def test_euler_follows_straight_rectified_flow_path():
    # For one data point x1 the exact field is v(x, t) = (x1 − x)/(1 − t): the path is the straight line
    # from the noise to x1, along which v is constant, so Euler lands on x1 on any grid.
    x1 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x0 = torch.randn_like(x1)
    calls = []

    def field(x, t):
        calls.append(t.clone())
        return (x1 - x) / (1 - t.view(-1, 1, 1, 1))

    out = sample_ode(field, x0, steps=5, method="euler", shift=0.3)
    torch.testing.assert_close(out, x1)
    assert len(calls) == 5 and calls[0].shape == (2,)
    torch.testing.assert_close(torch.stack([c[0] for c in calls]), time_grid(5, 0.3)[:-1])


def test_heun_exact_for_velocity_linear_in_t_and_euler_not():
    x0 = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    a, b = 0.7, -2.0

    def field(x, t):
        return (a + b * t).view(-1, 1, 1, 1).expand_as(x)

    exact = x0 + a + b / 2  # ∫₀¹ (a + b t) dt
    torch.testing.assert_close(sample_ode(field, x0, steps=4, method="heun", shift=0.3), exact)
    euler = sample_ode(field, x0, steps=4, method="euler", shift=1.0)
    torch.testing.assert_close(euler, x0 + a + b * (0 + 0.25 + 0.5 + 0.75) / 4)  # left Riemann sum
    assert (euler - exact).abs().max() > 0.1


def test_sample_ode_rejects_unknown_method():
    with pytest.raises(ValueError, match="heun"):
        sample_ode(lambda x, t: x, torch.zeros(1, 1), steps=2, method="rk4")


def tiny_model():
    torch.manual_seed(0)
    model = build_dit("DiT-S/2", input_size=8, in_channels=4, num_classes=5, depth=2, hidden_size=64, num_heads=2)
    with torch.no_grad():  # leave adaLN-Zero's zeros behind so the velocity depends on x, t and y
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0, 0.05)
    return model.eval()


def test_per_image_seeds_independent_of_batch():
    model = tiny_model()
    seeds, labels = [11, 22, 33, 44], [0, 3, 5, 1]  # 5 is the null label

    def generate(idx):
        noise = initial_noise([seeds[i] for i in idx], (4, 8, 8), "cpu")
        y = torch.tensor([labels[i] for i in idx])
        return sample_ode(lambda x, t: cfg_velocity(model, x, t, y, 2.0, interval=(0.1, 0.9), null_class=5),
                          noise, steps=4, method="heun", shift=0.5)

    together = generate([0, 1, 2, 3])
    alone = torch.cat([generate([i]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert (together[0] - together[1]).abs().max() > 1e-3
    # The noise of an image is its own seed's standard normal draw.
    torch.testing.assert_close(initial_noise([33], (4, 8, 8), "cpu")[0],
                               torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(33)), rtol=0, atol=0)


def test_cfg_velocity():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 1, 2, 3])
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, 5))
        torch.testing.assert_close(cfg_velocity(model, x, t, y, 1.0, null_class=5), cond, rtol=0, atol=0)
        guided = cfg_velocity(model, x, t, y, 3.0, interval=(0.2, 0.7), null_class=5)
    expected = uncond + 3.0 * (cond - uncond)
    torch.testing.assert_close(guided[1:3], expected[1:3], atol=1e-5, rtol=1e-5)  # inside the interval
    torch.testing.assert_close(guided[[0, 3]], cond[[0, 3]], atol=1e-5, rtol=1e-5)  # outside: conditional
    assert (cond - uncond).abs().max() > 1e-3
