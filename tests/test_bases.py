"""ssr_cli.bases(_verify) against independent truths: quadrature, scipy.integrate.quad, the heat kernel, series."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.polynomial import chebyshev as C
from numpy.polynomial import hermite as Hm
from numpy.polynomial import legendre as L
from scipy import integrate, ndimage

from ssr_cli import bases, bases_verify

SIZES = [(w, h) for w in range(1, 9) for h in range(1, 9)] + [(2, 3), (4, 8)]


@pytest.mark.parametrize("basis", bases.BASES)
def test_closed_forms_match_2d_quadrature(basis):
    """Every grid 1×1 … 8×8 and the rectangles, paper-literal and orthonormal, to 1e-9 relative."""
    for W, H in SIZES:
        r = bases_verify.verify_quadrature(W, H, bases=[basis])[basis]
        for variant in ("paper", "orthonormal"):
            v = r[variant]
            assert v["max_err_rel_to_max"] < 1e-9, (basis, W, H, variant, v)
            assert v["max_rel_err_nonzero"] < 1e-9, (basis, W, H, variant, v)
            assert v["max_abs_on_zeros_rel"] < 1e-9, (basis, W, H, variant, v)


def _quad_1d(basis: str, j: int, k: int) -> tuple[float, float]:
    """(⟨p_j, p_k⟩_ω, ⟨p_j, p_k''⟩_ω) on the canonical variable by adaptive scipy quadrature."""
    if basis == "fourier":
        def f(u, d2):
            val = np.exp(2j * np.pi * (k - j) * u) * ((2j * np.pi * k) ** 2 if d2 else 1.0)
            return val
        out = []
        for d2 in (False, True):
            re = integrate.quad(lambda u: f(u, d2).real, 0, 1, limit=200)[0]
            im = integrate.quad(lambda u: f(u, d2).imag, 0, 1, limit=200)[0]
            assert abs(im) < 1e-9 * max(1.0, abs(re))
            out.append(re)
        return out[0], out[1]
    cls = {"chebyshev": C.Chebyshev, "legendre": L.Legendre, "hermite": Hm.Hermite}[basis]
    pj, pk, pk2 = cls.basis(j), cls.basis(k), cls.basis(k).deriv(2)
    if basis == "chebyshev":  # weight (1-u)^-1/2 (1+u)^-1/2 handled exactly by QUADPACK's 'alg' weight
        g = integrate.quad(lambda u: pj(u) * pk(u), -1, 1, weight="alg", wvar=(-0.5, -0.5))[0]
        d = integrate.quad(lambda u: pj(u) * pk2(u), -1, 1, weight="alg", wvar=(-0.5, -0.5))[0]
    elif basis == "legendre":
        g = integrate.quad(lambda u: pj(u) * pk(u), -1, 1)[0]
        d = integrate.quad(lambda u: pj(u) * pk2(u), -1, 1)[0]
    else:
        g = integrate.quad(lambda u: math.exp(-u * u) * pj(u) * pk(u), -np.inf, np.inf)[0]
        d = integrate.quad(lambda u: math.exp(-u * u) * pj(u) * pk2(u), -np.inf, np.inf)[0]
    return g, d


@pytest.mark.parametrize("basis", bases.BASES)
def test_1d_grams_match_scipy_quad(basis):
    n = 7
    P, D = bases.gram_1d(basis, n)
    for j in range(n):
        for k in range(n):
            g, d = _quad_1d(basis, j, k)
            assert P[j, k] == pytest.approx(g, rel=1e-9, abs=1e-9 * abs(P).max())
            assert D[j, k] == pytest.approx(d, rel=1e-9, abs=1e-9 * abs(D).max())


def test_fourier_diagonal_formula():
    W, H = 3, 5
    A = bases.a_matrix("fourier", W, H, normalize=False)
    expected = [0.5 * (-4 * W * H * math.pi**2) * ((n % W) ** 2 / W**2 + (n // W) ** 2 / H**2) for n in range(W * H)]
    np.testing.assert_allclose(np.diag(A), expected, rtol=1e-14)
    assert bases.structure(A) == "diagonal"
    # orthonormal: divide by ‖φ‖² = W·H (the heat-equation eigenvalues −2π²(w²/W² + h²/H²))
    np.testing.assert_allclose(np.diag(bases.a_matrix("fourier", W, H, normalize=False, orthonormal=True)),
                               np.array(expected) / (W * H), rtol=1e-14)


@pytest.mark.parametrize("basis", ["chebyshev", "legendre", "hermite"])
def test_polynomial_structure_and_normalization(basis):
    A = bases.a_matrix(basis, 4, 3)
    assert bases.structure(A) == "strictly upper triangular"
    assert np.max(np.abs(A)) == pytest.approx(1.0)
    raw = bases.a_matrix(basis, 4, 3, normalize=False)
    np.testing.assert_allclose(A, raw / np.max(np.abs(raw)), rtol=1e-15)
    np.testing.assert_array_equal(bases.nonzero_mask(A), raw != 0)
    # a 1×1 grid (and degree ≤ 1) has no second derivative: all-zero, normalization leaves it alone
    assert not bases.a_matrix(basis, 1, 1).any()
    assert not bases.a_matrix(basis, 2, 2).any()


def test_legendre_small_values():
    """Hand-computed 3×3 entry: A[(0,0),(2,0)] = ½·(H/W)·D[0,2]·P[0,0] = ½·1·6·2 = 6."""
    A = bases.a_matrix("legendre", 3, 3, normalize=False)
    assert A[0, 2] == pytest.approx(6.0)
    assert A[0, 6] == pytest.approx(6.0)  # (0,0) ← (0,2): same by symmetry of the square grid
    assert A[1, 7] == pytest.approx(0.5 * 6 * 2 / 3)  # (1,0) ← (1,2): P[1,1] = 2/3


@pytest.mark.parametrize("basis", bases.BASES)
def test_orthonormal_A_is_the_exact_heat_generator_in_the_span(basis):
    W, H = 3, 2
    A_orth = bases.a_matrix(basis, W, H, normalize=False, orthonormal=True)
    for tau in (0.01, 0.1, 0.5):
        M = bases_verify.heat_propagator_in_span(basis, W, H, tau)
        np.testing.assert_allclose(bases.discretize(A_orth, tau), M, atol=1e-11 * np.abs(M).max())


def test_zoh_equals_matrix_exponential_computed_other_ways():
    delta = 0.37
    # polynomial A is strictly upper triangular, hence nilpotent: exp is a finite Taylor sum
    for basis in ("chebyshev", "legendre", "hermite"):
        A = bases.a_matrix(basis, 4, 4)
        series, term = np.eye(16), np.eye(16)
        for m in range(1, 16):
            term = term @ (delta * A) / m
            series = series + term
        np.testing.assert_allclose(bases.discretize(A, delta, "zoh"), series, rtol=1e-12, atol=1e-14)
    # Fourier A is diagonal: exp acts entry-wise
    A = bases.a_matrix("fourier", 4, 3)
    np.testing.assert_allclose(bases.discretize(A, delta, "zoh"), np.diag(np.exp(delta * np.diag(A))), rtol=1e-13)
    # orthonormal Chebyshev (same structure) against an ODE solve of dX/dt = A X
    A = bases.a_matrix("chebyshev", 3, 3, orthonormal=True)
    sol = integrate.solve_ivp(lambda t, x: (A @ x.reshape(9, 9)).ravel(), (0, delta), np.eye(9).ravel(),
                              rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(bases.discretize(A, delta), sol.y[:, -1].reshape(9, 9), atol=1e-9)
    np.testing.assert_allclose(bases.discretize(A, delta, "euler"), np.eye(9) + delta * A)


def test_discretize_rejects_bad_arguments():
    A = bases.a_matrix("legendre", 2, 3)
    with pytest.raises(ValueError, match="discretization"):
        bases.discretize(A, 0.1, "rk4")
    with pytest.raises(ValueError, match="delta"):
        bases.discretize(A, -1.0)


def test_frequency_order_matches_appendix_a6():
    # eq. (78), 1-based: {1},{2,5},{3,6,9},{4,7,10,13},{8,11,14},{12,15},{16}
    paper = [[1], [2, 5], [3, 6, 9], [4, 7, 10, 13], [8, 11, 14], [12, 15], [16]]
    assert bases.frequency_groups(4, 4) == [[n - 1 for n in g] for g in paper]
    assert bases.frequency_order(4, 4) == [n - 1 for g in paper for n in g]
    for W, H in [(8, 4), (4, 8), (1, 5), (3, 2)]:
        order = bases.frequency_order(W, H)
        assert sorted(order) == list(range(W * H))
        sums = [sum(bases.channel_to_wh(n, W)) for n in order]
        assert sums == sorted(sums)


def test_grid_and_index_helpers():
    assert bases.parse_grid("8") == (8, 8)
    assert bases.parse_grid(8) == (8, 8)
    assert bases.parse_grid("8x4") == (8, 4)
    assert bases.parse_grid(" 2X3 ") == (2, 3)
    for bad in ("0", 0, "-2", "8x0", "8x", "abc", "2x3x4", "", True):
        with pytest.raises(ValueError, match="grid size"):
            bases.parse_grid(bad)
    for n in range(24):
        w, h = bases.channel_to_wh(n, 6)
        assert bases.wh_to_channel(w, h, 6) == n and n == w + 6 * h
    assert bases.grid_for_channels(16) == (4, 4)
    assert bases.grid_for_channels(32) == (8, 4)
    assert bases.grid_for_channels(32, "4x8") == (4, 8)
    with pytest.raises(ValueError, match="channels"):
        bases.grid_for_channels(16, "8x4")
    with pytest.raises(ValueError, match="unknown basis"):
        bases.a_matrix("wavelet", 2, 2)


@pytest.mark.parametrize("basis", bases.BASES)
def test_cell_integrals_match_quad(basis):
    """The closed-form antiderivatives used by project() against adaptive quadrature, edge cells included."""
    Lx, n = 4, 5
    edges = np.array([0.0, 0.3, 1.7, 3.9, 4.0])
    Q = bases._cell_integrals_1d(basis, n, Lx, edges)
    s, o = bases.domain_map(basis, Lx)
    weight = {"fourier": lambda u: 1.0, "legendre": lambda u: 1.0, "hermite": lambda u: math.exp(-u * u),
              "chebyshev": lambda u: 1.0 / math.sqrt(1.0 - u * u)}[basis]
    for k in range(n):
        for i in range(len(edges) - 1):
            def f(x, part):
                u = s * x + o
                val = np.conj(bases._values_1d(basis, n, np.array([u]))[k, 0]) * weight(u)
                return val.real if part == 0 else val.imag
            re = integrate.quad(f, edges[i], edges[i + 1], args=(0,), limit=200)[0]
            im = integrate.quad(f, edges[i], edges[i + 1], args=(1,), limit=200)[0] if basis == "fourier" else 0.0
            assert Q[k, i] == pytest.approx(re + 1j * im, abs=1e-7)


def test_project_recovers_sampled_basis_functions():
    W, H = 3, 2
    for basis in ("legendre", "fourier"):
        phis = bases.basis_functions(basis, W, H, 96, 144, orthonormal=True)
        assert phis.shape == (W * H, 96, 144)
        for n in range(W * H):
            b = bases.project(phis[n].real if basis == "fourier" else phis[n], basis, W, H, orthonormal=True)
            if basis == "legendre":
                np.testing.assert_allclose(b, np.eye(W * H)[n], atol=2e-3)
            else:  # a real cosine has half its energy in the +frequency coefficient
                expected = np.eye(W * H)[n] * (1.0 if n == 0 else 0.5)
                np.testing.assert_allclose(b, expected, atol=1e-3)
    with pytest.raises(ValueError, match="2D"):
        bases.project(np.zeros((2, 3, 4)), "legendre", 2, 2)


def test_photo_pipeline_exact_for_polynomial_images_blurred_on_R():
    """A polynomial image in the span, blurred on an extended canvas (= heat flow on ℝ²), then projected:
    exp(Δ·A_orth) predicts its coefficients up to pixel discretization; doing nothing does not."""
    W, H, s, tau = 3, 3, 48, 9.0
    rng = np.random.default_rng(0)
    b = rng.normal(size=W * H)
    pad = 30
    x = (np.arange(-pad, s * W + pad) + 0.5) / s
    y = (np.arange(-pad, s * H + pad) + 0.5) / s
    sx, ox = bases.domain_map("legendre", W)
    vx = L.legvander(sx * x + ox, W - 1).T
    vy = L.legvander(sx * y + ox, H - 1).T
    nrm = np.sqrt(bases.norms_sq("legendre", W, H))
    f = sum(b[n] / nrm[n] * np.outer(vy[n // W], vx[n % W]) for n in range(W * H))
    g = ndimage.gaussian_filter(f, math.sqrt(tau), mode="nearest", truncate=8)
    b0 = bases.project(f[pad:-pad, pad:-pad], "legendre", W, H, orthonormal=True)
    bt = bases.project(g[pad:-pad, pad:-pad], "legendre", W, H, orthonormal=True)
    pred = bases.discretize(bases.a_matrix("legendre", W, H, normalize=False, orthonormal=True), tau / s**2) @ b0
    err = np.linalg.norm(pred - bt) / np.linalg.norm(bt)
    baseline = np.linalg.norm(b0 - bt) / np.linalg.norm(bt)
    assert err < 1e-4 and baseline > 100 * err


def test_verify_dynamics_numbers():
    r = bases_verify.verify_dynamics(2, 2, taus=(2.0,), pixels_per_unit=8)
    assert set(r["photo"]) == {"fourier", "fourier_periodic", "chebyshev", "legendre", "hermite", "hermite_on_R"}
    for basis in bases.BASES:
        assert r["in_span"][basis]["orthonormal"][0] < 1e-12
    # periodic borders are the setting of the Fourier derivation: exact up to kernel sampling
    assert r["photo"]["fourier_periodic"]["orthonormal"][0] < 1e-6
    assert r["photo"]["fourier_periodic"]["no_change"][0] > 1e-2
    for rows in r["photo"].values():
        assert all(np.isfinite(v) for key in rows for v in rows[key])


def test_delta_from_blur_reproduces_periodic_blur_decay():
    """Issue 13 item 4: the physical Δ with the normalised A reproduces the measured Fourier coefficient decay."""
    import scipy.linalg as sla
    from ssr_cli import bases as B
    W = H = 4
    N = 256
    gap = 4.0
    delta = B.delta_from_blur("fourier", W, H, gap, N)
    assert abs(delta - 0.0217) < 5e-4
    rng = np.random.default_rng(0)
    phi = B.basis_functions("fourier", W, H, N, N, orthonormal=True)
    img = np.real(np.tensordot(rng.normal(size=W * H) + 1j * rng.normal(size=W * H), phi, axes=1))
    f = np.fft.fftfreq(N)
    gain = np.exp(-2 * np.pi ** 2 * gap * (f[:, None] ** 2 + f[None, :] ** 2))
    blurred = np.real(np.fft.ifft2(np.fft.fft2(img) * gain))
    c0 = B.project(img, "fourier", W, H, orthonormal=True)
    c1 = B.project(blurred, "fourier", W, H, orthonormal=True)
    A = B.a_matrix("fourier", W, H, normalize=False, orthonormal=True)
    pred = sla.expm(delta * A / np.max(np.abs(A))) @ c0
    assert np.max(np.abs(pred - c1)) / np.max(np.abs(c1)) < 1e-3
