"""KL autoencoders in the LDM layout: the Flux AE, the SD-VAE and small sizes trained from scratch.

Module names mirror the original checkpoints (``encoder.down.0.block.0.conv1.weight``, …), so a Flux
``ae.safetensors`` or an SD-VAE ``.safetensors`` loads without renaming keys.

Architecture (LDM "first stage", as used by Flux and Stable Diffusion):
  encoder: conv_in → per level [num_res_blocks ResnetBlocks, stride-2 Downsample except after the last
           ``num_down`` levels] → mid (ResnetBlock, single-head attention, ResnetBlock) → GroupNorm, swish,
           conv_out to 2·z_channels (mean, logvar) → optional quant_conv (1×1, SD only).
  decoder: optional post_quant_conv → conv_in → mid → levels in reverse with num_res_blocks + 1 blocks and a
           nearest ×2 Upsample + conv → GroupNorm, swish, conv_out to RGB.
Images are in [-1, 1] (native range, no conversion). Latents handed out by ``encode`` are normalised:
z = scale · (mean − shift); ``decode`` undoes that first.

The ``Encoder``/``Decoder`` here are shared with the Cosmos CI tokenizer (``cosmos.py``), which differs only
in its Haar patcher, its number of down/up-sampling stages and its deterministic bottleneck.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssr_cli.errors import UserValueError
from ssr_cli.models.tokenizer import DiagonalGaussian, Tokenizer
from ssr_cli.models.weights import WeightsError


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise UserValueError(
            f"GroupNorm: {channels} channels are not divisible by norm_groups={groups}; choose ch / ch_mult / "
            "norm_groups so that every level's width is a multiple of norm_groups"
        )
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm → swish → conv3×3, twice, plus a 1×1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h·w positions with 1×1-conv q/k/v/proj_out (checkpoint layout)."""

    def __init__(self, channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, 1 head, h·w, C)
            return t.flatten(2).transpose(1, 2).unsqueeze(1)

        # SDPA picks a fused (flash / memory-efficient) kernel on GPU; its default scale is 1/sqrt(C).
        out = F.scaled_dot_product_attention(tokens(self.q(n)), tokens(self.k(n)), tokens(self.v(n)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 conv3×3 after asymmetric (0, 1, 0, 1) zero padding, as in the LDM checkpoints."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest ×2 then conv3×3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Checkpointed(nn.Module):
    """Mixin: run sub-blocks through activation checkpointing when ``grad_checkpointing`` is on."""

    grad_checkpointing: bool = False

    def _run(self, block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # Recompute the block in backward instead of storing its activations (4-6 full-size tensors each).
            return checkpoint(block, x, use_reentrant=False)
        return block(x)


class Encoder(_Checkpointed):
    """(B, in_channels, H, W) -> (B, out_channels, H / 2**num_down, W / 2**num_down).

    ``num_down`` defaults to len(ch_mult) − 1 (LDM/Flux: every level but the last ends with a Downsample).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        out_channels: int,
        num_down: int | None = None,
        norm_groups: int = 32,
        mid_attention: bool = True,
        attn_levels: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        levels = len(ch_mult)
        self.num_down = levels - 1 if num_down is None else num_down
        if not 0 <= self.num_down <= levels:
            raise ValueError(f"num_down={self.num_down} must lie in [0, len(ch_mult)={levels}]")
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(levels):
            level = nn.Module()
            level.block = nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, norm_groups))
                block_in = block_out
            if i_level in attn_levels:  # LDM attn_resolutions: one AttnBlock after each ResnetBlock
                level.attn = nn.ModuleList(AttnBlock(block_out, norm_groups) for _ in range(num_res_blocks))
            if i_level < self.num_down:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups) if mid_attention else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, norm_groups)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = self._run(block, h)
                if hasattr(level, "attn"):
                    h = self._run(level.attn[j], h)
            if i_level < self.num_down:
                h = level.downsample(h)
        h = self._run(self.mid.block_1, h)
        h = self._run(self.mid.attn_1, h)
        h = self._run(self.mid.block_2, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(_Checkpointed):
    """(B, z_channels, h, w) -> (B, out_channels, h · 2**num_up, w · 2**num_up).

    ``up`` is stored in level order (``up[0]`` is the full-resolution level) but executed in reverse, so
    ``up[0]`` runs last. Levels i >= len(ch_mult) − num_up end with an Upsample (LDM/Flux: every level but 0).
    """

    def __init__(
        self,
        *,
        z_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        out_channels: int,
        num_up: int | None = None,
        norm_groups: int = 32,
        mid_attention: bool = True,
        attn_levels: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        levels = len(ch_mult)
        self.num_up = levels - 1 if num_up is None else num_up
        if not 0 <= self.num_up <= levels:
            raise ValueError(f"num_up={self.num_up} must lie in [0, len(ch_mult)={levels}]")
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups) if mid_attention else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, norm_groups)
        up: list[nn.Module] = []
        for i_level in reversed(range(levels)):
            level = nn.Module()
            level.block = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, norm_groups))
                block_in = block_out
            if i_level in attn_levels:
                level.attn = nn.ModuleList(AttnBlock(block_out, norm_groups) for _ in range(num_res_blocks + 1))
            if i_level >= levels - self.num_up:
                level.upsample = Upsample(block_in)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self._run(self.mid.block_1, h)
        h = self._run(self.mid.attn_1, h)
        h = self._run(self.mid.block_2, h)
        for i_level in reversed(range(len(self.up))):
            level = self.up[i_level]
            for j, block in enumerate(level.block):
                h = self._run(block, h)
                if hasattr(level, "attn"):
                    h = self._run(level.attn[j], h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass(frozen=True)
class KLAEParams:
    """Architecture of a KL autoencoder (the fields of Flux's ``AutoEncoderParams`` plus a few knobs)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    quant_conv: bool = False
    """SD-VAE: 1×1 quant_conv (2z→2z) after the encoder and post_quant_conv (z→z) before the decoder."""
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    in_channels: int = 3
    out_ch: int = 3
    norm_groups: int = 32
    mid_attention: bool = True
    attn_resolutions: tuple[int, ...] = ()
    """LDM ``attn_resolutions``: feature-map sizes (for ``resolution``-pixel images) whose down/up levels get
    an AttnBlock after every ResnetBlock (``encoder.down.N.attn.M``, ``decoder.up.N.attn.M``); VA-VAE: (16,)."""
    resolution: int = 256

    def attn_levels(self) -> tuple[int, ...]:
        """Level indices i whose feature map (resolution / 2**i) is in attn_resolutions."""
        return tuple(i for i in range(len(self.ch_mult)) if self.resolution // 2**i in self.attn_resolutions)


TRAINING_ONLY_PREFIXES: tuple[str, ...] = ("loss.", "foundation_model.", "linear_proj.")
"""Checkpoint entries of the LDM/VA-VAE Lightning module that encode/decode never use, skipped on load (and
reported) instead of failing strict loading: ``loss.*`` (LPIPS network, patch discriminator, learned logvar of
LPIPSWithDiscriminator), ``foundation_model.*`` (VA-VAE's frozen DINOv2/MAE copy for the alignment loss) and
``linear_proj.*`` (VA-VAE's 1×1 conv between the latent and the foundation model's features, only used by the
alignment loss). Any other key the model lacks is still an error."""


class KLAutoEncoder(Tokenizer):
    """LDM-layout KL autoencoder. ``encode`` returns a :class:`DiagonalGaussian` in the normalised latent space.

    Native image range [-1, 1], the toolkit's own convention.
    Latent: (B, z_channels, H/f, W/f) with f = 2**(len(ch_mult) − 1).
    """

    input_range = (-1.0, 1.0)
    is_kl = True
    skip_prefixes = TRAINING_ONLY_PREFIXES

    def __init__(self, params: KLAEParams = KLAEParams(), *, grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.params = params
        ch_mult = tuple(int(m) for m in params.ch_mult)
        self.latent_channels = params.z_channels
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.scale_factor = float(params.scale_factor)
        self.shift_factor = float(params.shift_factor)
        if self.scale_factor <= 0:
            raise UserValueError(f"scale_factor must be > 0, got {self.scale_factor}")
        common = dict(ch=params.ch, ch_mult=ch_mult, num_res_blocks=params.num_res_blocks,
                      norm_groups=params.norm_groups, mid_attention=params.mid_attention,
                      attn_levels=params.attn_levels())
        self.encoder = Encoder(in_channels=params.in_channels, out_channels=2 * params.z_channels, **common)
        self.decoder = Decoder(z_channels=params.z_channels, out_channels=params.out_ch, **common)
        if params.quant_conv:
            self.quant_conv = nn.Conv2d(2 * params.z_channels, 2 * params.z_channels, kernel_size=1)
            self.post_quant_conv = nn.Conv2d(params.z_channels, params.z_channels, kernel_size=1)
        else:
            self.quant_conv = None
            self.post_quant_conv = None
        self.grad_checkpointing = grad_checkpointing

    def raw_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> un-normalised (mean, logvar), each (B, z, H/f, W/f)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, 3, H, W) in [-1, 1] -> posterior over z = scale·(raw − shift), (B, z, H/f, W/f).

        Scaling a Gaussian by s multiplies its variance by s², hence logvar + 2·log(s).
        """
        mean, logvar = self.raw_moments(x)
        return DiagonalGaussian(
            mean=self.scale_factor * (mean - self.shift_factor),
            logvar=logvar.clamp(-30.0, 20.0) + 2.0 * math.log(self.scale_factor),
            scale=float(self.scale_factor), shift=float(self.shift_factor),
        )

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z, h, w) normalised latent -> image (B, 3, h·f, w·f) in [-1, 1] (not clamped)."""
        z = z / self.scale_factor + self.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder] + ([self.quant_conv] if self.quant_conv is not None else [])

    def frozen_block_names(self, encoder: int = 2, decoder: int = 2) -> list[str]:
        """``encoder.down.{0..encoder-1}`` (first executed) and ``decoder.up.{0..decoder-1}`` (last executed:
        the decoder runs ``up`` in reverse). conv_in/conv_out/mid blocks are never frozen."""
        return stage_prefixes(len(self.encoder.down), len(self.decoder.up), encoder, decoder)

    def adapt_state_dict(self, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """Accept full LDM/SD checkpoints whose VAE keys sit under ``first_stage_model.``, and the diffusers
        ``AutoencoderKL`` layout (renamed exactly; its config.json must describe this architecture)."""
        if any(".down_blocks." in k or ".mid_block." in k for k in state):
            from ssr_cli.models import diffusers_vae  # lazy: diffusers_vae imports this module (cycle)

            folder = diffusers_vae.diffusers_folder(source)
            if folder is not None:
                self._check_diffusers_config(diffusers_vae.read_config(folder), folder)
            return diffusers_vae.from_diffusers(state, self, source)
        prefix = "first_stage_model."
        if not any(k.startswith(("encoder.", "decoder.")) for k in state) and any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return state

    def _check_diffusers_config(self, config: dict, folder) -> None:
        """The folder's config.json must give this model's architecture and latent scale/shift."""
        from ssr_cli.models.diffusers_vae import CONFIG, params_from_config  # lazy: diffusers_vae imports kl_ae
        theirs = asdict(params_from_config(config, folder / CONFIG))
        ours = asdict(self.params)
        ours["ch_mult"] = tuple(int(m) for m in ours["ch_mult"])
        differ = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
        if differ:
            listed = ", ".join(f"{k}: model {a!r} vs config {b!r}" for k, (a, b) in differ.items())
            raise WeightsError(f"{folder / CONFIG} describes another kl-ae ({listed}); set tokenizer.size = "
                               '"diffusers" to build the architecture and scale/shift from it')


def stage_prefixes(encoder_levels: int, decoder_levels: int, encoder: int, decoder: int) -> list[str]:
    """Prefixes of the first ``encoder`` encoder levels and the last ``decoder`` executed decoder levels."""
    if not 0 <= encoder <= encoder_levels:
        raise UserValueError(f"cannot freeze {encoder} encoder stages: the encoder has {encoder_levels} "
                             f"(encoder.down.*)")
    if not 0 <= decoder <= decoder_levels:
        raise UserValueError(f"cannot freeze {decoder} decoder stages: the decoder has {decoder_levels} (decoder.up.*)")
    return [f"encoder.down.{i}" for i in range(encoder)] + [f"decoder.up.{i}" for i in range(decoder)]


# Named sizes. ``flux`` and ``sd`` are the published architectures; the small ones are for CPU work and
# training from scratch (scale 1, shift 0: the generator normalises latents per channel anyway).
KL_AE_SIZES: dict[str, dict] = {
    "flux": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, quant_conv=False,
                 scale_factor=0.3611, shift_factor=0.1159),
    "sd": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, quant_conv=True,
               scale_factor=0.18215, shift_factor=0.0),
    # 32×32 images -> 8×8×16 latents (f4): fits the SSR 4×4 channel grid.
    "tiny": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, quant_conv=False,
                 scale_factor=1.0, shift_factor=0.0, norm_groups=8),
    # 32×32 images -> 4×4×16 latents (f8).
    "tiny8": dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16, quant_conv=False,
                  scale_factor=1.0, shift_factor=0.0, norm_groups=8),
    # 64-256 px on CPU: f8, 16 channels, 5.0M parameters.
    "small": dict(ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16, quant_conv=False,
                  scale_factor=1.0, shift_factor=0.0, norm_groups=32),
    # VA-VAE f16d32 (LightningDiT's ``vavae_f16d32``; ddconfig of tokenizer/configs/vavae_f16d32.yaml): LDM layout
    # with quant convs, attention after every ResnetBlock of the 16-px level (of 256) in encoder and decoder.
    # Scale 1 / shift 0: encode gives the raw posterior as VA-VAE does; LightningDiT then normalises per channel
    # with its latents_stats.pt (README, "Tokenizers and weights").
    "vavae": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=32, quant_conv=True,
                  scale_factor=1.0, shift_factor=0.0, norm_groups=32, attn_resolutions=(16,), resolution=256),
}


def build_kl_ae(size: str = "flux", *, grad_checkpointing: bool = False, **overrides) -> KLAutoEncoder:
    """A KL autoencoder of a named size with field overrides (``ch``, ``ch_mult``, ``z_channels``, …)."""
    if size not in KL_AE_SIZES:
        raise UserValueError(f"unknown kl-ae size {size!r}; choose one of {sorted(KL_AE_SIZES)}")
    config = {**KL_AE_SIZES[size], **overrides}
    allowed = set(KLAEParams.__dataclass_fields__)
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise UserValueError(f"unknown kl-ae override(s) {unknown}; allowed: {sorted(allowed)}")
    config["ch_mult"] = tuple(int(m) for m in config["ch_mult"])
    return KLAutoEncoder(KLAEParams(**config), grad_checkpointing=grad_checkpointing)


def params_dict(params: KLAEParams) -> dict:
    """The architecture as a plain dict (for logs and metadata)."""
    return asdict(params)
