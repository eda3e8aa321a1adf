"""Cosmos continuous image tokenizers (NVIDIA Cosmos-Tokenizer CI8x8 / CI16x16), native PyTorch.

Formulation AE: deterministic, no KL, no sampling; ``encode`` returns the latent tensor.
  encode: Haar wavelet patcher (patch 4: 3 → 48 channels at H/4) → LDM-style encoder with channels 128,
          channels_mult (2, 4, 4), 2 res blocks, attention only in the middle, ``num_down`` stride-2 stages
          (CI16x16: 2, CI8x8: 1) → conv_out to 16 channels → 1×1 quant_conv.
  decode: 1×1 post_quant_conv → decoder (3 res blocks per level, ``num_down`` nearest-×2 upsamples) →
          conv_out to 48 channels → inverse Haar (unpatcher) back to RGB.
Native range [-1, 1] in and out. State-dict names are those of the original network (``encoder.*``,
``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``); the patchers hold no weights.

The released weights ship as TorchScript ``encoder.jit`` / ``decoder.jit`` / ``autoencoder.jit`` files; this
module takes their state_dict (see :func:`ssr_cli.models.weights.load_state_dict_file`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ssr_cli.errors import UserValueError
from ssr_cli.models.kl_ae import Decoder, Encoder, stage_prefixes
from ssr_cli.models.tokenizer import Tokenizer
from ssr_cli.models.weights import load_state_dict_file, partner_file


def haar_patchify(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Haar wavelet patcher: (B, C, H, W) -> (B, C·4**levels, H/2**levels, W/2**levels).

    Each level splits every channel into the four 2×2 sub-bands [LL, LH, HL, HH] (first letter: filter along
    width, second: along height), scaled so that LL is the 2×2 mean; sub-band index is the slow channel
    index (output channel = band·C + c), matching the Cosmos layout.
    """
    for _ in range(levels):
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            raise ValueError(f"Haar patcher needs even height and width at every level, got {tuple(x.shape[-2:])}")
        a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]  # top-left, top-right of each 2×2 block
        c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]  # bottom-left, bottom-right
        x = torch.cat([a + b + c + d, a + b - c - d, a - b + c - d, a - b - c + d], dim=1) * 0.25
    return x


