"""Gaussian blur by variance τ and the blur-pair sampling of the SSR regularizer (method.md §2).

``I_τ = G_τ * I`` with G a Gaussian of **variance** τ (σ = √τ) in pixels² of the image it is applied
to. Borders are "reflect" in scipy.ndimage's sense — half-sample symmetric, (d c b a | a b c d | d c b a),
the zero-flux (Neumann) border the heat-equation derivation assumes. (torch's ``F.pad(mode="reflect")`` is
the whole-sample variant, scipy's "mirror", so it is not used.) The kernel is scipy's: truncated at
radius ``int(4σ + 0.5)`` and normalised to sum 1, so ``gaussian_blur`` equals
``scipy.ndimage.gaussian_filter(img, sigma=√τ, mode="reflect")`` per image and channel.
"""

from __future__ import annotations

import math

import torch

TRUNCATE = 4.0
"""Kernel radius in standard deviations (scipy.ndimage's default)."""


def kernel_radius(sigma: float) -> int:
    """scipy.ndimage's radius for a Gaussian of standard deviation ``sigma`` (pixels): int(4σ + 0.5)."""
    return int(TRUNCATE * float(sigma) + 0.5)


def gaussian_kernels(tau: torch.Tensor, radius: int, truncate: float = TRUNCATE) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels of variance ``tau`` (B,), shape (B, 2·radius + 1), float64 (the package's
    one Gaussian kernel: the blur and SSIM's window).

    Each row is truncated at its own scipy radius int(truncate·√τ + 0.5) (taps beyond it are exactly 0), so a
    batch padded to a common ``radius`` still matches scipy per image; τ = 0 gives the unit impulse.
    """
    tau = tau.to(torch.float64)
    offsets = torch.arange(-radius, radius + 1, device=tau.device, dtype=torch.float64)
    sigma = tau.clamp_min(0).sqrt()
    own_radius = torch.floor(truncate * sigma + 0.5)
    # exp(-x²/2τ) with τ→0 guarded; rows with τ = 0 are replaced by the impulse below
    safe_tau = torch.where(tau > 0, tau, torch.ones_like(tau))
    weights = torch.exp(-0.5 * offsets[None, :] ** 2 / safe_tau[:, None])
    weights = torch.where(offsets[None, :].abs() <= own_radius[:, None], weights, torch.zeros_like(weights))
    weights = weights / weights.sum(dim=1, keepdim=True)
    impulse = (offsets == 0).to(torch.float64).expand_as(weights)
    return torch.where((tau > 0)[:, None], weights, impulse)


def reflect_indices(length: int, radius: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices of a length-``length`` axis padded by ``radius`` on both sides with scipy "reflect" borders.

    Half-sample symmetric extension, repeated as often as needed (radius may exceed the length): position n
    maps to m = n mod 2L, then m if m < L else 2L − 1 − m.
    """
    n = torch.arange(-radius, length + radius, device=device)
    m = torch.remainder(n, 2 * length)
    return torch.where(m < length, m, 2 * length - 1 - m)


def _blur_last_axis(x: torch.Tensor, kernels: torch.Tensor, radius: int) -> torch.Tensor:
    """Correlate the last axis of x (B, C, H, W) with per-image symmetric kernels (B, 2r+1), reflect borders."""
    width = x.shape[-1]
    padded = x.index_select(-1, reflect_indices(width, radius, device=x.device))
    k = kernels.to(x.dtype)[:, None, None, :]  # (B, 1, 1, 2r+1): broadcast over channels and rows
    # A loop over the 2r+1 taps (not over the batch): plain fused multiply-adds, exact in fp32 on every
    # device (a cuDNN convolution may run in TF32), no (2r+1)-times larger unfolded copy.
    out = k[..., radius:radius + 1] * padded[..., radius:radius + width]
    for j in range(1, radius + 1):
        # symmetric kernel: taps ±j share one weight
        pair = padded[..., radius + j:radius + j + width] + padded[..., radius - j:radius - j + width]
        out = out.addcmul(k[..., radius + j:radius + j + 1], pair)
    return out


def gaussian_blur(x: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Blur each image of ``x`` with an isotropic Gaussian of variance ``tau`` (pixels², σ = √τ).

    x: (B, C, H, W) float, any range; tau: a float or (B,) tensor of variances ≥ 0 (one per image).
    Returns (B, C, H, W) in x's dtype (computed in at least float32). Borders: scipy "reflect" (half-sample
    symmetric), repeated when the kernel is wider than the image. τ = 0 returns the image unchanged, exactly.
    Separable: one 1-D pass along W, then one along H. Linear in x; differentiable with respect to x.
    """
    if x.ndim != 4:
        raise ValueError(f"gaussian_blur expects images (B, C, H, W), got shape {tuple(x.shape)}")
    batch = x.shape[0]
    tau_t = torch.as_tensor(tau, dtype=torch.float64, device=x.device)
    if tau_t.ndim == 0:
        tau_t = tau_t.expand(batch)
    if tau_t.shape != (batch,):
        raise ValueError(
            f"tau must be a float or have shape ({batch},) (one variance per image), got {tuple(tau_t.shape)}"
        )
    if not torch.isfinite(tau_t).all() or (tau_t < 0).any():
        raise ValueError(f"blur variances tau must be finite and >= 0, got {tau_t.tolist()}")
    tau_max = float(tau_t.max()) if batch else 0.0
    radius = kernel_radius(math.sqrt(tau_max))
    if radius == 0:
        return x.clone()
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    kernels = gaussian_kernels(tau_t, radius)
    y = x.to(work_dtype)
    y = _blur_last_axis(y, kernels, radius)  # along W
    y = _blur_last_axis(y.transpose(-1, -2), kernels, radius).transpose(-1, -2)  # along H
    # Exact identity for τ = 0 images (the impulse kernel already gives it; this also covers dtype round trips).
    keep = (tau_t == 0).view(batch, 1, 1, 1)
    return torch.where(keep, x, y.to(x.dtype))


def sample_tau_pairs(
    n: int,
    tau_max: float = 10.0,
    delta_tau: float = 4.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n blur-variance pairs (τ1, τ2 = τ1 + Δ_I) as in appendix A.5 of the paper.

    τ1 ∈ [0, L], L = tau_max − delta_tau, with the linearly decaying density p(x) = (2/L)(1 − x/L), sampled by
    the inverse CDF x = L(1 − √(1 − u)), u ~ U[0, 1). Small τ1 (sharper pairs, stronger signal) are favoured.
    ``generator`` draws u (on the generator's device); the result is float32 on ``device`` (default: the
    generator's device, else CPU). Returns (tau1, tau2), each (n,), pixels².
    """
    if not delta_tau > 0:
        raise ValueError(f"delta_tau (the pair's variance gap Δ_I) must be > 0, got {delta_tau}")
    if delta_tau > tau_max:
        raise ValueError(f"delta_tau ({delta_tau}) must not exceed tau_max ({tau_max})")
    span = float(tau_max) - float(delta_tau)
    draw_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, generator=generator, device=draw_device, dtype=torch.float64)
    tau1 = span * (1.0 - torch.sqrt(1.0 - u))
    tau2 = tau1 + float(delta_tau)
    target = torch.device(device) if device is not None else draw_device
    return tau1.to(device=target, dtype=torch.float32), tau2.to(device=target, dtype=torch.float32)
