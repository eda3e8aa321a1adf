"""Checks of the closed forms in :mod:`ssr_cli.bases` against independent computations (``ssr derive-a --verify``).

(a) :func:`verify_quadrature`: the A matrices against direct 2D Gauss quadrature (:func:`a_matrix_quadrature`).
(b) :func:`verify_dynamics`: how well Ā = exp(Δ·A) predicts the basis coefficients of a blurred image, in the
span (:func:`heat_propagator_in_span`) and on a photograph (:func:`builtin_photo`). Pure numpy/scipy, float64.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from numpy.polynomial import chebyshev as _cheb
from numpy.polynomial import hermite as _herm
from numpy.polynomial import legendre as _leg
from scipy import ndimage as _ndi

from ssr_cli.bases import (
    BASES,
    _project_cells,
    _values_1d,
    a_matrix,
    check_basis,
    discretize,
    domain_map,
    gram_1d,
    norms_sq,
    project,
)


def _gauss_rule(basis: str, length: float, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Physical nodes x and weights q (weight function ω included) of a Gauss rule on the basis's domain."""
    s, o = domain_map(basis, length)
    if basis == "fourier":
        u, q = _leg.leggauss(n_nodes)
        u = (u + 1.0) / 2.0
        q = q / 2.0
    elif basis == "chebyshev":
        u, q = _cheb.chebgauss(n_nodes)
    elif basis == "legendre":
        u, q = _leg.leggauss(n_nodes)
    else:
        u, q = _herm.hermgauss(n_nodes)
    return (u - o) / s, q / s


