"""S4D layer, the S4D-VAE of blog ``002`` and its CNN-VAE baseline (method.md §6).

S4D (Gu et al. 2022, "On the parameterization and initialization of diagonal state space models"):
per feature channel h, a diagonal complex state matrix A (N/2 modes), B = 1, complex C, real skip D, step Δ.

Conventions decided here
------------------------
- **Conjugate pairs, ×2.** ``d_state`` N is the real state size. Only N/2 complex modes are stored; each
  stands for a conjugate pair (a_n, ā_n) with (c_n, c̄_n), whose summed contribution is 2·Re(·). So the
  kernel is  K_l = 2·Re( Σ_n C_n · (exp(ΔA_n) − 1)/A_n · exp(ΔA_n · l) ),  l = 0 … L−1,
  the zero-order-hold (ZOH) discretization Ā = exp(ΔA), B̄ = (exp(ΔA) − 1)/A · B with B = 1, and the
  recurrence x_k = Ā x_{k−1} + B̄ u_k, y_k = 2·Re(C x_k) + D u_k gives exactly y = K ∗ u + D u.
- **Bidirectional by default.** An image has no time direction, so a causal scan over its raster order
  would let the first pixels see nothing of the rest. ``bidirectional=True`` adds a second kernel (own C,
  shared A and Δ) run over the reversed sequence and shifted by one step, so the output at k sees
  u_j for j ≤ k through the forward kernel and j > k through the backward one (no position counted twice;
  the current input also enters through D). ``bidirectional=False`` is the plain causal S4D.
- **FFT convolution** of length 2L (zero padding, so the circular convolution equals the linear one):
  O(L log L), which is what makes the 4096-long sequence of a 64×64 image affordable.
- **Optimizer flags.** A (log(−Re A), Im A) and log Δ carry ``param._ssr_optim = {"group": "ssm",
  "weight_decay": 0.0}``; :func:`s4d_param_groups` gives them their own learning rate and no weight decay
  (as state-spaces/s4 does with its ``_optim`` attribute). C and D are ordinary parameters.

The VAE objective they are trained with (NELBO, KL schedules, the collapse alarm) is in
:mod:`ssr_cli.vae_objective`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ssr_cli.errors import UserValueError
from ssr_cli.models.dit import sincos_2d
from ssr_cli.models.tokenizer import DiagonalGaussian, Tokenizer

SSM_OPTIM_ATTR = "_ssr_optim"
"""Attribute set on the SSM parameters (A, Δ): a dict with the optimizer group and its weight decay."""


def _mark_ssm(param: nn.Parameter) -> nn.Parameter:
    setattr(param, SSM_OPTIM_ATTR, {"group": "ssm", "weight_decay": 0.0})
    return param


def is_ssm_parameter(param: torch.Tensor) -> bool:
    """True for the parameters flagged as S4D state-space parameters (A and Δ)."""
    return getattr(param, SSM_OPTIM_ATTR, None) is not None


# ----------------------------------------------------------------------------------------------- S4D layer


def fft_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y_t = Σ_s k_s u_{t−s} for t < L (linear convolution, truncated to the input length), via FFT.

    u: (..., H, L) real. k: (H, Lk) real with Lk ≤ 2L; taps at index s ≥ L act as negative lags s − 2L
    (the layout :class:`S4D` uses for its backward kernel). Returns (..., H, L) in u's dtype.
    """
    length = u.shape[-1]
    n = 2 * length  # zero padding to 2L: the circular convolution equals the linear one on [0, L)
    if k.shape[-1] > n:
        raise ValueError(f"kernel length {k.shape[-1]} exceeds twice the sequence length {length}")
    work = torch.float64 if u.dtype == torch.float64 else torch.float32  # no half-precision FFTs
    u_f = torch.fft.rfft(u.to(work), n=n)
    k_f = torch.fft.rfft(k.to(work), n=n)
    return torch.fft.irfft(u_f * k_f, n=n)[..., :length].to(u.dtype)


