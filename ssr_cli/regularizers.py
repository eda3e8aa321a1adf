"""The fine-tuning objectives of ``ssr finetune``: reconstruction, SSR, EQ-VAE and FT-SE (method.md §3).

Every regularizer is an ``nn.Module`` (SSR owns the learnable A and Δ) with one call,
``loss(tokenizer, x, *, step_rng, target_encoder) -> dict[str, Tensor]``: ``"loss"`` is what to minimise,
the other entries are scalar terms for metrics.jsonl. A regularizer always returns the same keys; terms of
the branch not taken this step are 0, so a log window's mean of a branch term equals
(mean over the steps that took the branch) × (mean of ``branch``).

Randomness: which branch a step takes (and EQ-VAE's scale/rotation, FT-SE's factor) is drawn from
``step_rng``, a generator the trainer seeds identically on every rank for a step, so all ranks agree and a
run is reproducible. Per-image draws (the blur variances τ, posterior samples) use torch's global RNG,
which the trainer seeds per (rank, step): different images get different τ on every rank.

Loss conventions (images in [-1, 1]):
- MAE: mean absolute error over all pixel elements; LPIPS: mean over the batch of ``lpips_fn`` (B,).
- KL (KL tokenizers only): the ``kl`` term is KL(q‖N(0, I)) summed over the latent elements and averaged
  over the batch (nats per image, the number LDM/EQ-VAE log and the paper's Fig. 4(b) reports). In the loss it
  enters as ``kl_weight · kl / (3·H·W)``: LDM/EQ-VAE sum the L1 + LPIPS error over the pixels of an image
  and add ``kl_weight · KL``; dividing that whole objective by the pixel count gives our per-element MAE
  plus this KL term, so ``kl_weight = 1e-6`` keeps the meaning it has in those code bases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssr_cli import bases
from ssr_cli.blur import gaussian_blur, sample_tau_pairs
from ssr_cli.models.tokenizer import DiagonalGaussian, latent_of
from ssr_cli.models.weights import WeightsError, save_weights

LpipsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TargetEncoder = Callable[[torch.Tensor], torch.Tensor]

KINDS = ("ssr", "eq_vae", "scale", "none")

# EQ-VAE (zelaki/eqvae): scale factors s ∈ {8/32, …, 31/32} and rot90 by k ∈ {1, 2, 3} quarter turns.
EQ_SCALES = tuple(s / 32 for s in range(8, 32))
EQ_ROTATIONS = (1, 2, 3)


# ----------------------------------------------------------------------------------------------- helpers


def _rng_device(step_rng: torch.Generator | None) -> torch.device:
    return step_rng.device if step_rng is not None else torch.device("cpu")


def _uniform(step_rng: torch.Generator | None) -> float:
    """One U[0, 1) draw from the step generator, or from torch's global (CPU) RNG when None."""
    return float(torch.rand((), generator=step_rng, device=_rng_device(step_rng)))


def _choice(options: tuple, step_rng: torch.Generator | None):
    index = int(torch.randint(len(options), (), generator=step_rng, device=_rng_device(step_rng)))
    return options[index]


def _zero(ref: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), device=ref.device, dtype=torch.float32)


def _decode_latent(tokenizer, posterior: DiagonalGaussian | torch.Tensor) -> torch.Tensor:
    """The latent the decoder sees in training: a posterior sample in train mode (as Tokenizer.forward)."""
    return latent_of(posterior, sample=tokenizer.training)


def most_square_grid(channels: int) -> tuple[int, int]:
    """The factorisation W·H = channels with W ≥ H and H as large as possible (16 → 4×4, 32 → 8×4)."""
    if channels < 1:
        raise ValueError(f"latent channel count must be >= 1, got {channels}")
    h = max(d for d in range(1, math.isqrt(channels) + 1) if channels % d == 0)
    return channels // h, h


def resolve_grid(latent_channels: int, grid: str | tuple[int, int] | None = None) -> tuple[int, int]:
    """The (W, H) basis grid for a latent of ``latent_channels`` channels; W·H must equal the channel count.

    grid: "WxH" (e.g. "4x4", "8x4"), a (W, H) pair, or None for the most square factorisation (W ≥ H).
    Raises ValueError naming ``regularizer.grid`` and listing the valid grids when W·H ≠ latent_channels.
    """
    if grid is None:
        return most_square_grid(latent_channels)
    if isinstance(grid, str):
        try:
            w, h = bases.parse_grid(grid)
        except ValueError as exc:
            raise ValueError(f"regularizer.grid = {grid!r}: {exc}") from None
    else:
        w, h = (int(v) for v in grid)
    if w * h != latent_channels:
        valid = [f"{latent_channels // d}x{d}" for d in range(1, latent_channels + 1) if latent_channels % d == 0]
        raise ValueError(
            f"regularizer.grid = '{w}x{h}' has W·H = {w * h} basis functions, but the tokenizer's latent has "
            f"{latent_channels} channels (one channel per basis function): set regularizer.grid to one of "
            f"{', '.join(valid)}, or leave it unset for the most square one "
            f"({'x'.join(map(str, most_square_grid(latent_channels)))})"
        )
    return w, h


