"""The denoising task around :class:`ssr_cli.models.restoration.Denoiser` (blog ``000``, method.md §6): the
noise model, the SSR regularizer on the denoiser's bottleneck features, the training loss and the PSNR / SSIM
evaluation.

How SSR is applied to a restoration network (our reading; the blog gives only eq. 2, L = d(Ā f(I_{t−1}), f(I_t))):
- f is the denoiser's encoder up to the bottleneck, whose channel count must be W·H, one channel per basis
  function of the W×H grid (16 = 4×4), exactly as a tokenizer's latent channels.
- The blurred images are blurs of the **network input** (the noisy image; ``blur_source="clean"`` blurs the
  clean image and adds the same noise instead): the heat-equation dynamics hold for any image, and the
  network sees inputs of its own kind.
- z1 = f(blur(I, τ1)) with gradient, z2 = f_target(blur(I, τ2)) without (an EMA copy when the caller passes
  one, else the same network under no_grad), ẑ2 = dynamics.predict(z1) with the spatial mean-centering of
  eq. 24 — the same :class:`ssr_cli.dynamics.SSRDynamics` (same A matrices, same learnable A, Δ) as the
  tokenizer case. τ pairs are drawn as in appendix A.5 (``sample_tau_pairs``), τ in input pixels².
- Only the latent term: a denoiser has no decoder that maps features alone back to an image (the U-Net's
  skips bypass the bottleneck), so the image term of eq. 23 has no counterpart. For the same reason SSR is
  an additive term, not a branch that replaces the restoration loss: with probability ``alpha`` a step adds
  ``lambda_ssr`` × the latent term to the L1 restoration loss.
- The denoiser's GroupNorm fixes the bottleneck features' overall scale per image (why: see
  :mod:`ssr_cli.models.restoration`). ``normalize_latent`` (off by default) additionally divides
  the MSE by the mean square of the centred target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ssr_cli.blur import gaussian_blur, sample_tau_pairs
from ssr_cli.errors import UserValueError
from ssr_cli.metrics.pixel import psnr_uint8, ssim_uint8
from ssr_cli.models.restoration import Denoiser
from ssr_cli.regularizers import latent_mse

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def add_gaussian_noise(x: torch.Tensor, sigma_255: float, generator: torch.Generator | None = None,
                       clip: bool = False) -> torch.Tensor:
    """x (B, C, H, W) in [−1, 1] plus white Gaussian noise of std ``sigma_255`` on the 0–255 scale.

    In [−1, 1] units the std is sigma_255 / 127.5. Not clipped by default (the synthetic AWGN protocol of
    DnCNN/Restormer); ``clip=True`` clamps to [−1, 1]. ``generator`` draws the noise (on its own device).
    """
    if sigma_255 < 0:
        raise ValueError(f"sigma_255 (noise std on the 0-255 scale) must be >= 0, got {sigma_255}")
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)
    noisy = x + (sigma_255 / 127.5) * noise
    return noisy.clamp(-1.0, 1.0) if clip else noisy



def ssr_feature_loss(model: Denoiser, dynamics, inputs_tau1: torch.Tensor, inputs_tau2: torch.Tensor, *,
                     mean_centering: bool = True, latent_loss: str = "centred", normalize_latent: bool = False,
                     target_features: FeatureFn | None = None) -> torch.Tensor:
    """The SSR latent term between the bottleneck features of two inputs, τ2 > τ1 (a float32 scalar).

    z1 = model.bottleneck_features(inputs_tau1) (with gradient), z2 = target_features(inputs_tau2) under no_grad
    (default: the model itself), ẑ2 = dynamics.predict(z1); the latent MSE of ``regularizers.latent_mse`` in
    the reading ``latent_loss`` ("centred": MSE(C(z2), C(ẑ2)), as fine-tuning; "carried_mean": MSE(z2, ẑ2); without
    mean_centering always the latter), divided by mean((z2 − mean_hw z2)²) when ``normalize_latent``. ``dynamics``: an :class:`ssr_cli.dynamics.SSRDynamics` whose channel count
    equals the bottleneck's.
    """
    if dynamics.channels != model.bottleneck_channels:
        raise ValueError(
            f"SSR dynamics act on {dynamics.channels} channels but the denoiser's bottleneck has "
            f"{model.bottleneck_channels}: set the denoiser's bottleneck_channels to W·H of the basis grid"
        )
    z1 = model.bottleneck_features(inputs_tau1)
    with torch.no_grad():
        z2 = (target_features or model.bottleneck_features)(inputs_tau2).detach()
    z2_hat = dynamics.predict(z1, mean_centering=mean_centering)
    mse = latent_mse(z2_hat, z2, "centred" if mean_centering and latent_loss == "centred" else "carried_mean")
    if not normalize_latent:
        return mse
    scale = (z2 - z2.mean(dim=(-2, -1), keepdim=True)).float().pow(2).mean()
    return mse / (scale + 1e-8)


def denoise_loss(model: Denoiser, clean: torch.Tensor, noisy: torch.Tensor, *, dynamics=None, alpha: float = 1.0,
                 lambda_ssr: float = 0.1, tau_max: float = 10.0, delta_tau: float = 4.0,
                 mean_centering: bool = True, latent_loss: str = "centred", normalize_latent: bool = False,
                 blur_source: str = "noisy",
                 noise: torch.Tensor | None = None, step_rng: torch.Generator | None = None,
                 target_features: FeatureFn | None = None) -> dict[str, torch.Tensor]:
    """One training objective: L1(model(noisy), clean) [+ λ_ssr·SSR term with probability ``alpha``].

    clean, noisy: (B, 3, H, W) in [−1, 1]. dynamics=None: plain denoising (the baseline). The SSR branch
    draw uses ``step_rng`` (torch's global RNG when None); τ1 per image from appendix A.5's density on
    [0, tau_max − delta_tau], τ2 = τ1 + delta_tau, in pixels² of the input. blur_source "noisy" blurs the
    noisy input; "clean" blurs the clean image and adds ``noise`` (default: noisy − clean, the same
    realization) to both. Returns float32 scalars: loss, l1, ssr_latent (0 when not taken), branch (1 = SSR term added).
    """
    if blur_source not in ("noisy", "clean"):
        raise UserValueError(f"blur_source must be 'noisy' or 'clean', got {blur_source!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (probability of the SSR term) must be in [0, 1], got {alpha}")
    out = model(noisy)
    l1 = (out.float() - clean.float()).abs().mean()
    zero = torch.zeros((), device=clean.device)
    ssr, branch = zero, zero
    if dynamics is not None and lambda_ssr > 0:
        draw_device = step_rng.device if step_rng is not None else torch.device("cpu")
        if float(torch.rand((), generator=step_rng, device=draw_device)) < alpha:
            tau1, tau2 = sample_tau_pairs(clean.shape[0], tau_max, delta_tau, device=clean.device)
            with torch.no_grad():
                if blur_source == "noisy":
                    i1, i2 = gaussian_blur(noisy, tau1), gaussian_blur(noisy, tau2)
                else:
                    n = noisy - clean if noise is None else noise
                    i1, i2 = gaussian_blur(clean, tau1) + n, gaussian_blur(clean, tau2) + n
            ssr = ssr_feature_loss(model, dynamics, i1, i2, mean_centering=mean_centering, latent_loss=latent_loss,
                                   normalize_latent=normalize_latent, target_features=target_features)
            branch = torch.ones((), device=clean.device)
    return {"loss": l1 + lambda_ssr * ssr, "l1": l1, "ssr_latent": ssr, "branch": branch}


@torch.no_grad()
def evaluate_denoiser(model: Denoiser, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      device: torch.device | str | None = None) -> dict[str, float]:
    """PSNR (dB) and SSIM of the model's output and of the noisy input against the clean image, uint8-quantized.

    pairs: (noisy, clean) images (3, H, W) or (1, 3, H, W) in [−1, 1], any sizes (one at a time). Returns the
    means over the pairs: psnr, ssim (model output) and psnr_input, ssim_input (the noisy input), plus count.
    """
    if not pairs:
        raise ValueError("evaluate_denoiser: no (noisy, clean) pairs given")
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sums = {"psnr": 0.0, "ssim": 0.0, "psnr_input": 0.0, "ssim_input": 0.0}
    for noisy, clean in pairs:
        noisy = (noisy if noisy.ndim == 4 else noisy[None]).to(device)
        clean = (clean if clean.ndim == 4 else clean[None]).to(device)
        out = model(noisy).clamp(-1.0, 1.0)
        sums["psnr"] += float(psnr_uint8(out, clean).cpu().mean())
        sums["ssim"] += float(ssim_uint8(out, clean).cpu().mean())
        sums["psnr_input"] += float(psnr_uint8(noisy.clamp(-1, 1), clean).cpu().mean())
        sums["ssim_input"] += float(ssim_uint8(noisy.clamp(-1, 1), clean).cpu().mean())
    model.train(was_training)
    result = {k: v / len(pairs) for k, v in sums.items()}
    result["count"] = float(len(pairs))
    return result



__all__ = [
    "add_gaussian_noise",
    "denoise_loss",
    "evaluate_denoiser",
    "ssr_feature_loss",
]
