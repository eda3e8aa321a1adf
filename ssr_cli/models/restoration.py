"""A compact denoiser and the SSR regularizer on its bottleneck features (blog ``000``, method.md §6).

The blog trained Restormer on SIDD for 30K iterations with and without the state-space regularizer
(PSNR 39.58 → 39.89). At the scale our machines allow we use a small residual U-Net written here
(:class:`Denoiser`): ``out = noisy + net(noisy)``, and regularize the features at its bottleneck.

How SSR is applied to a restoration network (our reading; the blog gives only eq. 2, L = d(Ā f(I_{t−1}), f(I_t))):
- f is the denoiser's encoder up to the bottleneck, whose channel count must be W·H, one channel per basis
  function of the W×H grid (16 = 4×4), exactly as a tokenizer's latent channels.
- The blurred images are blurs of the **network input** (the noisy image; ``blur_source="clean"`` blurs the
  clean image and adds the same noise instead): the heat-equation dynamics hold for any image, and the
  network sees inputs of its own kind.
- z1 = f(blur(I, τ1)) with gradient, z2 = f_target(blur(I, τ2)) without (an EMA copy when the caller passes
  one, else the same network under no_grad), ẑ2 = dynamics.predict(z1) with the spatial mean-centering of
  eq. 24 — the same :class:`ssr_cli.regularizers.SSRDynamics` (same A matrices, same learnable A, Δ) as the
  tokenizer case. τ pairs are drawn as in appendix A.5 (``sample_tau_pairs``), τ in input pixels².
- Only the latent term: a denoiser has no decoder that maps features alone back to an image (the U-Net's
  skips bypass the bottleneck), so the image term of eq. 23 has no counterpart. For the same reason SSR is
  an additive term, not a branch that replaces the restoration loss: with probability ``alpha`` a step adds
  ``lambda_ssr`` × the latent term to the L1 restoration loss.
- The bottleneck features pass a GroupNorm(1 group, no affine) in the main path, so their overall scale per
  image is fixed. Without it nothing anchors that scale (the next 1×1 conv absorbs any factor), and the SSR
  term with a stop-gradient target inflates it: ẑ2 = Ā·z1 with a contracting Ā asks the sharper input's
  features to exceed the blurrier one's, which the shared network answers by growing both — measured here,
  features grew from rms 0.1 to 1e8 within 200 steps and training diverged. The tokenizer case has its image
  term and reconstruction branch to anchor the scale; the norm plays that role here. Relative channel
  energies (what the dynamics act on) stay free. ``normalize_latent`` (off by default) additionally divides
  the MSE by the mean square of the centred target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssr_cli.blur import gaussian_blur, sample_tau_pairs
from ssr_cli.metrics import psnr_uint8, ssim_uint8
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


class ResBlock(nn.Module):
    """x + conv3×3(GELU(conv3×3(x))), channels preserved."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(x)))