def reconstruction_loss(
    x: torch.Tensor,
    x_rec: torch.Tensor,
    *,
    lambda_mae: float = 1.0,
    lambda_lpips: float = 0.1,
    lpips_fn: LpipsFn | None = None,
    posterior: DiagonalGaussian | torch.Tensor | None = None,
    kl_weight: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """λ_MAE·MAE + λ_LPIPS·LPIPS + kl_weight·KL/(pixel elements per image) between target and reconstruction.

    x, x_rec: (B, 3, H, W) in [-1, 1] (x_rec unclamped). lpips_fn(x_rec, x) -> (B,); None or λ_LPIPS = 0: no
    LPIPS term. posterior: the encoder's result; a DiagonalGaussian adds the KL term (see the module
    docstring for the normalisation), a tensor (deterministic AE) or None adds none.
    Returns float32 scalars: loss, mae, lpips, kl (kl = per-image KL summed over latent elements, batch mean).
    """
    if x.shape != x_rec.shape:
        raise ValueError(f"reconstruction and target shapes differ: {tuple(x_rec.shape)} vs {tuple(x.shape)}")
    mae = (x_rec.float() - x.float()).abs().mean()
    lpips = _zero(x)
    if lpips_fn is not None and lambda_lpips > 0:
        lpips = lpips_fn(x_rec, x).float().mean()
    kl = _zero(x)
    if isinstance(posterior, DiagonalGaussian):
        kl = posterior.kl().float().mean()
    pixels_per_image = x[0].numel()
    loss = lambda_mae * mae + lambda_lpips * lpips + (kl_weight / pixels_per_image) * kl
    return {"loss": loss, "mae": mae, "lpips": lpips, "kl": kl}


# ----------------------------------------------------------------------------------------------- dynamics


class SSRDynamics(nn.Module):
    """The learnable state-space update Ā = δ(Δ, A) applied to latent channels (paper eq. 18–21).

    A (C×C, continuous time) keeps its sparsity pattern (``mask``, default: A's nonzero entries): only
    the structurally nonzero entries are parameters (``a_values``), scattered into a zero matrix, so a
    zero entry can never become nonzero.
    Δ > 0 is parameterised by log Δ (kept in [log 1e-8, log 1e3] so exp never underflows to 0).
    ``discretization``: "zoh" Ā = exp(ΔA) (differentiable matrix exponential) or "euler" Ā = I + ΔA.
    ``learn_a`` / ``learn_delta`` set requires_grad (learn_delta=None follows learn_a); give these
    parameters their own LR (the paper: 0.1× base) and no weight decay — see ``ssr_parameters``.
    """

    LOG_DELTA_RANGE = (math.log(1e-8), math.log(1e3))

    def __init__(
        self,
        a_init: np.ndarray | torch.Tensor,
        *,
        mask: np.ndarray | torch.Tensor | None = None,
        delta_init: float = 0.1,
        discretization: str = "zoh",
        learn_a: bool = True,
        learn_delta: bool | None = None,
    ) -> None:
        super().__init__()
        a = torch.as_tensor(np.asarray(a_init, dtype=np.float64))
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"A must be a square (C, C) matrix, got shape {tuple(a.shape)}")
        if discretization not in ("zoh", "euler"):
            raise ValueError(f"regularizer.discretization must be 'zoh' or 'euler', got {discretization!r}")
        if not delta_init > 0:
            raise ValueError(f"regularizer.delta_init must be > 0, got {delta_init}")
        self.discretization = discretization
        # the sparsity pattern: given (bases.nonzero_mask) or the exactly nonzero entries
        mask = a != 0 if mask is None else torch.as_tensor(np.asarray(mask, dtype=bool))
        if mask.shape != a.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match A {tuple(a.shape)}")
        rows, cols = mask.nonzero(as_tuple=True)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.a_values = nn.Parameter(a[rows, cols].to(torch.float32), requires_grad=learn_a)
        self.log_delta = nn.Parameter(
            torch.tensor(math.log(delta_init), dtype=torch.float32),
            requires_grad=learn_a if learn_delta is None else learn_delta,
        )
        # the Δ training started from (delta_init or the blur-gap Δ), written beside the learned one
        self.register_buffer("delta_start", torch.tensor(float(delta_init), dtype=torch.float32), persistent=False)

    @classmethod
    def from_basis(
        cls,
        basis: str,
        width: int,
        height: int,
        *,
        orthonormal: bool = False,
        normalize: bool = True,
        domain: tuple[float, float] | None = None,
        **kwargs,
    ) -> "SSRDynamics":
        """Dynamics initialised from ``bases.a_matrix(basis, width, height, domain=domain)`` (normalised to
        max|A| = 1 unless ``normalize`` is False)."""
        a = bases.a_matrix(basis, width, height, normalize=normalize, orthonormal=orthonormal, domain=domain)
        return cls(a, mask=bases.nonzero_mask(a), **kwargs)

    @property
    def channels(self) -> int:
        return self.mask.shape[0]

    @property
    def delta(self) -> torch.Tensor:
        """Δ > 0, a 0-d float32 tensor (differentiable)."""
        return torch.exp(self.log_delta.clamp(*self.LOG_DELTA_RANGE))

    def ssr_parameters(self) -> list[nn.Parameter]:
        """The trainable SSR parameters (A's nonzero values, log Δ): the trainer's low-LR, no-decay group."""
        return [p for p in (self.a_values, self.log_delta) if p.requires_grad]

    def a_continuous(self) -> torch.Tensor:
        """A, (C, C) float32, zeros outside the sparsity mask (differentiable in the nonzero values)."""
        c = self.channels
        a = torch.zeros(c, c, dtype=self.a_values.dtype, device=self.a_values.device)
        return a.index_put((self.rows, self.cols), self.a_values)

    def a_bar(self) -> torch.Tensor:
        """Ā = exp(ΔA) (zoh) or I + ΔA (euler), (C, C) float64 (tiny; float64 keeps expm exact)."""
        a = self.a_continuous().to(torch.float64)
        delta = self.delta.to(torch.float64)
        if self.discretization == "zoh":
            return torch.linalg.matrix_exp(delta * a)
        return torch.eye(self.channels, dtype=torch.float64, device=a.device) + delta * a

    def predict(self, z1: torch.Tensor, mean_centering: bool = True) -> torch.Tensor:
        """ẑ2 from z1 (B, C, h, w), float32: mean(z1) + Ā·C(z1) with centering (paper eq. 24), else Ā·z1.

        "Ā·z" is the mode-1 product: the C channels are mixed by Ā at every latent pixel. C(z) = z − spatial
        mean per image and channel; the channel means are carried over unchanged.
        """
        if z1.ndim != 4 or z1.shape[1] != self.channels:
            raise ValueError(f"latent must be (B, {self.channels}, h, w) to match A, got {tuple(z1.shape)}")
        # fp32 outside autocast, whatever z1's dtype: in bf16 the decay 1 − Ā of the slowest mode (≈ 0.0055 for
        # the Table-3 A and Δ) rounds to 0.0039, and the rounding of ẑ2 is as large as the low channels' signal.
        with torch.autocast(device_type=z1.device.type, enabled=False):
            abar = self.a_bar().float()
            z = z1.float()
            if not mean_centering:
                return torch.einsum("kc,bchw->bkhw", abar, z)
            mean = z.mean(dim=(-2, -1), keepdim=True)
            return mean + torch.einsum("kc,bchw->bkhw", abar, z - mean)


