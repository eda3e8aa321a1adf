"""Pixel metrics of image pairs: uint8 quantization, PSNR, SSIM, and the per-image reconstruction metrics.

Images inside the toolkit are float tensors NCHW in [-1, 1]. Pixel metrics (PSNR, SSIM) are computed on the
images quantized to uint8 exactly as they would be saved: ``round((x + 1) * 127.5)`` clamped to [0, 255]
(see :func:`to_uint8`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ssr_cli.blur import gaussian_kernels
from ssr_cli.errors import UserValueError

QUANTIZE_MODES = ("round", "truncate")


def to_uint8(images: torch.Tensor, mode: str = "round") -> torch.Tensor:
    """Quantize images in [-1, 1] (any float dtype, any shape) to uint8, clamped to [0, 255].

    mode "round" (ours, everywhere by default): round((x + 1) * 127.5). "truncate": floor((x + 1) * 127.5),
    what ADM's sampler writes (``((x + 1) * 127.5).clamp(0, 255).to(uint8)``), about half a grey level lower."""
    scaled = (images.detach().to(torch.float32) + 1.0) * 127.5
    if mode == "round":
        scaled = torch.round(scaled)
    elif mode == "truncate":
        scaled = torch.floor(scaled)
    else:
        raise UserValueError(f"to_uint8: mode must be one of {QUANTIZE_MODES}, got {mode!r}")
    return scaled.clamp_(0, 255).to(torch.uint8)


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"{name}: expected two (B, C, H, W) tensors of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def psnr_uint8(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image pair, on uint8-quantized pixels with peak 255.

    x, y: (B, C, H, W) floats in [-1, 1]. Returns float64 (B,); +inf where the quantized images are equal.
    """
    _check_pair(x, y, "psnr_uint8")
    return _psnr_of_uint8(to_uint8(x), to_uint8(y))


def _psnr_of_uint8(x_u8: torch.Tensor, y_u8: torch.Tensor) -> torch.Tensor:
    mse = (x_u8.to(torch.float64) - y_u8.to(torch.float64)).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(255.0**2 / mse)  # mse == 0 gives +inf, as it should


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 255.0,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Mean SSIM of each image pair (Wang et al. 2004 settings), per channel then averaged over channels.

    x, y: (B, C, H, W) tensors on a [0, data_range] scale (e.g. uint8 values with data_range=255).
    Gaussian window sigma=1.5 truncated at 3.5 sigma (11x11), K1=0.01, K2=0.03, population (not sample)
    covariances, SSIM map averaged over the "valid" region only (pixels whose window lies inside the
    image). This equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=...)``. Differentiable; computed
    in ``dtype`` (float64 by default: the variance terms cancel catastrophically in float32 at 255 scale).
    Returns (B,) in ``dtype``; H and W must be at least the window size (11).
    """
    _check_pair(x, y, "ssim")
    batch, channels, height, width = x.shape
    # scipy.ndimage.gaussian_filter's support and normalisation (radius int(truncate·σ + 0.5))
    tau = torch.tensor([float(sigma) ** 2], dtype=torch.float64, device=x.device)
    kernel = gaussian_kernels(tau, int(truncate * sigma + 0.5), truncate)[0].to(dtype)
    win = kernel.numel()
    if height < win or width < win:
        raise UserValueError(f"ssim: images of {height}x{width} are smaller than the {win}x{win} Gaussian window")
    x = x.to(dtype).reshape(batch * channels, 1, height, width)
    y = y.to(dtype).reshape(batch * channels, 1, height, width)
    # Filter the five moments in one separable "valid" convolution.
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    k_row = kernel.view(1, 1, 1, win).expand(5, 1, 1, win)
    k_col = kernel.view(1, 1, win, 1).expand(5, 1, win, 1)
    filtered = F.conv2d(F.conv2d(moments, k_row, groups=5), k_col, groups=5)
    mu_x, mu_y, e_xx, e_yy, e_xy = filtered.unbind(dim=1)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).view(batch, channels).mean(dim=1)


def ssim_uint8(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM (see :func:`ssim`) of images in [-1, 1] after uint8 quantization, data range 255. Returns float64 (B,)."""
    _check_pair(x, y, "ssim_uint8")
    return ssim(to_uint8(x), to_uint8(y), data_range=255.0)


@torch.no_grad()
def reconstruction_metrics(real: torch.Tensor, recon: torch.Tensor, lpips_model=None) -> dict[str, np.ndarray]:
    """Per-image PSNR (dB), SSIM and, with ``lpips_model`` (see :func:`load_lpips`), LPIPS of a batch.

    real, recon: (B, 3, H, W) in [-1, 1]. All metrics see the uint8-quantized images (what would be saved),
    LPIPS after mapping them back to [-1, 1]. Returns float64 numpy arrays (B,) under ``psnr``, ``ssim``
    and ``lpips``. rFID is a set-level metric: accumulate :class:`InceptionFeatures` of ``to_uint8(real)``
    and ``to_uint8(recon)`` in two :class:`FeatureAccumulator` and call :func:`frechet_distance`.
    """
    _check_pair(real, recon, "reconstruction_metrics")
    real_u8, recon_u8 = to_uint8(real), to_uint8(recon)
    out = {
        "psnr": _psnr_of_uint8(real_u8, recon_u8).cpu().numpy(),
        "ssim": ssim(real_u8, recon_u8, data_range=255.0).cpu().numpy(),
    }
    if lpips_model is not None:
        param = next(lpips_model.parameters())
        to_unit = lambda u8: (u8.to(device=param.device, dtype=torch.float32) / 127.5 - 1.0)  # noqa: E731
        out["lpips"] = lpips_model(to_unit(real_u8), to_unit(recon_u8)).flatten().to(torch.float64).cpu().numpy()
    return out
