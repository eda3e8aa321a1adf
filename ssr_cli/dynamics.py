"""The SSR dynamics: the learnable state-space update Ā = δ(Δ, A) on latent channels (paper eq. 18–21), built
from a ``[regularizer]`` section (basis, grid, A normalisation, Δ source, discretization), saved and loaded.

The losses that use it (``ssr finetune``'s SSR term, the denoiser's feature term) live in
:mod:`ssr_cli.regularizers` and :mod:`ssr_cli.restoration`; the closed-form A matrices in :mod:`ssr_cli.bases`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssr_cli import bases
from ssr_cli.errors import UserValueError
from ssr_cli.models.weights import WeightsError, save_weights

DELTA_SOURCES = ("fixed", "blur_gap")
A_NORMALIZATIONS = ("max", "none")


# What regularizer.discretization = "auto" picks, per basis. ZOH, Ā = exp(ΔA), is the exact solution of
# dz/dτ = A·z over a step Δ for any A: the diagonal Fourier A, the nilpotent (strictly upper-triangular)
# polynomial A's, a dense random A. Euler, I + ΔA, is only its first-order truncation, never closer, and at
# C ≤ 64 channels the matrix exponential costs nothing, so no basis has a reason for Euler.
AUTO_DISCRETIZATION = {"fourier": "zoh", "chebyshev": "zoh", "legendre": "zoh", "hermite": "zoh", "random": "zoh"}


# ----------------------------------------------------------------------------------------------- grid


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
            raise UserValueError(f"regularizer.grid = {grid!r}: {exc}") from None
    else:
        w, h = (int(v) for v in grid)
    if w * h != latent_channels:
        valid = [f"{latent_channels // d}x{d}" for d in range(1, latent_channels + 1) if latent_channels % d == 0]
        raise UserValueError(
            f"regularizer.grid = '{w}x{h}' has W·H = {w * h} basis functions, but the tokenizer's latent has "
            f"{latent_channels} channels (one channel per basis function): set regularizer.grid to one of "
            f"{', '.join(valid)}, or leave it unset for the most square one "
            f"({'x'.join(map(str, most_square_grid(latent_channels)))})"
        )
    return w, h


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
            raise UserValueError(f"regularizer.discretization must be 'zoh' or 'euler', got {discretization!r}")
        if not delta_init > 0:
            raise UserValueError(f"regularizer.delta_init must be > 0, got {delta_init}")
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



def resolve_discretization(discretization: str, basis: str) -> str:
    """"zoh" / "euler" as given; "auto": :data:`AUTO_DISCRETIZATION` [basis] (ZOH for every basis)."""
    if discretization == "auto":
        return AUTO_DISCRETIZATION.get(basis, "zoh")
    if discretization not in ("zoh", "euler"):
        raise UserValueError(f"regularizer.discretization must be 'zoh', 'euler' or 'auto', got {discretization!r}")
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
        raise UserValueError(f"regularizer.a_normalization must be one of {', '.join(A_NORMALIZATIONS)}, "
                             f"got {a_normalization!r}")
    if delta_source not in DELTA_SOURCES:
        raise UserValueError(f"regularizer.delta_source must be one of {', '.join(DELTA_SOURCES)}, got "
                             f"{delta_source!r}")
    method = resolve_discretization(discretization, basis)
    common = dict(discretization=method, learn_a=learn_a, learn_delta=learn_delta)
    normalize = a_normalization == "max"
    width, height = resolve_grid(latent_channels, grid)  # checked for a random A too (the probe orders by it)
    if basis == "random":
        if delta_source != "fixed" or not normalize:
            raise UserValueError("regularizer.basis = 'random' has no physical time: it needs "
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
            raise UserValueError(f"regularizer.delta_source = 'blur_gap': the paper-literal {basis} A is not a "
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