LATENT_LOSSES = ("centred", "carried_mean")
LATENT_SPACES = ("scaled", "raw")
DELTA_SOURCES = ("fixed", "blur_gap")
A_NORMALIZATIONS = ("max", "none")


# What regularizer.discretization = "auto" picks, per basis. ZOH, Ā = exp(ΔA), is the exact solution of
# dz/dτ = A·z over a step Δ for any A: the diagonal Fourier A, the nilpotent (strictly upper-triangular)
# polynomial A's, a dense random A. Euler, I + ΔA, is only its first-order truncation, never closer, and at
# C ≤ 64 channels the matrix exponential costs nothing, so no basis has a reason for Euler.
AUTO_DISCRETIZATION = {"fourier": "zoh", "chebyshev": "zoh", "legendre": "zoh", "hermite": "zoh", "random": "zoh"}


def resolve_discretization(discretization: str, basis: str) -> str:
    """"zoh" / "euler" as given; "auto": :data:`AUTO_DISCRETIZATION` [basis] (ZOH for every basis)."""
    if discretization == "auto":
        return AUTO_DISCRETIZATION.get(basis, "zoh")
    if discretization not in ("zoh", "euler"):
        raise ValueError(f"regularizer.discretization must be 'zoh', 'euler' or 'auto', got {discretization!r}")
    return discretization


