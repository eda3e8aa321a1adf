"""TAESD family (madebyollin/taesd, MIT): tiny conv autoencoders distilled from the SD / FLUX VAE latent spaces.

Deterministic AE, f = 8. Native image range [0, 1]: ``encode`` maps the toolkit's [-1, 1] to [0, 1] and
``decode`` maps back. TAESD latents already live in the parent VAE's *normalised* latent space (what a
diffusion model sees), so scale = 1 and shift = 0.

Layout (``nn.Sequential`` indices, so the original ``*_encoder.pth`` / ``*_decoder.pth`` load strictly):
  encoder: 0 conv(3→64), 1 Block, then three times [stride-2 conv without bias, 3 Blocks], 14 conv(64→C).
  decoder: 0 soft clamp tanh(z/3)·3, 1 conv(C→64), 2 ReLU, then three times [3 Blocks, nearest ×2, conv
           without bias], 18 Block, 19 conv(64→3).
  Block: three 3×3 convs with ReLU between, 1×1 skip (no bias) when widths differ, ReLU after the sum.
  ``taef2`` (FLUX.2, 32 channels): the Blocks at the lowest resolution (encoder 11-13, decoder 3-5) first add
  a branch x + pool(x), pool = 1×1 conv to 4·64 (no bias), GroupNorm(4), ReLU, 1×1 conv back (no bias).

Stages for ``frozen_block_names`` mirror the LDM convention (conv_in / conv_out never frozen):
  encoder stage k = the Blocks at resolution level k plus the stride-2 conv ending it:
      stage 0 = {1, 2}, stage 1 = {3, 4, 5, 6}, stage 2 = {7, 8, 9, 10}, stage 3 = {11, 12, 13};
  decoder stage k counted from the end of execution = the Blocks at level k plus the upsample conv feeding it
  from level k + 1: stage 0 = {18}, stage 1 = {13, 14, 15, 17}, stage 2 = {8, 9, 10, 12},
      stage 3 = {3, 4, 5, 7}.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ssr_cli.errors import UserFileNotFoundError, UserValueError
from ssr_cli.models.tokenizer import Tokenizer
from ssr_cli.models.weights import WeightsError, load_state_dict_file, partner_file, save_weights


def conv3(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=3, padding=1, **kwargs)


class SoftClamp(nn.Module):
    """tanh(z / 3) · 3: the decoder's input clamp, bounding latents to (−3, 3) smoothly."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / 3.0) * 3.0


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int, pool: bool = False) -> None:
        super().__init__()
        if pool:
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, 4 * n_in, kernel_size=1, bias=False),
                nn.GroupNorm(4, 4 * n_in),
                nn.ReLU(),
                nn.Conv2d(4 * n_in, n_in, kernel_size=1, bias=False),
            )
        else:
            self.pool = None
        self.conv = nn.Sequential(conv3(n_in, n_out), nn.ReLU(), conv3(n_out, n_out), nn.ReLU(), conv3(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, kernel_size=1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def taesd_encoder(latent_channels: int, width: int = 64, pool_lowest: bool = False) -> nn.Sequential:
    w = width
    layers: list[nn.Module] = [conv3(3, w), Block(w, w)]
    for level in range(3):
        lowest = pool_lowest and level == 2
        layers += [conv3(w, w, stride=2, bias=False), Block(w, w, lowest), Block(w, w, lowest), Block(w, w, lowest)]
    layers.append(conv3(w, latent_channels))
    return nn.Sequential(*layers)


def taesd_decoder(latent_channels: int, width: int = 64, pool_lowest: bool = False) -> nn.Sequential:
    w = width
    layers: list[nn.Module] = [SoftClamp(), conv3(latent_channels, w), nn.ReLU()]
    for level in range(3):
        lowest = pool_lowest and level == 0
        layers += [Block(w, w, lowest), Block(w, w, lowest), Block(w, w, lowest),
                   nn.Upsample(scale_factor=2, mode="nearest"), conv3(w, w, bias=False)]
    layers += [Block(w, w), conv3(w, 3)]
    return nn.Sequential(*layers)


# Sequential indices of each stage (see the module docstring).
_ENCODER_STAGES = ((1, 2), (3, 4, 5, 6), (7, 8, 9, 10), (11, 12, 13))
_DECODER_STAGES_FROM_END = ((18,), (13, 14, 15, 17), (8, 9, 10, 12), (3, 4, 5, 7))


class TAESD(Tokenizer):
    """Tiny AE. ``encode``: (B, 3, H, W) in [-1, 1] -> (B, C, H/8, W/8); ``decode`` the inverse, in [-1, 1]."""

    input_range = (0.0, 1.0)
    is_kl = False
    downsample_factor = 8

    def __init__(self, latent_channels: int = 4, *, width: int = 64, pool_lowest: bool = False,
                 scale_factor: float = 1.0, shift_factor: float = 0.0) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.scale_factor = float(scale_factor)
        self.shift_factor = float(shift_factor)
        self.encoder = taesd_encoder(latent_channels, width, pool_lowest)
        self.decoder = taesd_decoder(latent_channels, width, pool_lowest)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1], H, W multiples of 8 -> latent (B, C, H/8, W/8)."""
        raw = self.encoder((x + 1.0) * 0.5)  # native input range [0, 1]
        return self.scale_factor * (raw - self.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, h, w) -> image (B, 3, 8h, 8w) in [-1, 1] (not clamped; the soft latent clamp is applied)."""
        y01 = self.decoder(z / self.scale_factor + self.shift_factor)
        return y01 * 2.0 - 1.0

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def frozen_block_names(self, encoder: int = 2, decoder: int = 2) -> list[str]:
        """Prefixes ``encoder.<i>`` / ``decoder.<i>`` of the first ``encoder`` and last ``decoder`` stages."""
        if not 0 <= encoder <= len(_ENCODER_STAGES):
            raise UserValueError(f"cannot freeze {encoder} encoder stages: TAESD's encoder has {len(_ENCODER_STAGES)}")
        if not 0 <= decoder <= len(_DECODER_STAGES_FROM_END):
            raise UserValueError(
                f"cannot freeze {decoder} decoder stages: TAESD's decoder has {len(_DECODER_STAGES_FROM_END)}"
            )
        names = [f"encoder.{i}" for stage in _ENCODER_STAGES[:encoder] for i in stage]
        names += [f"decoder.{i}" for stage in _DECODER_STAGES_FROM_END[:decoder] for i in stage]
        return names

    def adapt_state_dict(self, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """Accept the original split files: ``*encoder*.pth`` pulls in the ``*decoder*`` file beside it (and
        vice versa) and their keys get the ``encoder.`` / ``decoder.`` prefixes."""
        if any(k.startswith(("encoder.", "decoder.")) for k in state):
            return state  # a combined file (what save_weights writes)
        halves = partner_file(source)
        if halves is None:
            raise WeightsError(
                f"{source}: keys have no 'encoder.'/'decoder.' prefix and the file name does not say which half it "
                "is; pass the original '*_encoder.pth' (its '*_decoder.pth' must lie beside it) or a combined file"
            )
        (own, partner), other = halves, ("decoder" if halves[0] == "encoder" else "encoder")
        if not partner.is_file():
            raise UserFileNotFoundError(
                f"{source} is a TAESD {own} file but its {other} file {partner} was not found; put both files in "
                "the same folder"
            )
        other_state = load_state_dict_file(partner)
        out = {f"{own}.{k}": v for k, v in state.items()}
        out.update({f"{other}.{k}": v for k, v in other_state.items()})
        return out


def save_original_pair(model: TAESD, encoder_path: str | Path, decoder_path: str | Path) -> None:
    """Write the original two-file layout (``*_encoder.pth`` / ``*_decoder.pth``) that taesd.py loads."""
    save_weights(model.encoder.state_dict(), encoder_path)
    save_weights(model.decoder.state_dict(), decoder_path)


TAESD_SIZES: dict[str, dict] = {
    "taesd": dict(latent_channels=4),  # SD 1.x / 2.x latent space
    "taef1": dict(latent_channels=16),  # FLUX.1
    "taef2": dict(latent_channels=32, pool_lowest=True),  # FLUX.2
}


def build_taesd(size: str = "taesd", **overrides) -> TAESD:
    """A TAESD of a named size with overrides (``latent_channels``, ``width``, ``pool_lowest``, scale/shift)."""
    if size not in TAESD_SIZES:
        raise UserValueError(f"unknown taesd size {size!r}; choose one of {sorted(TAESD_SIZES)}")
    config = {**TAESD_SIZES[size], **overrides}
    allowed = {"latent_channels", "width", "pool_lowest", "scale_factor", "shift_factor"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise UserValueError(f"unknown taesd override(s) {unknown}; allowed: {sorted(allowed)}")
    return TAESD(**config)