def _quadrature_1d(basis: str, n: int, length: float, n_nodes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values V[k, i] = p_k(u(x_i)) and physical second derivatives V2[k, i] = d²/dx² p_k(u(x_i)) at Gauss
    nodes, with weights q: polynomials differentiated by numpy.polynomial, not by the closed-form Grams."""
    x, q = _gauss_rule(basis, length, n_nodes)
    s, o = domain_map(basis, length)
    u = s * x + o
    if basis == "fourier":
        V = np.exp(2j * np.pi * np.arange(n)[:, None] * u[None, :])
        V2 = (2j * np.pi * np.arange(n)[:, None] * s) ** 2 * V
        return V, V2, q
    cls = {"chebyshev": _cheb.Chebyshev, "legendre": _leg.Legendre, "hermite": _herm.Hermite}[basis]
    V = np.stack([cls.basis(k)(u) for k in range(n)])
    V2 = np.stack([cls.basis(k).deriv(2)(u) * s**2 for k in range(n)])
    return V, V2, q


def a_matrix_quadrature(basis: str, W: int, H: int, *, orthonormal: bool = False,
                        n_nodes: int | None = None) -> np.ndarray:
    """A (raw, not normalized) by direct 2D Gauss quadrature of ½·∇²φ_n·conj(φ_k)·ω over the physical
    domain; independent of ``gram_1d`` and of the Kronecker assembly. Norms, for ``orthonormal``, are
    integrated the same way. (C, C) float64."""
    basis = check_basis(basis)
    n_nodes = n_nodes or (4 * max(W, H) + 24 if basis == "fourier" else max(W, H) + 8)
    Vx, V2x, qx = _quadrature_1d(basis, W, W, n_nodes)
    Vy, V2y, qy = _quadrature_1d(basis, H, H, n_nodes)
    # full tensor grid: Φ[n, a, b] and ∇²Φ[n, a, b], n = w + W·h
    Phi = np.einsum("hb,wa->hwab", Vy, Vx).reshape(W * H, -1)
    Lap = (np.einsum("hb,wa->hwab", Vy, V2x) + np.einsum("hb,wa->hwab", V2y, Vx)).reshape(W * H, -1)
    weights = np.outer(qx, qy).reshape(-1)
    A = 0.5 * (np.conj(Phi) * weights) @ Lap.T  # A[k, n] = ½ Σ q conj(φ_k) ∇²φ_n
    if orthonormal:
        nsq = np.real(np.sum(np.abs(Phi) ** 2 * weights, axis=1))
        A = A / np.sqrt(np.outer(nsq, nsq))
    if np.max(np.abs(A.imag)) > 1e-9 * max(1.0, np.max(np.abs(A.real))):
        raise ArithmeticError("quadrature A has a non-negligible imaginary part")
    return np.ascontiguousarray(A.real)


def _compare(A_ref: np.ndarray, A_test: np.ndarray) -> dict:
    scale = float(np.max(np.abs(A_ref)))
    denom = scale if scale > 0 else 1.0
    diff = np.abs(A_test - A_ref)
    nz = A_ref != 0
    rel_nz = float(np.max(diff[nz] / np.abs(A_ref[nz]))) if nz.any() else 0.0
    return {
        "max_abs_A": scale,
        "max_err_rel_to_max": float(diff.max() / denom),
        "max_rel_err_nonzero": rel_nz,
        "max_abs_on_zeros_rel": float(np.max(np.abs(A_test[~nz])) / denom) if (~nz).any() else 0.0,
    }


def verify_quadrature(W: int, H: int, bases: Iterable[str] = BASES) -> dict:
    """Closed forms vs independent 2D Gauss quadrature for each basis, paper-literal and orthonormal.

    Returns {basis: {"paper": {...}, "orthonormal": {...}}} where each inner dict has max_abs_A,
    max_err_rel_to_max (max |A_quad − A| / max|A|), max_rel_err_nonzero (entry-wise relative error on the
    closed form's nonzeros) and max_abs_on_zeros_rel (quadrature mass on the closed form's zeros)."""
    out = {}
    for basis in bases:
        basis = check_basis(basis)
        out[basis] = {
            variant: _compare(a_matrix(basis, W, H, normalize=False, orthonormal=ortho),
                              a_matrix_quadrature(basis, W, H, orthonormal=ortho))
            for variant, ortho in (("paper", False), ("orthonormal", True))
        }
    return out


def heat_propagator_in_span(basis: str, W: int, H: int, tau: float, *, n_nodes: int = 80) -> np.ndarray:
    """Exact (C, C) propagator of orthonormal coefficients under the heat flow on the basis's natural domain
    (ℝ² for the polynomials, which maps the span into itself; the torus for Fourier) over Gaussian variance
    ``tau`` (physical units²): M[k, n] = ⟨G_τ * ψ_n, ψ_k⟩_ω, with G_τ * f (x) = E f(x + √τ Z) evaluated by
    Gauss–Hermite quadrature in Z and the inner product by the basis's Gauss rule. Independent of A."""
    basis = check_basis(basis)
    z, g = _herm.hermgauss(n_nodes)
    shifts = math.sqrt(2.0 * tau) * z
    g = g / math.sqrt(math.pi)  # E f(√τ Z) = Σ g f(√(2τ) z) / √π

    def prop_1d(L: int) -> np.ndarray:
        x, q = _gauss_rule(basis, L, max(4 * L + 24, 64) if basis == "fourier" else L + 8)
        s, o = domain_map(basis, L)
        V = _values_1d(basis, L, s * x + o)  # (L, nx)
        Vb = np.stack([_values_1d(basis, L, s * (x + d) + o) for d in shifts], axis=0)  # (nz, L, nx)
        blurred = np.einsum("a,akx->kx", g, Vb)
        M = (np.conj(V) * q) @ blurred.T  # ⟨G ψ_n, ψ_k⟩ before normalization
        nsq = np.diag(gram_1d(basis, L)[0]) / s
        return M / np.sqrt(np.outer(nsq, nsq))

    M = np.kron(prop_1d(H), prop_1d(W))
    return M if basis == "fourier" else M.real


def builtin_photo() -> np.ndarray:
    """The grey 'camera' photograph bundled with scikit-image (512×512), float64 in [−1, 1]."""
    from skimage import data

    return data.camera().astype(np.float64) / 127.5 - 1.0


def _blur(img: np.ndarray, tau_px: float, mode: str) -> np.ndarray:
    """Gaussian blur with variance ``tau_px`` (pixels²); mode 'reflect' = zero-flux (Neumann) borders."""
    return _ndi.gaussian_filter(img, sigma=math.sqrt(tau_px), mode=mode, truncate=8.0) if tau_px > 0 else img


def verify_dynamics(W: int, H: int, *, taus: Iterable[float] = (1.0, 4.0, 10.0), pixels_per_unit: int = 8,
                    image: np.ndarray | None = None, bases: Iterable[str] = BASES) -> dict:
    """How well Ā = exp(Δ·A) predicts the basis coefficients of a blurred image.

    (1) ``in_span``: for functions in the span, exp(Δ·A) against the exact heat propagator
        (``heat_propagator_in_span``), relative 2-norm error of the propagators, per τ.
    (2) ``photo``: a grey photograph (default ``builtin_photo``) resized to (pixels_per_unit·H,
        pixels_per_unit·W) pixels and mean-centred, so one physical unit is ``pixels_per_unit`` pixels and a
        blur of τ pixels² is Δ = τ / pixels_per_unit² physical units². True coefficients: projection of the
        blurred image (reflect borders = the toolkit's blur). Predictions, all compared in orthonormal
        coordinates (= L²_ω error of the function): "orthonormal" exp(Δ·A_orth)·b0; "paper" exp(Δ·A)·c0
        with the paper-literal raw A on projections c = ⟨I, φ⟩; "paper_best_delta" the normalized paper A
        with the Δ that fits best (the paper learns Δ); "no_change" b0 itself, the baseline. Fourier is
        also reported with periodic borders ("fourier_periodic") and Hermite with the image zero-extended
        on ℝ ("hermite_on_R"), the boundary conditions under which their derivations hold.
    Errors are ‖pred − true‖ / ‖true‖ over all channels.
    """
    from skimage.transform import resize

    taus = [float(t) for t in taus]
    s_px = int(pixels_per_unit)
    if s_px < 1:
        raise ValueError(f"pixels_per_unit must be >= 1, got {pixels_per_unit}")
    photo = builtin_photo() if image is None else np.asarray(image, dtype=np.float64)
    img = resize(photo, (s_px * H, s_px * W), anti_aliasing=True, order=1, mode="reflect")
    img = img - img.mean()
    blurred = {mode: {t: _blur(img, t, mode) for t in taus} for mode in ("reflect", "wrap")}

    result: dict = {"taus_px2": taus, "pixels_per_unit": s_px, "image_px": (s_px * H, s_px * W),
                    "deltas": [t / s_px**2 for t in taus], "in_span": {}, "photo": {}}
    for basis in bases:
        basis = check_basis(basis)
        A_orth = a_matrix(basis, W, H, normalize=False, orthonormal=True)
        A_paper = a_matrix(basis, W, H, normalize=False)
        A_norm = a_matrix(basis, W, H, normalize=True)
        sqrt_n = np.sqrt(norms_sq(basis, W, H))
        deltas = [t / s_px**2 for t in taus]

        span = {"orthonormal": [], "paper": []}
        for d in deltas:
            M = heat_propagator_in_span(basis, W, H, d)
            Mc = sqrt_n[:, None] * M / sqrt_n[None, :]  # the same propagator acting on c = √N·b
            span["orthonormal"].append(_rel(discretize(A_orth, d), M))
            span["paper"].append(_rel(discretize(A_paper, d), Mc))
        result["in_span"][basis] = span

        cases = [(basis, "reflect")]
        if basis == "fourier":
            cases.append(("fourier_periodic", "wrap"))
        if basis == "hermite":
            cases.append(("hermite_on_R", "zero"))
        for label, mode in cases:
            rows = {"orthonormal": [], "paper": [], "paper_best_delta": [], "best_delta": [], "no_change": []}
            for t, d in zip(taus, deltas):
                if mode == "zero":
                    b0, bt = _project_zero_extended(img, t, basis, W, H, s_px)
                else:
                    b0 = project(img, basis, W, H, orthonormal=True)
                    bt = project(blurred[mode][t], basis, W, H, orthonormal=True)
                c0 = b0 * sqrt_n
                rows["orthonormal"].append(_rel_vec(discretize(A_orth, d) @ b0, bt))
                rows["paper"].append(_rel_vec((discretize(A_paper, d) @ c0) / sqrt_n, bt))
                best_err, best_d = _best_delta(A_norm, c0, sqrt_n, bt)
                rows["paper_best_delta"].append(best_err)
                rows["best_delta"].append(best_d)
                rows["no_change"].append(_rel_vec(b0, bt))
            result["photo"][label] = rows
    return result


def _project_zero_extended(img: np.ndarray, tau_px: float, basis: str, W: int, H: int, s_px: int):
    """Orthonormal coefficients of the zero-extended image and of its blur on ℝ² (canvas padded by 8σ)."""
    pad = int(math.ceil(8.0 * math.sqrt(tau_px))) + 1
    canvas = np.pad(img, pad)
    blurred = _ndi.gaussian_filter(canvas, sigma=math.sqrt(tau_px), mode="constant", truncate=8.0)
    ex = (np.arange(canvas.shape[1] + 1) - pad) / s_px
    ey = (np.arange(canvas.shape[0] + 1) - pad) / s_px
    b0 = _project_cells(canvas, basis, W, H, ex, ey, orthonormal=True)
    bt = _project_cells(blurred, basis, W, H, ex, ey, orthonormal=True)
    return b0, bt


def _rel(M_pred: np.ndarray, M_true: np.ndarray) -> float:
    return float(np.linalg.norm(M_pred - M_true, 2) / np.linalg.norm(M_true, 2))


def _rel_vec(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.linalg.norm(pred - true) / np.linalg.norm(true))


def _best_delta(A_norm: np.ndarray, c0: np.ndarray, sqrt_n: np.ndarray, bt: np.ndarray) -> tuple[float, float]:
    """Smallest error over Δ (log grid 1e−6…1e3, then a bounded refinement) of exp(Δ·A_norm)·c0 vs bt."""
    from scipy.optimize import minimize_scalar

    def err(log_d: float) -> float:
        return _rel_vec((discretize(A_norm, 10.0**log_d) @ c0) / sqrt_n, bt)

    grid = np.linspace(-6.0, 3.0, 37)
    errs = [err(g) for g in grid]
    i = int(np.argmin(errs))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = minimize_scalar(err, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    if res.fun < errs[i]:
        return float(res.fun), float(10.0**res.x)
    return float(errs[i]), float(10.0 ** grid[i])