def build_dynamics(
    basis: str,
    latent_channels: int,
    *,
    grid: str | tuple[int, int] | None = None,
    orthonormal: bool = False,
    a_normalization: str = "max",
    delta_source: str = "fixed",
    delta_init: float = 0.1,
    delta_tau: float = 4.0,
    image_size: int | None = None,
    image_aspect: float = 1.0,
    discretization: str = "zoh",
    learn_a: bool = True,
    learn_delta: bool | None = None,
    seed: int = 0,
) -> SSRDynamics:
    """The SSR dynamics of a ``[regularizer]`` section over ``latent_channels`` channels.

    A: ``basis`` on the W×H ``grid`` (:func:`resolve_grid`) over a domain with the image's aspect ratio
    (``bases.image_domain``: the grid only indexes the basis functions), or for ``basis = "random"`` a dense
    seeded random A (``bases.random_a_matrix``, seed derived from ``seed`` = run.seed). ``a_normalization``
    "max" divides A by max|A| (Table 3), "none" keeps the raw generator (time = blur variance in domain units²).
    Δ: ``delta_source`` "fixed" = ``delta_init`` (Table 3); "blur_gap" = the Δ that makes Ā the exact coefficient
    dynamics of a blur of ``delta_tau`` px² at ``image_size`` px (``bases.delta_from_blur``); this needs A to be
    proportional to the orthonormal-coefficient generator (Fourier, or ``orthonormal``), else ValueError.
    """
    if a_normalization not in A_NORMALIZATIONS:
        raise ValueError(f"regularizer.a_normalization must be one of {', '.join(A_NORMALIZATIONS)}, "
                         f"got {a_normalization!r}")
    if delta_source not in DELTA_SOURCES:
        raise ValueError(f"regularizer.delta_source must be one of {', '.join(DELTA_SOURCES)}, got {delta_source!r}")
    method = resolve_discretization(discretization, basis)
    common = dict(discretization=method, learn_a=learn_a, learn_delta=learn_delta)
    normalize = a_normalization == "max"
    width, height = resolve_grid(latent_channels, grid)  # checked for a random A too (the probe orders by it)
    if basis == "random":
        if delta_source != "fixed" or not normalize:
            raise ValueError("regularizer.basis = 'random' has no physical time: it needs "
                             "regularizer.delta_source = 'fixed' and regularizer.a_normalization = 'max'")
        a = bases.random_a_matrix(latent_channels, seed)
        return SSRDynamics(a, mask=np.ones_like(a, dtype=bool), delta_init=delta_init, **common)
    domain = bases.image_domain(width, height, image_aspect)
    a = bases.a_matrix(basis, width, height, normalize=normalize, orthonormal=orthonormal, domain=domain)
    delta = delta_init
    if delta_source == "blur_gap":
        if image_size is None:
            raise ValueError("regularizer.delta_source = 'blur_gap' needs the training resolution (data.image_size)")
        generator = bases.a_matrix(basis, width, height, normalize=False, orthonormal=True, domain=domain)
        ratio = np.max(np.abs(a)) / max(np.max(np.abs(generator)), 1e-300)
        if not np.allclose(a, ratio * generator, rtol=1e-9, atol=1e-12 * np.max(np.abs(a))):
            raise ValueError(f"regularizer.delta_source = 'blur_gap': the paper-literal {basis} A is not a "
                             "coefficient generator, so no Δ makes Ā the blur's dynamics; set "
                             "regularizer.orthonormal = true (or delta_source = 'fixed')")
        # A = ratio·A_orth, so exp(Δ·A) = exp(Δ_phys·A_orth) for Δ = Δ_phys / ratio
        delta = bases.delta_from_blur(basis, width, height, delta_tau, image_size, domain=domain,
                                      normalized=False) / ratio
    return SSRDynamics(a, mask=bases.nonzero_mask(a), delta_init=delta, **common)


def dynamics_from_config(r, latent_channels: int, *, image_size: int | None, seed: int) -> SSRDynamics:
    """:func:`build_dynamics` from a recipe's ``[regularizer]`` section ``r`` (training images are square)."""
    return build_dynamics(r.basis, latent_channels, grid=r.grid, orthonormal=r.orthonormal,
                          a_normalization=r.a_normalization, delta_source=r.delta_source, delta_init=r.delta_init,
                          delta_tau=r.delta_tau, image_size=image_size, discretization=r.discretization,
                          learn_a=r.learn_a, seed=seed)


def latent_mse(z2_hat: torch.Tensor, z2: torch.Tensor, reading: str = "centred") -> torch.Tensor:
    """The SSR latent term between ẑ2 = mean(z1) + Ā·C(z1) and the target z2, (B, C, h, w).

    ``centred`` (paper eq. 24 read literally): MSE(C(z2), Ā·C(z1)) = MSE(C(z2), C(ẑ2)) — channel means are free to
    move under blur (as the paper's Fig. 5 shows they do). ``carried_mean``: MSE(z2, ẑ2), which equals the centred
    loss plus the mean of ‖mean(z2) − mean(z1)‖² over channels (Ā·C(z1) has zero spatial mean): it also pins
    the channel means to their sharp values.
    """
    if reading == "carried_mean":
        return F.mse_loss(z2_hat.float(), z2.float())
    if reading != "centred":
        raise ValueError(f"latent loss reading must be one of {', '.join(LATENT_LOSSES)}, got {reading!r}")
    centre = lambda z: z.float() - z.float().mean(dim=(-2, -1), keepdim=True)  # noqa: E731
    return F.mse_loss(centre(z2_hat), centre(z2))


# ----------------------------------------------------------------------------------------------- regularizers