def haar_unpatchify(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Exact inverse of :func:`haar_patchify`: (B, C·4**levels, h, w) -> (B, C, h·2**levels, w·2**levels)."""
    for _ in range(levels):
        if x.shape[1] % 4:
            raise ValueError(f"inverse Haar needs a multiple of 4 channels, got {x.shape[1]}")
        ll, lh, hl, hh = x.chunk(4, dim=1)
        a, b = ll + lh + hl + hh, ll + lh - hl - hh
        c, d = ll - lh + hl - hh, ll - lh - hl + hh
        top, bottom = torch.stack([a, b], dim=-1), torch.stack([c, d], dim=-1)  # (B, C, h, w, 2)
        n, ch, h, w = a.shape
        x = torch.stack([top, bottom], dim=-3).reshape(n, ch, 2 * h, 2 * w)
    return x


@dataclass(frozen=True)
class CosmosParams:
    channels: int = 128
    channels_mult: tuple[int, ...] = (2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    latent_channels: int = 16
    spatial_compression: int = 16
    patch_size: int = 4
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32


class CosmosCI(Tokenizer):
    """Cosmos continuous image AE. ``encode``: (B, 3, H, W) in [-1, 1] -> (B, 16, H/f, W/f) tensor."""

    input_range = (-1.0, 1.0)
    is_kl = False

    def __init__(self, params: CosmosParams = CosmosParams(), *, grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.params = params
        patch_levels = int(math.log2(params.patch_size))
        down = int(math.log2(params.spatial_compression)) - patch_levels
        if 2**patch_levels != params.patch_size or 2 ** (down + patch_levels) != params.spatial_compression:
            raise UserValueError(
                f"patch_size ({params.patch_size}) and spatial_compression ({params.spatial_compression}) must be "
                "powers of two with spatial_compression >= patch_size"
            )
        mult = tuple(int(m) for m in params.channels_mult)
        if not 0 <= down <= len(mult):
            raise UserValueError(
                f"spatial_compression {params.spatial_compression} needs {down} downsampling stages after the "
                f"patch-{params.patch_size} patcher, but channels_mult {mult} has only {len(mult)} levels"
            )
        self.patch_levels = patch_levels
        self.latent_channels = params.latent_channels
        self.downsample_factor = params.spatial_compression
        patched = 4**patch_levels
        common = dict(ch=params.channels, ch_mult=mult, num_res_blocks=params.num_res_blocks,
                      norm_groups=params.norm_groups)
        # Attribute order = the original state-dict order: encoder, decoder, quant_conv, post_quant_conv.
        self.encoder = Encoder(in_channels=params.in_channels * patched, out_channels=params.z_channels,
                               num_down=down, **common)
        self.decoder = Decoder(z_channels=params.z_channels, out_channels=params.out_channels * patched,
                               num_up=down, **common)
        self.quant_conv = nn.Conv2d(params.z_channels, params.latent_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(params.latent_channels, params.z_channels, kernel_size=1)
        self.grad_checkpointing = grad_checkpointing

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1], H and W multiples of f -> latent (B, 16, H/f, W/f)."""
        if x.shape[-2] % self.downsample_factor or x.shape[-1] % self.downsample_factor:
            raise UserValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of {self.downsample_factor}")
        return self.quant_conv(self.encoder(haar_patchify(x, self.patch_levels)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, 16, h, w) -> image (B, 3, h·f, w·f) in [-1, 1] (not clamped)."""
        return haar_unpatchify(self.decoder(self.post_quant_conv(z)), self.patch_levels)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder, self.quant_conv]

    def frozen_block_names(self, encoder: int = 2, decoder: int = 2) -> list[str]:
        """Same convention as the Flux AE: ``encoder.down.{0..}`` (first, highest resolution) and
        ``decoder.up.{0..}`` (``up`` runs in reverse, so ``up.0``/``up.1`` execute last)."""
        return stage_prefixes(len(self.encoder.down), len(self.decoder.up), encoder, decoder)

    def adapt_state_dict(self, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """Accept the released halves: ``encoder.jit`` (encoder.*, quant_conv.*) pulls in the ``decoder.jit``
        beside it (post_quant_conv.*, decoder.*) and vice versa. Drops the patchers' fixed wavelet buffers,
        should an export carry them (they hold no weights)."""
        has_encoder = any(k.startswith("encoder.") for k in state)
        has_decoder = any(k.startswith("decoder.") for k in state)
        halves = partner_file(source)
        if has_encoder != has_decoder and halves is not None and halves[1].is_file():
            state = {**state, **load_state_dict_file(halves[1])}
        return {k: v for k, v in state.items() if ".patcher." not in k and ".unpatcher." not in k}


COSMOS_SIZES: dict[str, dict] = {
    "ci16x16": dict(spatial_compression=16),
    "ci8x8": dict(spatial_compression=8),
    # Tests / CPU: patch 4 + one downsample (f8), 32-wide.
    "tiny": dict(channels=32, channels_mult=(1, 2), num_res_blocks=1, spatial_compression=8, norm_groups=8),
}


def build_cosmos(size: str = "ci16x16", *, grad_checkpointing: bool = False, **overrides) -> CosmosCI:
    """A Cosmos CI tokenizer of a named size with field overrides (``channels``, ``channels_mult``, …)."""
    if size not in COSMOS_SIZES:
        raise UserValueError(f"unknown cosmos-ci size {size!r}; choose one of {sorted(COSMOS_SIZES)}")
    config = {**COSMOS_SIZES[size], **overrides}
    allowed = set(CosmosParams.__dataclass_fields__)
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise UserValueError(f"unknown cosmos-ci override(s) {unknown}; allowed: {sorted(allowed)}")
    config["channels_mult"] = tuple(int(m) for m in config.get("channels_mult", CosmosParams.channels_mult))
    return CosmosCI(CosmosParams(**config), grad_checkpointing=grad_checkpointing)
