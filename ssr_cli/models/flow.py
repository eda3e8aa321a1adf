"""Rectified flow: training loss, timestep sampling, ODE samplers and classifier-free guidance.

Convention (LightningDiT): x_t = t·x1 + (1 − t)·noise, so t = 0 is pure noise and t = 1 is data, and the
network predicts the constant velocity v = dx_t/dt = x1 − noise. Sampling integrates dx/dt = v(x, t) from
t = 0 to t = 1. The network is passed in as a callable, so nothing here depends on the DiT.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ssr_cli.errors import UserValueError


def sample_t_logit_normal(n: int, gen: torch.Generator | None, device: torch.device | str, mean: float = 0.0,
                          std: float = 1.0) -> torch.Tensor:
    """(n,) times t = sigmoid(mean + std·ε), ε ~ N(0, 1), drawn from ``gen`` (None: torch's global RNG)."""
    draw_device = gen.device if gen is not None else device
    eps = torch.randn(n, generator=gen, device=draw_device)
    return torch.sigmoid(mean + std * eps).to(device)


def flow_loss(model: Callable, x1: torch.Tensor, y: torch.Tensor, *, t: torch.Tensor,
              noise: torch.Tensor | None = None, cosine_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Velocity regression at times t (N,) for data x1 (N, C, H, W) and labels y (N,).

    ``mse`` is the mean squared velocity error; ``cos`` is mean(1 − cos(v̂, v)), the cosine taken over
    the channel axis at every position as LightningDiT does; ``loss = mse + cosine_weight·cos``.
    ``noise`` defaults to a draw from torch's global RNG. All three terms are fp32 scalars on x1's device.
    """
    if noise is None:
        noise = torch.randn_like(x1)
    tb = t.to(x1.dtype).view(-1, *([1] * (x1.ndim - 1)))
    x_t = tb * x1 + (1 - tb) * noise
    target = (x1 - noise).float()
    pred = model(x_t, t, y).float()
    mse = (pred - target).square().mean()
    cos = (1 - F.cosine_similarity(pred, target, dim=1)).mean()
    return {"loss": mse + cosine_weight * cos, "mse": mse, "cos": cos}


def timestep_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Warp the time grid: t' = s·t / (1 + (s − 1)·t) (LightningDiT; s = 1 is the identity).

    The map fixes 0 and 1 and is monotone for s > 0; s < 1 (LightningDiT samples with 0.3) puts more of
    the grid near t = 0, where the sample is still mostly noise.
    """
    if shift == 1.0:
        return t
    # Same map written as t / (t + (1 − t)/s), which gives exactly 0 and 1 at the endpoints.
    return t / (t + (1 - t) / shift)


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """steps + 1 shifted times from 0 to 1 (fp64 on the CPU, then moved) used by ``sample_ode``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return timestep_shift(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), shift).to(device)


@torch.no_grad()
def sample_ode(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, *, steps: int,
               method: str = "euler", shift: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = fn(x, t) from t = 0 (x = noise) to t = 1 on the shifted grid.

    ``fn`` gets x and a (N,) time tensor in x's dtype. ``euler``: one evaluation per step, exact for a
    velocity constant along the path. ``heun``: explicit trapezoid (2 evaluations per step, the last at
    t = 1), exact for a velocity affine in t.
    """
    if method not in ("euler", "heun"):
        raise UserValueError(f"unknown ODE method {method!r}; choose 'euler' or 'heun'")
    grid = time_grid(steps, shift).tolist()  # python floats: no device syncs inside the loop
    x = noise
    n = x.shape[0]

    def at(time: float) -> torch.Tensor:
        return torch.full((n,), time, dtype=x.dtype, device=x.device)

    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t_cur
        v = fn(x, at(t_cur))
        if method == "euler":
            x = x + dt * v
        else:
            x_pred = x + dt * v
            x = x + 0.5 * dt * (v + fn(x_pred, at(t_next)))
    return x


def cfg_velocity(model: Callable, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float, *,
                 interval: tuple[float, float] = (0.0, 1.0), null_class: int) -> torch.Tensor:
    """Classifier-free guided velocity v_u + scale·(v_c − v_u) on all channels.

    scale == 1: a single conditional forward. Otherwise conditional and unconditional (label
    ``null_class``) run as one doubled batch, and guidance applies per sample only where
    interval[0] ≤ t ≤ interval[1]; elsewhere the conditional velocity is returned.
    """
    if scale == 1.0:
        return model(x, t, y)
    y_null = torch.full_like(y, null_class)
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).chunk(2)
    guided = v_uncond + scale * (v_cond - v_uncond)
    lo, hi = interval
    inside = ((t >= lo) & (t <= hi)).view(-1, *([1] * (x.ndim - 1)))
    return torch.where(inside, guided, v_cond)


def initial_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, image i drawn on the CPU from its own generator
    seeded with seeds[i], so a sample never depends on batch composition, GPU count or device type."""
    draws = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(draws).to(device)