class Regularizer(nn.Module):
    """Base: the reconstruction branch, shared by every kind."""

    kind = "none"

    def __init__(
        self,
        *,
        lambda_mae: float = 1.0,
        lambda_lpips: float = 0.1,
        kl_weight: float = 1e-6,
        lpips_fn: LpipsFn | None = None,
    ) -> None:
        super().__init__()
        self.lambda_mae = lambda_mae
        self.lambda_lpips = lambda_lpips
        self.kl_weight = kl_weight
        # kept out of nn.Module registration even when it is the LPIPS module itself: frozen, not checkpointed
        self.__dict__["lpips_fn"] = lpips_fn

    def _recon(self, target: torch.Tensor, x_rec: torch.Tensor, posterior=None) -> dict[str, torch.Tensor]:
        return reconstruction_loss(target, x_rec, lambda_mae=self.lambda_mae, lambda_lpips=self.lambda_lpips,
                                   lpips_fn=self.lpips_fn, posterior=posterior, kl_weight=self.kl_weight)

    def reconstruction_terms(self, tokenizer, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode, decode (a posterior sample in train mode), and the reconstruction loss; keys recon/mae/lpips/kl."""
        posterior = tokenizer.encode(x)
        terms = self._recon(x, tokenizer.decode(_decode_latent(tokenizer, posterior)), posterior)
        return {"recon": terms["loss"], "mae": terms["mae"], "lpips": terms["lpips"], "kl": terms["kl"]}

    def loss(self, tokenizer, x: torch.Tensor, *, step_rng: torch.Generator | None = None,
             target_encoder: TargetEncoder | None = None) -> dict[str, torch.Tensor]:
        """x: (B, 3, H, W) in [-1, 1]. Returns loss (= recon), recon, mae, lpips, kl."""
        terms = self.reconstruction_terms(tokenizer, x)
        return {"loss": terms["recon"], **terms}


class NoneRegularizer(Regularizer):
    """Reconstruction only (the fine-tuned baseline)."""

    kind = "none"


class SSRRegularizer(Regularizer):
    """Structured state-space regularization (paper §4.3, eq. 23; method.md §3).

    With probability ``alpha`` (drawn from step_rng) a step takes the SSR branch, else the reconstruction
    branch. SSR branch, per image: τ1 ~ p(x) = (2/L)(1 − x/L) on [0, L], L = tau_max − delta_tau, τ2 = τ1 + Δ_I;
    I1 = blur(x, τ1), I2 = blur(x, τ2); z1 = E(I1) with the trained encoder; z2 = E_ema(I2) from
    ``target_encoder`` without gradient; ẑ2 = dynamics.predict(z1);
    loss = λ_z·MSE(z2, ẑ2) + λ_I·(λ_MAE·MAE(I2, D(ẑ2)) + λ_LPIPS·LPIPS(I2, D(ẑ2))).

    ``latent_space``: "scaled" (default) reads z1, z2 in the tokenizer's scaled space z = scale·(raw − shift) (the
    latent the generator sees; for Flux λ_z then weighs like 0.13× a raw-latent MSE), "raw" in the raw posterior
    mean (z/scale + shift); the prediction is mapped back to the scaled space before decoding.
    z1 is the posterior mean for KL tokenizers (the paper writes z1 = E(I_τ1) as a deterministic map, and the
    EMA target is a mean too: a sample would add the posterior noise to the latent MSE and push σ → 0).
    target_encoder=None falls back to the trained encoder under no_grad (stop-gradient, no EMA).
    """

    kind = "ssr"

    def __init__(
        self,
        dynamics: SSRDynamics,
        *,
        alpha: float = 0.25,
        lambda_latent: float = 0.25,
        lambda_image: float = 1.0,
        lambda_mae_ssr: float = 1.0,
        lambda_lpips_ssr: float = 0.1,
        mean_centering: bool = True,
        latent_loss: str = "centred",
        latent_space: str = "scaled",
        tau_max: float = 10.0,
        delta_tau: float = 4.0,
        **recon_kwargs,
    ) -> None:
        super().__init__(**recon_kwargs)
        if latent_loss not in LATENT_LOSSES:
            raise ValueError(f"regularizer.latent_loss must be one of {', '.join(LATENT_LOSSES)}, got {latent_loss!r}")
        if latent_space not in LATENT_SPACES:
            raise ValueError(f"regularizer.latent_space must be one of {', '.join(LATENT_SPACES)}, "
                             f"got {latent_space!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"regularizer.alpha must be in [0, 1], got {alpha}")
        if not 0 < delta_tau <= tau_max:
            raise ValueError(f"need 0 < regularizer.delta_tau ({delta_tau}) <= regularizer.tau_max ({tau_max})")
        self.dynamics = dynamics
        self.alpha = alpha
        self.lambda_latent = lambda_latent
        self.lambda_image = lambda_image
        self.lambda_mae_ssr = lambda_mae_ssr
        self.lambda_lpips_ssr = lambda_lpips_ssr
        self.mean_centering = mean_centering
        self.latent_loss = latent_loss
        self.latent_space = latent_space
        self.tau_max = tau_max
        self.delta_tau = delta_tau

    def _raw_space(self, tokenizer) -> tuple[bool, float, float]:
        """(read raw latents?, scale, shift): raw only when latent_space = "raw" and the tokenizer rescales."""
        scale, shift = float(tokenizer.scale_factor), float(tokenizer.shift_factor)
        return self.latent_space == "raw" and (scale != 1.0 or shift != 0.0), scale, shift

    def predict_scaled(self, tokenizer, z1: torch.Tensor) -> torch.Tensor:
        """ẑ2 in the tokenizer's scaled space (what the decoder takes) from the scaled z1, under latent_space."""
        raw, scale, shift = self._raw_space(tokenizer)
        if not raw:
            return self.dynamics.predict(z1, mean_centering=self.mean_centering)
        return scale * (self.dynamics.predict(z1.float() / scale + shift, mean_centering=self.mean_centering) - shift)

    def ssr_terms(self, tokenizer, x: torch.Tensor, tau1: torch.Tensor,
                  target_encoder: TargetEncoder | None = None) -> dict[str, torch.Tensor]:
        """The SSR branch for given τ1 (B,), τ2 = τ1 + delta_tau.

        Returns ssr (the branch loss), ssr_latent, ssr_pixel, ssr_mae, ssr_lpips.
        """
        tau1 = tau1.to(x.device)
        with torch.no_grad():
            i1 = gaussian_blur(x, tau1)
            i2 = gaussian_blur(x, tau1 + self.delta_tau)
        z1 = latent_of(tokenizer.encode(i1), sample=False)
        with torch.no_grad():
            z2 = target_encoder(i2) if target_encoder is not None else tokenizer.encode_latent(i2)
        z2 = z2.detach()
        raw, scale, shift = self._raw_space(tokenizer)
        if raw:  # the raw posterior means, before the tokenizer's z = scale·(raw − shift)
            z1, z2 = z1.float() / scale + shift, z2.float() / scale + shift
        z2_hat = self.dynamics.predict(z1, mean_centering=self.mean_centering)
        latent = latent_mse(z2_hat, z2.float(), "centred" if self.mean_centering and self.latent_loss == "centred"
                            else "carried_mean")
        x2_hat = tokenizer.decode(scale * (z2_hat - shift) if raw else z2_hat)
        mae = (x2_hat.float() - i2.float()).abs().mean()
        lpips = _zero(x)
        if self.lpips_fn is not None and self.lambda_lpips_ssr > 0:
            lpips = self.lpips_fn(x2_hat, i2).float().mean()
        pixel = self.lambda_mae_ssr * mae + self.lambda_lpips_ssr * lpips
        total = self.lambda_latent * latent + self.lambda_image * pixel
        return {"ssr": total, "ssr_latent": latent, "ssr_pixel": pixel, "ssr_mae": mae, "ssr_lpips": lpips}

    def loss(self, tokenizer, x: torch.Tensor, *, step_rng: torch.Generator | None = None,
             target_encoder: TargetEncoder | None = None) -> dict[str, torch.Tensor]:
        """Keys: loss, branch (1 = SSR), recon, mae, lpips, kl, ssr_latent, ssr_pixel, delta, abar_norm.

        abar_norm is the spectral norm ‖Ā‖₂ (the paper notes ‖Ā‖ < 1; exactly 1 for Fourier, whose DC mode
        has a = 0).
        """
        take_ssr = _uniform(step_rng) < self.alpha
        zero = _zero(x)
        out = {"recon": zero, "mae": zero, "lpips": zero, "kl": zero, "ssr_latent": zero, "ssr_pixel": zero}
        if take_ssr:
            tau1, _ = sample_tau_pairs(x.shape[0], self.tau_max, self.delta_tau, device=x.device)
            terms = self.ssr_terms(tokenizer, x, tau1, target_encoder)
            out.update(ssr_latent=terms["ssr_latent"], ssr_pixel=terms["ssr_pixel"])
            total = terms["ssr"]
        else:
            out.update(self.reconstruction_terms(tokenizer, x))
            total = out["recon"]
        with torch.no_grad():
            delta = self.dynamics.delta.detach().float()
            abar_norm = torch.linalg.matrix_norm(self.dynamics.a_bar().detach(), ord=2).float()
        return {"loss": total, "branch": torch.tensor(float(take_ssr), device=x.device), **out,
                "delta": delta, "abar_norm": abar_norm}


