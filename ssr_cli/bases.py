"""2D bases, their A matrices, discretization and the channel frequency order (pure numpy/scipy, float64).

Closed forms only; their checks against independent computations live in :mod:`ssr_cli.bases_verify`.

Conventions (method.md §1, paper appendix A.4):

* A W×H grid of 2D basis functions φ_(w,h)(x, y) = p_w(u(x)) · p_h(v(y)) on the physical domain
  [0, W] × [0, H]; channel n (0-based) ↔ (w, h) = (n mod W, n div W), i.e. n = w + W·h (paper eq. 41).
* Each 1D family lives on a canonical variable u = s·x + o:

  ========== ===================== ==================== ==================== =====================
  basis      p_k(u)                u(x) on [0, L]       weight ω(u)          domain of u
  ========== ===================== ==================== ==================== =====================
  fourier    exp(2πi·k·u)          x / L                1                    [0, 1] (periodic)
  chebyshev  T_k(u)                2x/L − 1             1/√(1−u²)            [−1, 1]
  legendre   P_k(u)                2x/L − 1             1                    [−1, 1]
  hermite    H_k(u) (physicists')  4x/L − 2 (α = ½)     exp(−u²)             ℝ (image: [−2, 2])
  ========== ===================== ==================== ==================== =====================

* Inner products are taken on the physical domain with the weight: ⟨f, g⟩_ω = ∫∫ f·conj(g)·ω dx dy.
  The paper's Hermite weight carries an extra 1/√π (eq. 70) that its own Grams (eq. 74) then ignore;
  we follow the Grams (weight exp(−u²)); the default max|A| = 1 normalization removes the constant anyway.
* The paper's A ("paper-literal"), row k, column n: A[k, n] = ½·⟨∇²φ_n, φ_k⟩_ω (eq. 16/40). With the
  1D Grams P[j,k] = ⟨p_j, p_k⟩_ω and D[j,k] = ⟨p_j, p_k''⟩_ω on the canonical variable this is
  A = ½·[(H/W)·(P_H ⊗ D_W) + (W/H)·(D_H ⊗ P_W)] (eq. 55/60/71; ⊗ = Kronecker product in the channel
  order n = w + W·h).
* The paper's bases are orthogonal, not orthonormal, so the paper-literal A is not the generator of any
  coefficient vector. With N = diag(‖φ_n‖²_ω), the *orthonormal* coefficients b_n = ⟨I, φ_n⟩_ω / ‖φ_n‖
  of an image in the span evolve under the heat flow ∂_τ I = ½∇²I (τ = Gaussian variance in physical
  units²) exactly as db/dτ = A_orth·b with A_orth = N^(−½)·A·N^(−½) (``orthonormal=True``).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.polynomial import chebyshev as _cheb
from numpy.polynomial import hermite as _herm
from numpy.polynomial import legendre as _leg
from scipy import linalg as _sla
from scipy import special as _special

from ssr_cli.errors import UserValueError

BASES = ("fourier", "chebyshev", "legendre", "hermite")
DISCRETIZATIONS = ("euler", "zoh")
RANDOM_A_STREAM = 0x5A4D
"""Label in the seed of the random A, so it never shares a random stream with anything else drawn from run.seed."""
HERMITE_ALPHA = 0.5
"""Paper eq. 68: the Hermite variable is u = (2x − L)/(α·L); α = ½ maps the image [0, L] to u ∈ [−2, 2]."""


# --------------------------------------------------------------------------------------------------
# Grid and channel indexing
# --------------------------------------------------------------------------------------------------
def check_basis(basis: str) -> str:
    """Return the canonical basis name; ValueError naming the choices for anything else."""
    name = str(basis).strip().lower()
    if name not in BASES:
        raise UserValueError(f"unknown basis {basis!r}: choose one of {', '.join(BASES)}")
    return name


def parse_grid(size: str | int) -> tuple[int, int]:
    """Grid size → (W, H): ``8`` or ``"8"`` → (8, 8), ``"8x4"`` → (8, 4) (W = 8 wide, H = 4 high).

    Raises ValueError with a clear message for zero, negative or malformed sizes."""
    if isinstance(size, bool):
        raise UserValueError(f"grid size must be an integer or 'WxH', got {size!r}")
    if isinstance(size, (int, np.integer)):
        parts = [str(int(size))] * 2
    else:
        text = str(size).strip().lower().replace("×", "x")
        parts = [p.strip() for p in text.split("x")]
        if len(parts) == 1:
            parts = parts * 2
    if len(parts) != 2 or not all(p.lstrip("+-").isdigit() for p in parts):
        raise UserValueError(f"grid size must be an integer or 'WxH' such as '8' or '8x4', got {size!r}")
    w, h = int(parts[0]), int(parts[1])
    if w < 1 or h < 1:
        raise UserValueError(f"grid size must be at least 1x1 (W, H >= 1), got {size!r}")
    return w, h


def grid_for_channels(channels: int, grid: str | int | None = None) -> tuple[int, int]:
    """(W, H) with W·H = ``channels``: the parsed ``grid`` when given (checked), else the most square
    factorisation with W >= H (16 → 4×4, 32 → 8×4)."""
    if channels < 1:
        raise ValueError(f"number of channels must be >= 1, got {channels}")
    if grid is not None:
        w, h = parse_grid(grid)
        if w * h != channels:
            raise UserValueError(f"grid {w}x{h} has {w * h} basis functions but the latent has {channels} channels")
        return w, h
    h = max(d for d in range(1, math.isqrt(channels) + 1) if channels % d == 0)
    return channels // h, h


def channel_to_wh(n: int, W: int) -> tuple[int, int]:
    """Channel index n (0-based) → (w, h) = (n mod W, n div W) (paper eq. 41, 0-based)."""
    if n < 0 or W < 1:
        raise ValueError(f"channel index must be >= 0 and W >= 1, got n={n}, W={W}")
    return n % W, n // W


def wh_to_channel(w: int, h: int, W: int) -> int:
    """(w, h) → channel index n = w + W·h."""
    if not 0 <= w < W or h < 0:
        raise ValueError(f"need 0 <= w < W and h >= 0, got w={w}, h={h}, W={W}")
    return w + W * h


def frequency_groups(W: int, H: int) -> list[list[int]]:
    """Channels grouped by w + h ascending (anti-diagonals, appendix A.6 eq. 77/78); within a group
    channels ascend (equivalently h ascends, w descends), as in the paper's listing."""
    groups: list[list[int]] = [[] for _ in range(W + H - 1)]
    for n in range(W * H):
        w, h = channel_to_wh(n, W)
        groups[w + h].append(n)
    return groups


