"""The one interface every tokenizer in the toolkit implements.

Convention inside the toolkit: images are float tensors NCHW in [-1, 1]. Each tokenizer converts to
its native range (Flux/SD/Cosmos: [-1, 1]; TAESD: [0, 1]) inside ``encode``/``decode``.

Latents returned by ``encode`` are already scaled/shifted into the space the generator sees
(Flux: z = scale * (mean - shift)); ``decode`` undoes that first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DiagonalGaussian:
    """KL posterior N(mean, exp(logvar)) over latents, both (B, C, h, w), in the scaled latent space.

    ``scale``/``shift``: the tokenizer's latent normalisation (scaled = scale·(raw − shift)); :meth:`kl` undoes it,
    so the KL is that of the raw posterior, as in LDM and EQ-VAE.
    """

    mean: torch.Tensor
    logvar: torch.Tensor
    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        self.logvar = self.logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q_raw || N(0, I)) of the raw (unscaled, unshifted) posterior, summed over C, h, w; shape (B,)."""
        mean, logvar = self.mean, self.logvar
        if self.scale != 1.0 or self.shift != 0.0:
            mean = mean / self.scale + self.shift
            logvar = logvar - 2.0 * math.log(self.scale)
        return 0.5 * torch.sum(mean.pow(2) + torch.exp(logvar) - 1.0 - logvar, dim=(1, 2, 3))


def latent_of(posterior: DiagonalGaussian | torch.Tensor, sample: bool = False) -> torch.Tensor:
    """The latent tensor of an ``encode`` result: a sample or the mean of a posterior, or the tensor itself."""
    if isinstance(posterior, DiagonalGaussian):
        return posterior.sample() if sample else posterior.mean
    return posterior


class Tokenizer(nn.Module):
    """Base class: subclasses set the attributes below and implement ``encode``/``decode``.

    Attributes
    ----------
    latent_channels: C of the latent.
    downsample_factor: spatial factor f, latent is (H/f, W/f).
    input_range: the model's native pixel range, documented; conversion happens inside encode/decode.
    is_kl: True when ``encode`` returns a :class:`DiagonalGaussian`.
    scale_factor, shift_factor: latent normalisation, z = scale * (raw - shift).
    """

    latent_channels: int = 0
    downsample_factor: int = 1
    input_range: tuple[float, float] = (-1.0, 1.0)
    is_kl: bool = False
    scale_factor: float = 1.0
    shift_factor: float = 0.0

    @property
    def grad_checkpointing(self) -> bool:
        """Activation checkpointing of the encoder and decoder blocks (models whose halves support it)."""
        return bool(getattr(self.encoder, "grad_checkpointing", False))

    @grad_checkpointing.setter
    def grad_checkpointing(self, on: bool) -> None:
        for half in (self.encoder, self.decoder):
            if not hasattr(half, "grad_checkpointing"):
                raise TypeError(f"{type(self).__name__} does not support activation checkpointing")
            half.grad_checkpointing = bool(on)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian | torch.Tensor:  # pragma: no cover - abstract
        """x: (B, 3, H, W) in [-1, 1] -> posterior or latent (B, C, H/f, W/f)."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """z: (B, C, h, w) scaled latent -> image (B, 3, h*f, w*f) in [-1, 1] (not clamped)."""
        raise NotImplementedError

    def encode_latent(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return latent_of(self.encode(x), sample=sample)

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussian | torch.Tensor]:
        posterior = self.encode(x)
        return self.decode(latent_of(posterior, sample=sample and self.training)), posterior

    def encoder_modules(self) -> list[nn.Module]:
        """Modules that ``encode`` uses (for an EMA copy of the encoder side)."""
        raise NotImplementedError

    def frozen_block_names(self, encoder: int = 2, decoder: int = 2) -> list[str]:
        """Parameter-name prefixes of the first ``encoder`` encoder stages and last ``decoder`` executed decoder stages."""
        raise NotImplementedError

    def frozen_blocks(self, encoder: int = 2, decoder: int = 2) -> list[str]:
        """Freeze those stages (requires_grad=False); returns the frozen parameter names."""
        prefixes = tuple(p.rstrip(".") + "." for p in self.frozen_block_names(encoder, decoder))
        frozen = []
        for name, param in self.named_parameters():
            if name.startswith(prefixes):
                param.requires_grad_(False)
                frozen.append(name)
        return frozen