class EQVAERegularizer(Regularizer):
    """EQ-VAE (Kouzelis et al. 2025; zelaki/eqvae): with probability ``p_equivariance`` (0.5) decode a
    transformed latent and match the equally transformed image.

    Transform (one per step, from step_rng): bilinear rescale by s ∈ {8/32, …, 31/32} then rot90 by
    k ∈ {1, 2, 3}. The latent (h, w) goes to (⌊s·h⌋, ⌊s·w⌋) and the image to exactly f times that (f = H/h),
    so decoder output and target always have the same size; bilinear, align_corners=False, no antialias, as
    EQ-VAE. The decoded latent is a posterior sample in train mode and the KL of the posterior is kept,
    as in EQ-VAE. (EQ-VAE's extra low-resolution "prior preservation" in its other branch is not included.)
    """

    kind = "eq_vae"

    def __init__(self, *, p_equivariance: float = 0.5, **recon_kwargs) -> None:
        super().__init__(**recon_kwargs)
        if not 0.0 <= p_equivariance <= 1.0:
            raise ValueError(f"EQ-VAE branch probability must be in [0, 1], got {p_equivariance}")
        self.p_equivariance = p_equivariance

    @staticmethod
    def transform_pair(
        z: torch.Tensor, x: torch.Tensor, scale: float, quarter_turns: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rescale z (B, C, h, w) and x (B, 3, H, W) by ``scale`` (bilinear) and rotate both by k·90°."""
        h, w = z.shape[-2:]
        fy, fx = x.shape[-2] // h, x.shape[-1] // w
        hs, ws = max(1, int(math.floor(scale * h))), max(1, int(math.floor(scale * w)))
        zt = F.interpolate(z, size=(hs, ws), mode="bilinear", align_corners=False)
        xt = F.interpolate(x, size=(hs * fy, ws * fx), mode="bilinear", align_corners=False)
        return torch.rot90(zt, quarter_turns, dims=(-1, -2)), torch.rot90(xt, quarter_turns, dims=(-1, -2))

    def loss(self, tokenizer, x: torch.Tensor, *, step_rng: torch.Generator | None = None,
             target_encoder: TargetEncoder | None = None) -> dict[str, torch.Tensor]:
        """Keys: loss, branch (1 = equivariance), recon, mae, lpips, kl, eq, eq_scale, eq_quarter_turns."""
        take_eq = _uniform(step_rng) < self.p_equivariance
        zero = _zero(x)
        out = {"recon": zero, "mae": zero, "lpips": zero, "kl": zero, "eq": zero,
               "eq_scale": zero, "eq_quarter_turns": zero}
        if take_eq:
            scale = _choice(EQ_SCALES, step_rng)
            turns = _choice(EQ_ROTATIONS, step_rng)
            posterior = tokenizer.encode(x)
            z_t, x_t = self.transform_pair(_decode_latent(tokenizer, posterior), x, scale, turns)
            terms = self._recon(x_t, tokenizer.decode(z_t), posterior)
            out.update(eq=terms["loss"], mae=terms["mae"], lpips=terms["lpips"], kl=terms["kl"],
                       eq_scale=torch.tensor(scale, device=x.device),
                       eq_quarter_turns=torch.tensor(float(turns), device=x.device))
            total = terms["loss"]
        else:
            out.update(self.reconstruction_terms(tokenizer, x))
            total = out["recon"]
        return {"loss": total, "branch": torch.tensor(float(take_eq), device=x.device), **out}


class ScaleRegularizer(Regularizer):
    """FT-SE, scale equivariance (Skorokhodov et al. 2025, "Improving the diffusability of autoencoders").

    Every step: the reconstruction loss of x plus ``se_weight`` × the reconstruction loss of the ×f
    downsampled image against the decoded ×f downsampled latent, f ∈ ``factors`` (default {2, 4}) drawn from
    step_rng (factors that would leave the latent empty are skipped). One encode serves both terms.
    Downsampling is bilinear (align_corners=False, no antialias) on latent and image alike; the KL enters once,
    with the full-resolution term. The additive form and se_weight = 0.25 are our reading of FT-SE
    (not checked against its code).
    """

    kind = "scale"

    def __init__(self, *, se_weight: float = 0.25, factors: tuple[int, ...] = (2, 4), **recon_kwargs) -> None:
        super().__init__(**recon_kwargs)
        if se_weight < 0:
            raise ValueError(f"FT-SE weight must be >= 0, got {se_weight}")
        if not factors or any(int(f) < 1 for f in factors):
            raise ValueError(f"FT-SE downsampling factors must be integers >= 1, got {factors}")
        self.se_weight = se_weight
        self.factors = tuple(int(f) for f in factors)

    @staticmethod
    def downsample_pair(z: torch.Tensor, x: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear ×factor downsampling of z (B, C, h, w) to (h//f, w//f) and x to f_img times that."""
        h, w = z.shape[-2:]
        fy, fx = x.shape[-2] // h, x.shape[-1] // w
        hs, ws = h // factor, w // factor
        zd = F.interpolate(z, size=(hs, ws), mode="bilinear", align_corners=False)
        xd = F.interpolate(x, size=(hs * fy, ws * fx), mode="bilinear", align_corners=False)
        return zd, xd

    def loss(self, tokenizer, x: torch.Tensor, *, step_rng: torch.Generator | None = None,
             target_encoder: TargetEncoder | None = None) -> dict[str, torch.Tensor]:
        """Keys: loss, recon, mae, lpips, kl, se, se_factor."""
        posterior = tokenizer.encode(x)
        z = _decode_latent(tokenizer, posterior)
        full = self._recon(x, tokenizer.decode(z), posterior)
        usable = tuple(f for f in self.factors if z.shape[-2] // f >= 1 and z.shape[-1] // f >= 1)
        if not usable:
            raise ValueError(
                f"FT-SE: latent {tuple(z.shape[-2:])} is too small for downsampling factors {self.factors}"
            )
        factor = _choice(usable, step_rng)
        z_d, x_d = self.downsample_pair(z, x, factor)
        se = self._recon(x_d, tokenizer.decode(z_d), posterior=None)["loss"]
        return {"loss": full["loss"] + self.se_weight * se, "recon": full["loss"], "mae": full["mae"],
                "lpips": full["lpips"], "kl": full["kl"], "se": se,
                "se_factor": torch.tensor(float(factor), device=x.device)}


# ----------------------------------------------------------------------------------------------- factory


def build_regularizer(
    kind: str,
    *,
    latent_channels: int,
    basis: str = "fourier",
    grid: str | tuple[int, int] | None = None,
    orthonormal: bool = False,
    alpha: float = 0.25,
    lambda_latent: float = 0.25,
    lambda_image: float = 1.0,
    lambda_mae_ssr: float = 1.0,
    lambda_lpips_ssr: float = 0.1,
    discretization: str = "zoh",
    delta_init: float = 0.1,
    delta_source: str = "fixed",
    a_normalization: str = "max",
    image_size: int | None = None,
    seed: int = 0,
    learn_a: bool = True,
    learn_delta: bool | None = None,
    mean_centering: bool = True,
    latent_loss: str = "centred",
    latent_space: str = "scaled",
    tau_max: float = 10.0,
    delta_tau: float = 4.0,
    lambda_mae: float = 1.0,
    lambda_lpips: float = 0.1,
    kl_weight: float = 1e-6,
    lpips_fn: LpipsFn | None = None,
    eq_probability: float = 0.5,
    se_weight: float = 0.25,
    se_factors: tuple[int, ...] = (2, 4),
) -> Regularizer:
    """The regularizer of ``kind`` ∈ {ssr, eq_vae, scale, none} (recipe section ``[regularizer]``).

    lambda_mae / lambda_lpips / kl_weight: the reconstruction loss (``[loss]``), used by every kind.
    SSR only: the dynamics (:func:`build_dynamics`: basis, grid — W·H must equal latent_channels, else
    ValueError naming ``regularizer.grid`` —, a_normalization, delta_source with delta_init or the blur gap
    delta_tau at image_size, discretization, learn_a — learn_delta follows it unless given —, seed for the random
    A), alpha, the λ's of eq. 23, mean_centering, latent_loss (:func:`latent_mse`), latent_space, tau_max,
    delta_tau. EQ-VAE: eq_probability.
    FT-SE: se_weight, se_factors.
    """
    recon = dict(lambda_mae=lambda_mae, lambda_lpips=lambda_lpips, kl_weight=kl_weight, lpips_fn=lpips_fn)
    if kind == "none":
        return NoneRegularizer(**recon)
    if kind == "eq_vae":
        return EQVAERegularizer(p_equivariance=eq_probability, **recon)
    if kind == "scale":
        return ScaleRegularizer(se_weight=se_weight, factors=se_factors, **recon)
    if kind == "ssr":
        dynamics = build_dynamics(basis, latent_channels, grid=grid, orthonormal=orthonormal,
                                  a_normalization=a_normalization, delta_source=delta_source, delta_init=delta_init,
                                  delta_tau=delta_tau, image_size=image_size, discretization=discretization,
                                  learn_a=learn_a, learn_delta=learn_delta, seed=seed)
        return SSRRegularizer(dynamics, alpha=alpha, lambda_latent=lambda_latent, lambda_image=lambda_image,
                              lambda_mae_ssr=lambda_mae_ssr, lambda_lpips_ssr=lambda_lpips_ssr,
                              mean_centering=mean_centering, latent_loss=latent_loss, latent_space=latent_space,
                              tau_max=tau_max, delta_tau=delta_tau, **recon)
    raise ValueError(f"regularizer.kind must be one of {', '.join(KINDS)}, got {kind!r}")


def save_dynamics(dynamics: "SSRDynamics", path: str | Path) -> Path:
    """Write the (learned) continuous A, its discretization Ā and Δ to a safetensors file, atomically."""
    return save_weights({"A": dynamics.a_continuous().detach(), "A_bar": dynamics.a_bar().detach(),
                         "delta": dynamics.delta.detach().reshape(1),
                         "delta_init": dynamics.delta_start.detach().reshape(1)}, path)


def load_dynamics(path: str | Path) -> SSRDynamics:
    """The dynamics :func:`save_dynamics` wrote, as a frozen :class:`SSRDynamics` (A, Δ and the discretization
    that reproduces the stored Ā; A's sparsity pattern is its nonzero entries). WeightsError for a file that is
    not such a record."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a damaged or foreign file
        raise WeightsError(f"{path}: not a readable SSR dynamics file ({exc}); delete it or re-run `ssr finetune`") from exc
    if not {"A", "A_bar", "delta"} <= set(state) <= {"A", "A_bar", "delta", "delta_init"} or state["A"].ndim != 2 or state["A"].shape != state["A_bar"].shape:
        raise WeightsError(f"{path}: expected the tensors A (C, C), A_bar (C, C) and delta (1,) that `ssr finetune` "
                           f"writes, found {sorted(state)}; delete it or re-run `ssr finetune`")
    a, a_bar, delta = state["A"].double(), state["A_bar"].double(), float(state["delta"].reshape(-1)[0])
    if not delta > 0:
        raise WeightsError(f"{path}: Δ = {delta} is not positive; delete it or re-run `ssr finetune`")
    for discretization in ("zoh", "euler"):
        dynamics = SSRDynamics(a, delta_init=delta, discretization=discretization, learn_a=False)
        if torch.allclose(dynamics.a_bar(), a_bar, rtol=1e-5, atol=1e-6):
            return dynamics
    raise WeightsError(f"{path}: the stored A_bar is neither exp(ΔA) nor I + ΔA of the stored A and Δ; "
                       "delete it or re-run `ssr finetune`")