class Denoiser(nn.Module):
    """Residual U-Net: ``forward(noisy) = noisy + net(noisy)``; images (B, 3, H, W) in [−1, 1], any H, W.

    Levels: a 3×3 stem to ``channels``; ``depth`` times [ResBlocks, stride-2 4×4 conv doubling the width];
    the bottleneck ResBlock, a 1×1 conv to ``bottleneck_channels`` and a GroupNorm(1, affine=False) (the
    features SSR regularizes, (B, bottleneck_channels, H/2^depth, W/2^depth), zero mean and unit mean square
    per image; ``feature_norm=False`` leaves it out), a 1×1 conv back and a ResBlock; then ``depth`` times
    [×2 transposed conv, concatenation with the skip, 1×1 fuse, ResBlocks]; a 3×3 conv to RGB initialised to
    zero, so an untrained model returns its input. Inputs whose sides are not multiples of 2^depth are
    reflect-padded and the output cropped back.
    """

    def __init__(self, channels: int = 32, depth: int = 2, bottleneck_channels: int = 16,
                 blocks_per_level: int = 1, feature_norm: bool = True) -> None:
        super().__init__()
        if depth < 1 or channels < 1 or bottleneck_channels < 1 or blocks_per_level < 1:
            raise ValueError("Denoiser: channels, depth, bottleneck_channels and blocks_per_level must all be >= 1")
        self.depth = depth
        self.bottleneck_channels = bottleneck_channels
        widths = [channels * 2**i for i in range(depth + 1)]
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.down_blocks = nn.ModuleList(
            nn.Sequential(*(ResBlock(widths[i]) for _ in range(blocks_per_level))) for i in range(depth)
        )
        self.downs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1) for i in range(depth))
        self.mid_in = ResBlock(widths[-1])
        self.to_features = nn.Conv2d(widths[-1], bottleneck_channels, 1)
        # fixes the features' scale (see the module doc); feature_norm=False drops it: fine for the plain
        # baseline (~1 dB better in our 1500-step runs) but SSR training then diverges
        self.feature_norm = nn.GroupNorm(1, bottleneck_channels, affine=False) if feature_norm else nn.Identity()
        self.from_features = nn.Conv2d(bottleneck_channels, widths[-1], 1)
        self.mid_out = ResBlock(widths[-1])
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 4, stride=2, padding=1) for i in reversed(range(depth))
        )
        self.fuses = nn.ModuleList(nn.Conv2d(2 * widths[i], widths[i], 1) for i in reversed(range(depth)))
        self.up_blocks = nn.ModuleList(
            nn.Sequential(*(ResBlock(widths[i]) for _ in range(blocks_per_level))) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(channels, 3, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        multiple = 2**self.depth
        h, w = x.shape[-2:]
        ph, pw = (-h) % multiple, (-w) % multiple
        if ph or pw:
            if ph >= h or pw >= w:
                raise ValueError(f"Denoiser(depth={self.depth}) needs images of at least {multiple} px, got {h}×{w}")
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        return x, (h, w)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.stem(x)
        skips = []
        for block, down in zip(self.down_blocks, self.downs):
            h = block(h)
            skips.append(h)
            h = down(h)
        return self.feature_norm(self.to_features(self.mid_in(h))), skips

    def bottleneck_features(self, noisy: torch.Tensor) -> torch.Tensor:
        """The encoder half only: (B, 3, H, W) -> (B, bottleneck_channels, ⌈H/2^d⌉, ⌈W/2^d⌉)."""
        padded, _ = self._pad(noisy)
        return self._encode(padded)[0]

    def forward(self, noisy: torch.Tensor, return_features: bool = False):
        """noisy (B, 3, H, W) -> clean estimate (B, 3, H, W), or (estimate, bottleneck features) when asked."""
        if noisy.ndim != 4 or noisy.shape[1] != 3:
            raise ValueError(f"Denoiser expects (B, 3, H, W) images, got {tuple(noisy.shape)}")
        padded, (height, width) = self._pad(noisy)
        feats, skips = self._encode(padded)
        h = self.mid_out(self.from_features(feats))
        for up, fuse, block, skip in zip(self.ups, self.fuses, self.up_blocks, reversed(skips)):
            h = block(fuse(torch.cat([up(h), skip], dim=1)))
        out = (padded + self.head(h))[..., :height, :width]
        return (out, feats) if return_features else out


def ssr_feature_loss(model: Denoiser, dynamics, inputs_tau1: torch.Tensor, inputs_tau2: torch.Tensor, *,
                     mean_centering: bool = True, latent_loss: str = "centred", normalize_latent: bool = False,
                     target_features: FeatureFn | None = None) -> torch.Tensor:
    """The SSR latent term between the bottleneck features of two inputs, τ2 > τ1 (a float32 scalar).

    z1 = model.bottleneck_features(inputs_tau1) (with gradient), z2 = target_features(inputs_tau2) under no_grad
    (default: the model itself), ẑ2 = dynamics.predict(z1); the latent MSE of ``regularizers.latent_mse`` in
    the reading ``latent_loss`` ("centred": MSE(C(z2), C(ẑ2)), as fine-tuning; "carried_mean": MSE(z2, ẑ2); without
    mean_centering always the latter), divided by mean((z2 − mean_hw z2)²) when ``normalize_latent``. ``dynamics``: an :class:`ssr_cli.regularizers.SSRDynamics` whose channel count
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
        raise ValueError(f"blur_source must be 'noisy' or 'clean', got {blur_source!r}")
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


def _read_rgb(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def load_image_pairs(noisy_dir: str | Path, clean_dir: str | Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(noisy, clean) image pairs (3, H, W) in [−1, 1] from two folders, matched by the file name's trailing index.

    Files like ``NOISY/NOISY_3.png`` ↔ ``GT/GT_3.png`` (the SIDD layout in ../shared/data/sidd_pairs) pair by the
    text after the last '_' of the stem; folders whose files share full names pair by name. Sorted by index.
    """
    noisy_dir, clean_dir = Path(noisy_dir), Path(clean_dir)
    for d in (noisy_dir, clean_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"image pair folder not found: {d}")

    def keyed(folder: Path) -> dict[str, Path]:
        files = [p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")]
        return {p.stem.rsplit("_", 1)[-1]: p for p in files}

    noisy, clean = keyed(noisy_dir), keyed(clean_dir)
    keys = sorted(set(noisy) & set(clean), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    missing = sorted(set(noisy) ^ set(clean))
    if not keys:
        raise FileNotFoundError(f"no matching image pairs between {noisy_dir} and {clean_dir}")
    if missing:
        raise FileNotFoundError(f"unpaired images (keys {missing[:5]}) between {noisy_dir} and {clean_dir}")
    pairs = []
    for k in keys:
        a, b = _read_rgb(noisy[k]), _read_rgb(clean[k])
        if a.shape != b.shape:
            raise ValueError(f"pair {k}: noisy {tuple(a.shape)} and clean {tuple(b.shape)} differ in size")
        pairs.append((a, b))
    return pairs


def random_crops(images: Sequence[torch.Tensor], size: int, count: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` random size×size crops (count, 3, size, size) drawn uniformly from images (3, H, W) ≥ size."""
    out = []
    for _ in range(count):
        img = images[int(torch.randint(len(images), (), generator=generator))]
        h, w = img.shape[-2:]
        if h < size or w < size:
            raise ValueError(f"crop size {size} exceeds an image of {h}×{w}")
        top = int(torch.randint(h - size + 1, (), generator=generator))
        left = int(torch.randint(w - size + 1, (), generator=generator))
        out.append(img[:, top:top + size, left:left + size])
    return torch.stack(out)


__all__ = [
    "Denoiser",
    "ResBlock",
    "add_gaussian_noise",
    "denoise_loss",
    "evaluate_denoiser",
    "load_image_pairs",
    "random_crops",
    "ssr_feature_loss",
]