def frequency_order(W: int, H: int) -> list[int]:
    """All W·H channel indices from low to high frequency (the concatenation of ``frequency_groups``)."""
    return [n for group in frequency_groups(W, H) for n in group]


# --------------------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------------------
def domain_map(basis: str, length: float) -> tuple[float, float]:
    """(s, o) of the affine map u = s·x + o from the physical interval [0, length] to the canonical variable."""
    basis = check_basis(basis)
    if basis == "fourier":
        return 1.0 / length, 0.0
    if basis in ("chebyshev", "legendre"):
        return 2.0 / length, -1.0
    return 2.0 / (HERMITE_ALPHA * length), -1.0 / HERMITE_ALPHA


def gram_1d(basis: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form 1D Grams on the canonical variable, each (n, n) float64:
    P[j, k] = ⟨p_j, p_k⟩_ω (diagonal) and D[j, k] = ⟨p_j, p_k''⟩_ω (strictly upper triangular for the
    polynomials, diagonal for Fourier). Formulas: method.md §1 / paper eqs. 58-59, 65-66, 74-75."""
    basis = check_basis(basis)
    P = np.zeros((n, n))
    D = np.zeros((n, n))
    for k in range(n):
        if basis == "fourier":
            P[k, k] = 1.0
            D[k, k] = -4.0 * math.pi**2 * k**2
        elif basis == "chebyshev":
            P[k, k] = math.pi if k == 0 else math.pi / 2
            for j in range(k % 2, k - 1, 2):
                D[j, k] = math.pi / 2 * k * (k * k - j * j)
        elif basis == "legendre":
            P[k, k] = 2.0 / (2 * k + 1)
            for j in range(k % 2, k - 1, 2):
                D[j, k] = k * (k + 1) - j * (j + 1)
        else:  # hermite (physicists'), weight exp(-u^2)
            P[k, k] = math.sqrt(math.pi) * 2.0**k * math.factorial(k)
            if k >= 2:
                D[k - 2, k] = 4.0 * k * (k - 1) * math.sqrt(math.pi) * 2.0 ** (k - 2) * math.factorial(k - 2)
    return P, D


def image_domain(W: int, H: int, aspect: float = 1.0) -> tuple[float, float]:
    """Physical side lengths (L_x, L_y) of the basis domain for an image of width/height ratio ``aspect``.

    The domain has the image's shape, whatever the grid (the grid only indexes the basis functions): its
    longer side is max(W, H) units and the other follows the aspect ratio. A square image gives a square
    domain (an 8×4 grid on it: 8×8 units), so a W×W grid keeps today's [0, W]² domain."""
    if not aspect > 0 or W < 1 or H < 1:
        raise ValueError(f"need W, H >= 1 and an aspect ratio > 0, got W={W}, H={H}, aspect={aspect}")
    side = float(max(W, H))
    return (side, side / aspect) if aspect >= 1 else (side * aspect, side)


def _domain(W: int, H: int, domain: tuple[float, float] | None) -> tuple[float, float]:
    """(L_x, L_y): ``domain`` when given (checked), else the grid's own [0, W]×[0, H]."""
    if domain is None:
        return float(W), float(H)
    lx, ly = (float(v) for v in domain)
    if not (lx > 0 and ly > 0):
        raise ValueError(f"domain side lengths must be > 0, got {domain}")
    return lx, ly


def norms_sq(basis: str, W: int, H: int, *, domain: tuple[float, float] | None = None) -> np.ndarray:
    """(C,) squared norms ‖φ_n‖²_ω of the paper's 2D basis functions on the physical domain [0,L_x]×[0,L_y]
    (``domain``; default the grid's [0,W]×[0,H])."""
    basis = check_basis(basis)
    lx, ly = _domain(W, H, domain)
    sx, _ = domain_map(basis, lx)
    sy, _ = domain_map(basis, ly)
    Pw = np.diag(gram_1d(basis, W)[0])
    Ph = np.diag(gram_1d(basis, H)[0])
    # dx dy = du dv / (sx sy)
    return np.kron(Ph, Pw) / (sx * sy)


def a_matrix(basis: str, W: int, H: int, *, normalize: bool = True, orthonormal: bool = False,
             domain: tuple[float, float] | None = None) -> np.ndarray:
    """The continuous-time A, (C, C) float64 with C = W·H, rows/columns in channel order n = w + W·h.

    A[k, n] = ½·⟨∇²φ_n, φ_k⟩_ω (paper eq. 40); ``orthonormal=True`` gives ½·⟨∇²ψ_n, ψ_k⟩_ω for the
    normalized basis ψ_n = φ_n/‖φ_n‖, the exact generator of orthonormal coefficients (time = Gaussian
    variance in physical units², the image spanning the domain). ``domain`` = (L_x, L_y): the physical
    domain [0, L_x]×[0, L_y] the image spans (:func:`image_domain`); default the grid's [0, W]×[0, H].
    ``normalize=True`` divides by max|A| so that max|A| = 1 (the paper's initialisation); an all-zero A
    (e.g. a 1×1 grid) is returned unchanged."""
    basis = check_basis(basis)
    if W < 1 or H < 1:
        raise ValueError(f"grid must be at least 1x1, got W={W}, H={H}")
    lx, ly = _domain(W, H, domain)
    Pw, Dw = gram_1d(basis, W)
    Ph, Dh = gram_1d(basis, H)
    sx, _ = domain_map(basis, lx)
    sy, _ = domain_map(basis, ly)
    # ∂²/∂x² = sx²·∂²/∂u², dx dy = du dv/(sx sy): the x-term carries sx/sy (= L_y/L_x for every basis here).
    A = 0.5 * ((sx / sy) * np.kron(Ph, Dw) + (sy / sx) * np.kron(Dh, Pw))
    if orthonormal:
        inv_norm = 1.0 / np.sqrt(norms_sq(basis, W, H, domain=(lx, ly)))
        A = inv_norm[:, None] * A * inv_norm[None, :]
    if normalize:
        peak = np.max(np.abs(A))
        if peak > 0:
            A = A / peak
    return A


def delta_from_blur(basis: str, W: int, H: int, blur_gap: float, image_size: int, *,
                    domain: tuple[float, float] | None = None, normalized: bool = True) -> float:
    """The step Δ that makes exp(Δ·A_n) the exact coefficient dynamics of a Gaussian blur gap (issue 13, item 4).

    ``blur_gap`` is the blur variance Δ_I in pixels² at the training resolution ``image_size`` (pixels across
    the image's width); the image spans the basis domain [0, L_x]×[0, L_y] (``domain``, default the grid's
    [0, W]×[0, H]), so one pixel is L_x/image_size domain units and the gap is Δ_I·(L_x/image_size)² units².
    A_n = A/max|A| with A the orthonormal-coefficient generator (time = variance), hence
    Δ = Δ_I·(L_x/image_size)²·max|A|; ``normalized=False`` (A used unnormalised) gives Δ_I·(L_x/image_size)².
    Exact for the periodic Fourier basis; for the others it is the same physical time, while their truncated
    dynamics are only approximate."""
    if blur_gap < 0 or image_size < 1:
        raise ValueError(f"blur gap must be ≥ 0 and image size ≥ 1, got {blur_gap} and {image_size}")
    lx, ly = _domain(W, H, domain)
    physical = blur_gap * (lx / image_size) ** 2
    if not normalized:
        return float(physical)
    A = a_matrix(basis, W, H, normalize=False, orthonormal=True, domain=(lx, ly))
    return float(physical * np.max(np.abs(A)))


def random_a_matrix(channels: int, seed: int, *, normalize: bool = True) -> np.ndarray:
    """A seeded random A for the random-A ablation (paper Table 4), (C, C) float64.

    A = −M·Mᵀ with M a C×C matrix of standard normal entries (numpy's PCG64 seeded with the SeedSequence of
    (``seed``, C, a label of this use), so the run seed gives one A per channel count and no other stream): dense,
    symmetric and negative semi-definite, like the heat-flow generators of the real bases (their spectra are
    ≤ 0), so exp(Δ·A) is a contraction for every Δ ≥ 0 and the ablation tests structure, not stability.
    ``normalize`` divides by max|A| (max|A| = 1, the other bases' initialisation)."""
    if channels < 1:
        raise ValueError(f"number of channels must be >= 1, got {channels}")
    m = np.random.default_rng([int(seed) % 2**64, channels, RANDOM_A_STREAM]).standard_normal((channels, channels))
    A = -(m @ m.T)
    A = 0.5 * (A + A.T)  # exactly symmetric
    return A / np.max(np.abs(A)) if normalize else A


def discretize(A: np.ndarray, delta: float, method: str = "zoh") -> np.ndarray:
    """Ā for step Δ: euler → I + Δ·A, zoh → exp(Δ·A) (matrix exponential). A: (C, C); returns (C, C) float64."""
    method = str(method).strip().lower()
    if method not in DISCRETIZATIONS:
        raise UserValueError(f"unknown discretization {method!r}: choose one of {', '.join(DISCRETIZATIONS)}")
    if not np.isfinite(delta) or delta < 0:
        raise ValueError(f"delta must be a finite number >= 0, got {delta}")
    A = np.asarray(A, dtype=np.float64)
    if method == "euler":
        return np.eye(A.shape[0]) + delta * A
    return _sla.expm(delta * A)


def nonzero_mask(A: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """Boolean (C, C) mask of the structural nonzeros |A| > tol (the entries ``finetune`` may learn)."""
    return np.abs(np.asarray(A)) > tol


def structure(A: np.ndarray, tol: float = 0.0) -> str:
    """'zero', 'diagonal', 'strictly upper triangular', 'upper triangular', 'lower triangular' or 'dense'."""
    mask = nonzero_mask(A, tol)
    if not mask.any():
        return "zero"
    if not (mask & ~np.eye(mask.shape[0], dtype=bool)).any():
        return "diagonal"
    if not np.tril(mask).any():
        return "strictly upper triangular"
    if not np.tril(mask, -1).any():
        return "upper triangular"
    if not np.triu(mask, 1).any():
        return "lower triangular"
    return "dense"


def describe(A: np.ndarray, A_bar: np.ndarray | None = None) -> dict:
    """Summary numbers of A (and Ā): shape, nonzeros, structure, value range, and for Ā its spectral
    radius and 2-norm (largest singular value)."""
    A = np.asarray(A, dtype=np.float64)
    info = {
        "shape": tuple(A.shape),
        "nonzeros": int(nonzero_mask(A).sum()),
        "entries": int(A.size),
        "structure": structure(A),
        "min": float(A.min()),
        "max": float(A.max()),
        "max_abs": float(np.abs(A).max()),
        "min_abs_nonzero": float(np.abs(A[A != 0]).min()) if (A != 0).any() else 0.0,
    }
    if A_bar is not None:
        info["A_bar_spectral_radius"] = float(np.max(np.abs(np.linalg.eigvals(A_bar))))
        info["A_bar_norm2"] = float(np.linalg.norm(A_bar, 2))
    return info


# --------------------------------------------------------------------------------------------------
# Sampling and projecting images
# --------------------------------------------------------------------------------------------------
def _values_1d(basis: str, n: int, u: np.ndarray) -> np.ndarray:
    """(n, len(u)) values p_k(u) of the canonical 1D functions (complex for Fourier), any real u."""
    u = np.asarray(u, dtype=np.float64)
    if basis == "fourier":
        return np.exp(2j * np.pi * np.arange(n)[:, None] * u[None, :])
    vander = {"chebyshev": _cheb.chebvander, "legendre": _leg.legvander, "hermite": _herm.hermvander}[basis]
    return vander(u, n - 1).T


def basis_functions(basis: str, W: int, H: int, height_px: int, width_px: int, *,
                    orthonormal: bool = False) -> np.ndarray:
    """Each 2D basis function sampled at pixel centres: (C, height_px, width_px), channel order n = w + W·h.

    Pixel column i ↦ x = (i + ½)·W/width_px ∈ [0, W], row j ↦ y = (j + ½)·H/height_px, then the basis's
    canonical map (Hermite: the image window is u ∈ [−2, 2]). Float64, complex128 for Fourier.
    ``orthonormal=True`` divides by ‖φ_n‖_ω."""
    basis = check_basis(basis)
    sx, ox = domain_map(basis, W)
    sy, oy = domain_map(basis, H)
    x = (np.arange(width_px) + 0.5) * W / width_px
    y = (np.arange(height_px) + 0.5) * H / height_px
    vx = _values_1d(basis, W, sx * x + ox)  # (W, width_px)
    vy = _values_1d(basis, H, sy * y + oy)  # (H, height_px)
    out = np.einsum("hj,wi->hwji", vy, vx).reshape(W * H, height_px, width_px)
    if orthonormal:
        out = out / np.sqrt(norms_sq(basis, W, H))[:, None, None]
    return out if basis == "fourier" else out.real


def _cell_integrals_1d(basis: str, n: int, length: float, edges_x: np.ndarray) -> np.ndarray:
    """(n, len(edges_x) − 1): ∫ over each cell [e_i, e_{i+1}] of conj(p_k(u(x)))·ω(u(x)) dx, in closed form
    through antiderivatives (exact for a piecewise-constant image, including Chebyshev's endpoint singularity)."""
    s, o = domain_map(basis, length)
    u = s * np.asarray(edges_x, dtype=np.float64) + o
    k = np.arange(n)[:, None]
    if basis == "fourier":
        # ∫ exp(-2πik u) du = exp(-2πik u)/(-2πik); k = 0: u
        with np.errstate(divide="ignore", invalid="ignore"):
            F = np.where(k == 0, u[None, :].astype(complex), np.exp(-2j * np.pi * k * u) / (-2j * np.pi * k))
    elif basis == "chebyshev":
        if u.min() < -1 - 1e-12 or u.max() > 1 + 1e-12:
            raise ValueError("Chebyshev cells must lie inside the domain [-1, 1]")
        theta = np.arccos(np.clip(u, -1.0, 1.0))
        # u = cos θ: ∫ T_k(u)/√(1−u²) du = −∫ cos(kθ) dθ = −sin(kθ)/k; k = 0: −θ
        with np.errstate(divide="ignore", invalid="ignore"):
            F = np.where(k == 0, -theta[None, :], -np.sin(k * theta) / np.maximum(k, 1))
    elif basis == "legendre":
        # ∫ P_k = (P_{k+1} − P_{k−1})/(2k+1); k = 0: u
        V = _leg.legvander(u, n).T  # (n+1, E)
        F = np.empty((n, u.size))
        F[0] = u
        for kk in range(1, n):
            F[kk] = (V[kk + 1] - V[kk - 1]) / (2 * kk + 1)
    else:
        # d/du[e^{−u²} H_{k−1}] = −e^{−u²} H_k; k = 0: (√π/2)·erf(u)
        V = _herm.hermvander(u, max(n - 2, 0)).T
        F = np.empty((n, u.size))
        F[0] = 0.5 * math.sqrt(math.pi) * _special.erf(u)
        for kk in range(1, n):
            F[kk] = -np.exp(-u * u) * V[kk - 1]
    return np.diff(F, axis=1) / s  # dx = du / s


def project(image_2d: np.ndarray, basis: str, W: int, H: int, *, orthonormal: bool = False,
            domain: tuple[float, float] | None = None) -> np.ndarray:
    """Basis coefficients of a grey image, (C,) (complex128 for Fourier, float64 otherwise).

    The image (height_px, width_px) is read as piecewise constant on pixel cells covering the physical
    window [0, W] × [0, H] and as zero outside it (this matters only for Hermite, whose domain is ℝ). The
    coefficient is the exact weighted inner product c_n = ⟨I, φ_n⟩_ω of that function, computed from closed-
    form antiderivatives (no quadrature error, Chebyshev's endpoint singularity included). ``orthonormal``
    returns b_n = c_n/‖φ_n‖_ω (coefficients in the orthonormal basis). For Fourier the real part is the
    cosine projection; real and imaginary parts obey the same diagonal dynamics. ``domain`` = (L_x, L_y): the
    window the image covers, [0, L_x]×[0, L_y] (default the grid's [0, W]×[0, H]; see :func:`a_matrix`)."""
    basis = check_basis(basis)
    img = np.asarray(image_2d, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"project expects a 2D grey image (height, width), got shape {img.shape}")
    lx, ly = _domain(W, H, domain)
    return _project_cells(img, basis, W, H,
                          np.linspace(0.0, lx, img.shape[1] + 1), np.linspace(0.0, ly, img.shape[0] + 1),
                          orthonormal=orthonormal, domain=(lx, ly))


def _project_cells(img: np.ndarray, basis: str, W: int, H: int, edges_x: np.ndarray, edges_y: np.ndarray,
                   *, orthonormal: bool, domain: tuple[float, float] | None = None) -> np.ndarray:
    lx, ly = _domain(W, H, domain)
    Qx = _cell_integrals_1d(basis, W, lx, edges_x)  # (W, width)
    Qy = _cell_integrals_1d(basis, H, ly, edges_y)  # (H, height)
    c = (Qy @ img @ Qx.T).reshape(-1)  # (H, W) → n = w + W·h
    if orthonormal:
        c = c / np.sqrt(norms_sq(basis, W, H, domain=(lx, ly)))
    return c if basis == "fourier" else c.real
