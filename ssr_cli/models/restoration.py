"""A compact denoiser network (blog ``000``, method.md §6): :class:`Denoiser`, a small residual U-Net.

The blog trained Restormer on SIDD for 30K iterations with and without the state-space regularizer
(PSNR 39.58 → 39.89). At the scale our machines allow we use a small residual U-Net written here
(:class:`Denoiser`): ``out = noisy + net(noisy)``, and regularize the features at its bottleneck.

The bottleneck features pass a GroupNorm(1 group, no affine) in the main path, so their overall scale per
image is fixed. Without it nothing anchors that scale (the next 1×1 conv absorbs any factor), and the SSR
term with a stop-gradient target inflates it: ẑ2 = Ā·z1 with a contracting Ā asks the sharper input's
features to exceed the blurrier one's, which the shared network answers by growing both — measured here,
features grew from rms 0.1 to 1e8 within 200 steps and training diverged. The tokenizer case has its image
term and reconstruction branch to anchor the scale; the norm plays that role here. Relative channel
energies (what the dynamics act on) stay free.

Its noise model, training objective (with and without the SSR term) and evaluation are in
:mod:`ssr_cli.restoration`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssr_cli.errors import UserValueError


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
                raise UserValueError(f"Denoiser(depth={self.depth}) needs images of at least {multiple} px, got "
                                     f"{h}×{w}")
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


__all__ = [
    "Denoiser",
    "ResBlock",
]