class S4DKernel(nn.Module):
    """The S4D convolution kernel(s) of ``d_model`` independent channels.

    Parameters: ``log_a_real`` = log(−Re A) and ``a_imag`` = Im A, (H, N/2), S4D-Lin init A_n = −½ + iπn;
    ``log_dt`` (H,) uniform in [log dt_min, log dt_max]; ``c`` (kernels, H, N/2, 2) complex C stored as
    (real, imag), unit-variance complex normal init. ``kernels`` C matrices share one A and Δ.
    """

    def __init__(self, d_model: int, d_state: int = 64, *, kernels: int = 1, dt_min: float = 1e-3,
                 dt_max: float = 1e-1) -> None:
        super().__init__()
        if d_state < 2 or d_state % 2:
            raise UserValueError(f"d_state (real state size N) must be an even number >= 2, got {d_state}")
        if not 0 < dt_min <= dt_max:
            raise UserValueError(f"need 0 < dt_min ({dt_min}) <= dt_max ({dt_max})")
        modes = d_state // 2
        log_dt = torch.rand(d_model) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = _mark_ssm(nn.Parameter(log_dt))
        self.log_a_real = _mark_ssm(nn.Parameter(torch.full((d_model, modes), math.log(0.5))))
        self.a_imag = _mark_ssm(nn.Parameter(math.pi * torch.arange(modes, dtype=torch.float32).repeat(d_model, 1)))
        self.c = nn.Parameter(torch.view_as_real(torch.randn(kernels, d_model, modes, dtype=torch.cfloat)))

    def ssm(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dt (H,), A (H, N/2) complex, C (kernels, H, N/2) complex) in the parameters' precision."""
        dt = torch.exp(self.log_dt)
        a = torch.complex(-torch.exp(self.log_a_real), self.a_imag)
        return dt, a, torch.view_as_complex(self.c)

    def discretized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ZOH: (Ā = exp(ΔA), B̄ = (exp(ΔA) − 1)/A, C), each complex; Ā, B̄ (H, N/2), C (kernels, H, N/2)."""
        dt, a, c = self.ssm()
        dt_a = a * dt[:, None]
        return torch.exp(dt_a), torch.expm1(dt_a) / a, c

    def forward(self, length: int) -> torch.Tensor:
        """K (kernels, H, length) real: K_l = 2·Re(Σ_n C_n B̄_n Ā_n^l), in the parameters' precision.

        Autocast is off here: phases l·Im(ΔA) reach ~10⁴ rad at L = 4096, which bf16 matmuls would garble.
        """
        with torch.autocast(device_type=self.log_dt.device.type, enabled=False):
            return self._kernel(length)

    def _kernel(self, length: int) -> torch.Tensor:
        dt, a, c = self.ssm()
        dt_a = a * dt[:, None]
        b_bar = torch.expm1(dt_a) / a
        steps = torch.arange(length, device=dt_a.device, dtype=dt_a.real.dtype)
        # Ā^l = exp(lΔA) (no repeated products), in real arithmetic: |Ā^l| = exp(l·Re ΔA), arg = l·Im ΔA.
        # Real exp/cos/sin are ~2.5× faster than a complex exp on CPU, the kernel's dominant cost.
        magnitude = torch.exp(dt_a.real[..., None] * steps)  # (H, N/2, L)
        phase = dt_a.imag[..., None] * steps
        weights = c * b_bar  # (kernels, H, N/2)
        return 2.0 * (torch.einsum("khn,hnl->khl", weights.real, magnitude * torch.cos(phase))
                      - torch.einsum("khn,hnl->khl", weights.imag, magnitude * torch.sin(phase)))


class S4D(nn.Module):
    """The S4D sequence map y = K ∗ u + D·u over (B, H, L) inputs, H = ``d_model`` channels.

    ``bidirectional`` (default, for images): y_k = Σ_{j≤k} K_fwd[k−j] u_j + Σ_{j>k} K_bwd[j−k−1] u_j + D u_k.
    No activation or channel mixing here: :class:`S4DBlock` adds those.
    """

    def __init__(self, d_model: int, d_state: int = 64, *, bidirectional: bool = True, dt_min: float = 1e-3,
                 dt_max: float = 1e-1) -> None:
        super().__init__()
        self.d_model = d_model
        self.bidirectional = bidirectional
        self.kernel = S4DKernel(d_model, d_state, kernels=2 if bidirectional else 1, dt_min=dt_min, dt_max=dt_max)
        self.D = nn.Parameter(torch.randn(d_model))

    def conv_kernel(self, length: int) -> torch.Tensor:
        """The (H, Lk) kernel handed to :func:`fft_conv`: (H, L) causal or (H, 2L) with the backward taps at the end."""
        k = self.kernel(length)
        if not self.bidirectional:
            return k[0]
        # index s in [L, 2L) is lag s − 2L ∈ [−L, −1]: the backward kernel's tap m sits at lag −(m + 1)
        return F.pad(k[0], (0, length)) + F.pad(k[1].flip(-1), (length, 0))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, H, L) real -> (B, H, L)."""
        if u.ndim != 3 or u.shape[1] != self.d_model:
            raise ValueError(f"S4D expects (batch, {self.d_model}, length), got {tuple(u.shape)}")
        y = fft_conv(u, self.conv_kernel(u.shape[-1]))
        return y + u * self.D[:, None].to(u.dtype)


class S4DBlock(nn.Module):
    """Pre-norm residual block: x + Dropout(GLU(1×1(Dropout(GELU(S4D(LayerNorm(x))))))). (B, H, L) -> (B, H, L)."""

    def __init__(self, d_model: int, d_state: int = 64, *, dropout: float = 0.1, bidirectional: bool = True,
                 dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.s4d = S4D(d_model, d_state, bidirectional=bidirectional, dt_min=dt_min, dt_max=dt_max)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Conv1d(d_model, 2 * d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x.transpose(1, 2)).transpose(1, 2)
        h = self.dropout(F.gelu(self.s4d(h)))
        return x + self.dropout(F.glu(self.out(h), dim=1))


def s4d_param_groups(model: nn.Module, base_lr: float, ssm_lr: float = 1e-3,
                     weight_decay: float = 0.0) -> list[dict]:
    """Two optimizer groups: everything else at ``base_lr`` / ``weight_decay``, the flagged SSM parameters
    (A, Δ) at ``ssm_lr`` with weight decay 0.

    Returns torch.optim param-group dicts with keys name, params, lr, lr_mult (= lr / base_lr, for schedules
    that scale every group alike) and weight_decay; a group with no trainable parameters is left out.
    """
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if ssm_lr < 0:
        raise ValueError(f"ssm_lr must be >= 0, got {ssm_lr}")
    main, ssm = [], []
    for param in model.parameters():
        if param.requires_grad:
            (ssm if is_ssm_parameter(param) else main).append(param)
    groups = [
        {"name": "main", "params": main, "lr": base_lr, "lr_mult": 1.0, "weight_decay": weight_decay},
        {"name": "ssm", "params": ssm, "lr": ssm_lr, "lr_mult": ssm_lr / base_lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------------------------- VAEs


def positional_encoding_2d(channels: int, height: int, width: int, *, device=None,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed sinusoidal 2-D position code, (channels, height·width) in raster order (row-major): the DiT's
    :func:`~ssr_cli.models.dit.sincos_2d`, channels first. The first half of the channels encodes the row, the
    second half the column, each as sin/cos pairs at frequencies 1/10000^(2i/(channels/2)) (the Transformer's code
    per axis). channels must be divisible by 4.
    """
    if channels % 4:
        raise ValueError(f"positional encoding needs a channel count divisible by 4, got {channels}")
    return sincos_2d(channels, height, width, dtype=torch.float64).t().contiguous().to(device=device, dtype=dtype)


def _vector_posterior(stats: torch.Tensor) -> DiagonalGaussian:
    """(B, 2D) head output -> DiagonalGaussian over a (B, D, 1, 1) latent."""
    mean, logvar = stats.chunk(2, dim=1)
    return DiagonalGaussian(mean[:, :, None, None], logvar[:, :, None, None])


def _as_vector(z: torch.Tensor, latent_dim: int) -> torch.Tensor:
    if z.ndim == 4 and z.shape[2:] == (1, 1):
        z = z[:, :, 0, 0]
    if z.ndim != 2 or z.shape[1] != latent_dim:
        raise ValueError(f"latent must be (B, {latent_dim}) or (B, {latent_dim}, 1, 1), got {tuple(z.shape)}")
    return z


class _VectorVAE(Tokenizer):
    """Shared parts of the two vector-latent VAEs: prior sampling and the learned decoder σ_x."""

    is_kl = True
    latent_dim: int
    image_size: int

    def _init_sigma(self, sigma_x: float, learn_sigma_x: bool) -> None:
        if not sigma_x > 0:
            raise UserValueError(f"sigma_x (decoder noise std in [-1, 1] pixel units) must be > 0, got {sigma_x}")
        self.log_sigma_x = nn.Parameter(torch.tensor(math.log(sigma_x)), requires_grad=learn_sigma_x)

    @property
    def sigma_x(self) -> torch.Tensor:
        """The decoder's Gaussian std in [−1, 1] pixel units (0-d tensor)."""
        return self.log_sigma_x.exp()

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images decoded from z ~ N(0, I): (n, 3, image_size, image_size), clamped to [−1, 1]."""
        ref = self.log_sigma_x
        z = torch.randn(n, self.latent_dim, 1, 1, generator=generator,
                        device=generator.device if generator is not None else ref.device)
        return self.decode(z.to(device=ref.device, dtype=ref.dtype)).clamp(-1.0, 1.0)

    def _check_image(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2:] != (self.image_size, self.image_size):
            raise UserValueError(f"{type(self).__name__} was built for (B, 3, {self.image_size}, {self.image_size}) "
                                 f"images (image_size={self.image_size}), got {tuple(x.shape)}")


class S4DEncoder(nn.Module):
    """1×1 conv → raster-flatten to L = H·W → + 2-D position code → S4D blocks → LayerNorm → mean pool → μ, log σ²."""

    def __init__(self, *, d_model: int, d_state: int, depth: int, latent_dim: int, dropout: float,
                 bidirectional: bool) -> None:
        super().__init__()
        self.in_proj = nn.Conv2d(3, d_model, 1)
        self.blocks = nn.ModuleList(
            S4DBlock(d_model, d_state, dropout=dropout, bidirectional=bidirectional) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) -> (B, 2·latent_dim)."""
        h = self.in_proj(x)
        b, c, height, width = h.shape
        h = h.reshape(b, c, height * width)
        h = h + positional_encoding_2d(c, height, width, device=h.device, dtype=h.dtype)
        for block in self.blocks:
            h = block(h)
        pooled = self.norm(h.mean(dim=-1))
        return self.head(pooled)


class S4DDecoder(nn.Module):
    """Mirror of the encoder: z → linear → broadcast over L positions + position code → S4D blocks → 1×1 conv to RGB."""

    def __init__(self, *, d_model: int, d_state: int, depth: int, latent_dim: int, dropout: float,
                 bidirectional: bool) -> None:
        super().__init__()
        self.in_proj = nn.Linear(latent_dim, d_model)
        self.blocks = nn.ModuleList(
            S4DBlock(d_model, d_state, dropout=dropout, bidirectional=bidirectional) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d_model)
        self.out_proj = nn.Conv1d(d_model, 3, 1)

    def forward(self, z: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """z (B, latent_dim) -> (B, 3, height, width), unclamped."""
        h = self.in_proj(z)[:, :, None]
        h = h + positional_encoding_2d(h.shape[1], height, width, device=h.device, dtype=h.dtype)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        return self.out_proj(h).reshape(z.shape[0], 3, height, width)


class S4DVAE(_VectorVAE):
    """The S4D-VAE of blog ``002``: a vector latent of ``latent_dim`` dimensions from S4D blocks over the
    raster-flattened image (sequence length image_size², 4096 at 64×64).

    ``encode`` returns a DiagonalGaussian over a (B, latent_dim, 1, 1) latent so the model fits the Tokenizer
    interface (downsample_factor = image_size). Images (B, 3, image_size, image_size) in [−1, 1].
    """

    def __init__(self, *, image_size: int = 64, latent_dim: int = 128, d_model: int = 64, d_state: int = 64,
                 depth: int = 4, dropout: float = 0.1, bidirectional: bool = True, sigma_x: float = 0.1,
                 learn_sigma_x: bool = True) -> None:
        super().__init__()
        if d_model % 4:
            raise UserValueError(f"d_model must be divisible by 4 (2-D position code), got {d_model}")
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.latent_channels = latent_dim
        self.downsample_factor = image_size
        arch = dict(d_model=d_model, d_state=d_state, depth=depth, latent_dim=latent_dim, dropout=dropout,
                    bidirectional=bidirectional)
        self.encoder = S4DEncoder(**arch)
        self.decoder = S4DDecoder(**arch)
        self._init_sigma(sigma_x, learn_sigma_x)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, 3, S, S) in [−1, 1] -> posterior over (B, latent_dim, 1, 1)."""
        self._check_image(x)
        return _vector_posterior(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_dim[, 1, 1]) -> (B, 3, S, S), unclamped, [−1, 1] scale."""
        return self.decoder(_as_vector(z, self.latent_dim), self.image_size, self.image_size)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def frozen_block_names(self, encoder: int = 2, decoder: int = 2) -> list[str]:
        n = len(self.decoder.blocks)
        return ([f"encoder.blocks.{i}" for i in range(min(encoder, n))]
                + [f"decoder.blocks.{i}" for i in range(max(0, n - decoder), n)])


class CNNVAE(_VectorVAE):
    """The blog's baseline: five conv layers (ReLU after each) → dense → μ, log σ²; the decoder mirrors it.

    Layout after the Gaussian-VAE CelebA notebook the blog used (Jovana-Gentic/VAE_celeba): strides
    1, 2, 2, 2, 1 (64×64 → 8×8), dense layers of ``hidden_dim``, a ``latent_dim`` vector latent. Our
    stride-2 layers are 4×4 convs (padding 1) and the stride-1 layers 3×3 (padding 1), so every size is
    exact; the decoder uses transposed convs in the mirrored order and ends in 3 channels (the mean).
    """

    def __init__(self, *, image_size: int = 64, latent_dim: int = 128,
                 channels: Iterable[int] = (64, 64, 128, 128, 128), strides: Iterable[int] = (1, 2, 2, 2, 1),
                 hidden_dim: int = 256, sigma_x: float = 0.1, learn_sigma_x: bool = True) -> None:
        super().__init__()
        channels, strides = tuple(int(c) for c in channels), tuple(int(s) for s in strides)
        if len(channels) != len(strides) or not channels:
            raise UserValueError(f"channels {channels} and strides {strides} must be non-empty and of equal length")
        if any(s not in (1, 2) for s in strides):
            raise UserValueError(f"strides must be 1 or 2, got {strides}")
        factor = 2 ** sum(s == 2 for s in strides)
        if image_size % factor:
            raise UserValueError(f"image_size {image_size} must be divisible by {factor} (the strides' total "
                                 f"downsampling)")
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.latent_channels = latent_dim
        self.downsample_factor = image_size
        self.feature_size = image_size // factor
        self.feature_channels = channels[-1]
        flat = channels[-1] * self.feature_size**2

        def conv(cin: int, cout: int, stride: int, transposed: bool) -> nn.Module:
            kernel = 4 if stride == 2 else 3
            layer = nn.ConvTranspose2d if transposed else nn.Conv2d
            return layer(cin, cout, kernel, stride=stride, padding=1)

        enc, cin = [], 3
        for cout, stride in zip(channels, strides):
            enc += [conv(cin, cout, stride, False), nn.ReLU()]
            cin = cout
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(flat, hidden_dim), nn.ReLU(),
                                     nn.Linear(hidden_dim, 2 * latent_dim))
        self.decoder_dense = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, flat),
                                           nn.ReLU())
        dec = []
        outs = channels[-2::-1] + (3,)  # mirrored widths, ending in RGB
        for i, (cout, stride) in enumerate(zip(outs, strides[::-1])):
            dec.append(conv(cin, cout, stride, True))
            if i < len(outs) - 1:
                dec.append(nn.ReLU())
            cin = cout
        self.decoder = nn.Sequential(*dec)
        self._init_sigma(sigma_x, learn_sigma_x)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, 3, S, S) in [−1, 1] -> posterior over (B, latent_dim, 1, 1)."""
        self._check_image(x)
        return _vector_posterior(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_dim[, 1, 1]) -> (B, 3, S, S), unclamped, [−1, 1] scale."""
        h = self.decoder_dense(_as_vector(z, self.latent_dim))
        return self.decoder(h.reshape(-1, self.feature_channels, self.feature_size, self.feature_size))

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def frozen_block_names(self, encoder: int = 2, decoder: int = 2) -> list[str]:
        # Sequential indices: conv layers sit at even positions (each followed by its ReLU)
        n = sum(isinstance(m, nn.Conv2d) for m in self.encoder)
        enc = [f"encoder.{2 * i}" for i in range(min(encoder, n))]
        convs = [i for i, m in enumerate(self.decoder) if isinstance(m, nn.ConvTranspose2d)]
        return enc + [f"decoder.{i}" for i in convs[max(0, len(convs) - decoder):]]


S4D_VAE_SIZES = {
    "64": dict(image_size=64, latent_dim=128, d_model=64, d_state=64, depth=4),
    "tiny": dict(image_size=16, latent_dim=8, d_model=16, d_state=8, depth=2),
}
CNN_VAE_SIZES = {
    "64": dict(image_size=64, latent_dim=128, channels=(64, 64, 128, 128, 128), hidden_dim=256),
    "blog": dict(image_size=64, latent_dim=256, channels=(128, 128, 256, 256, 256), hidden_dim=256),
    "tiny": dict(image_size=16, latent_dim=8, channels=(8, 8, 16, 16, 16), hidden_dim=32),
}
"""Model sizes as plain keyword dicts; any key can be overridden (``S4DVAE(**{**S4D_VAE_SIZES["64"], ...})``)."""
