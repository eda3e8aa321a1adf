"""Generation metrics from feature statistics: Fréchet distance (FID / sFID), Inception Score, precision /
recall, KID, and :func:`compute_generation_metrics`, all of them against a reference. Computed in float64.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

from ssr_cli.errors import UserValueError
from ssr_cli.metrics.inception import gaussian_stats
from ssr_cli.metrics.reference import ReferenceStats


class MetricUnavailable(Exception):
    """A metric cannot be computed meaningfully; ``reason`` says why (the CLI prints it)."""

    def __init__(self, metric: str, reason: str):
        super().__init__(f"{metric} unavailable: {reason}")
        self.metric = metric
        self.reason = reason


# ---------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------


def _psd_factor(matrix: np.ndarray) -> np.ndarray:
    """F (D, r) with F Fᵀ = matrix for a symmetric PSD matrix, from its eigendecomposition: V·sqrt(Λ) over the r
    eigenvalues above the numerical rank threshold max(Λ)·D·eps (the rest, rounding noise around 0 for a
    covariance of fewer than D samples, are dropped: they are 0 in the matrix the rounding came from)."""
    eigvals, eigvecs = np.linalg.eigh(matrix)
    keep = eigvals > max(float(eigvals[-1]), 0.0) * matrix.shape[0] * np.finfo(np.float64).eps
    return eigvecs[:, keep] * np.sqrt(eigvals[keep])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID when these are Inception statistics).

    |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2)) in float64, without scipy.linalg.sqrtm (a Schur
    method on the non-symmetric product: slow, and wrong or complex on some BLAS builds). With factors
    F_i F_iᵀ = s_i from symmetric eigendecompositions (:func:`_psd_factor`), the nonzero eigenvalues of s1 s2 are
    the squared singular values of F1ᵀ F2, so tr((s1 s2)^(1/2)) is the sum of those singular values. Taking
    singular values of the product rather than square roots of the eigenvalues of s1^(1/2) s2 s1^(1/2) avoids
    squaring the condition number: the error stays ~1e-11 for ill-conditioned or singular (N < D) covariances,
    where the eigenvalue route errs by ~1e-5 (measured on 2048-d covariances with a 1e-7..50 spectrum). F_i has
    only the rank's columns, so for covariances of fewer than D samples the SVD is of a rank × rank matrix (the
    sFID of a few hundred images against a small reference: two 2048² eigendecompositions and a small SVD, about
    half the CPU of full square roots and a 2048² SVD). mu: (D,), sigma: (D, D). Returns a float.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance: shapes do not match: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    for name, array in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(array).all():
            raise ValueError(f"frechet_distance: {name} has non-finite values")
    sigma1 = 0.5 * (sigma1 + sigma1.T)  # remove rounding asymmetry before eigh
    sigma2 = 0.5 * (sigma2 + sigma2.T)
    f1 = _psd_factor(sigma1)
    # a set against itself (a sanity check; the same reference twice): one eigendecomposition, not two
    f2 = f1 if np.array_equal(sigma1, sigma2) else _psd_factor(sigma2)
    trace_sqrt_product = np.linalg.svd(f1.T @ f2, compute_uv=False).sum() if f1.size and f2.size else 0.0
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product)


def frechet_distance_of_rows(rows1: np.ndarray, rows2: np.ndarray) -> float:
    """:func:`frechet_distance` of the Gaussians fitted to feature rows (N1, D) and (N2, D) (unbiased
    covariances, as :func:`gaussian_stats`), the same number computed from the rows when that is cheaper.

    With centred rows X1, X2, s_i = X_iᵀX_i / (N_i − 1) and the nonzero eigenvalues of s1 s2 are the squared
    singular values of X1 X2ᵀ / sqrt((N1 − 1)(N2 − 1)), so tr((s1 s2)^(1/2)) is the nuclear norm of that
    N1 × N2 matrix and tr(s_i) = ‖X_i‖²_F / (N_i − 1): no D × D decomposition at all. Used when
    N1·N2 ≤ D² (e.g. 1000 reconstructions against their 1000 originals at D = 2048: one 1000² SVD instead
    of two 2048² eigendecompositions and a 2048² SVD, ~20× less work); otherwise the covariance route.
    """
    rows1 = np.asarray(rows1, np.float64)
    rows2 = np.asarray(rows2, np.float64)
    if rows1.ndim != 2 or rows2.ndim != 2 or rows1.shape[1] != rows2.shape[1]:
        raise ValueError(f"frechet_distance_of_rows: expected (N1, D) and (N2, D) rows, got {rows1.shape} and "
                         f"{rows2.shape}")
    (n1, dim), n2 = rows1.shape, rows2.shape[0]
    if n1 < 2 or n2 < 2:
        raise ValueError(f"frechet_distance_of_rows: need at least 2 rows on each side, got {n1} and {n2}")
    if n1 * n2 > dim * dim:
        return frechet_distance(*gaussian_stats(rows1), *gaussian_stats(rows2))
    if not (np.isfinite(rows1).all() and np.isfinite(rows2).all()):
        raise ValueError("frechet_distance_of_rows: the rows have non-finite values")
    mu1, mu2 = rows1.mean(axis=0), rows2.mean(axis=0)
    c1, c2 = rows1 - mu1, rows2 - mu2
    trace1, trace2 = float((c1 * c1).sum()) / (n1 - 1), float((c2 * c2).sum()) / (n2 - 1)
    trace_sqrt_product = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + trace1 + trace2 - 2.0 * trace_sqrt_product)


# ---------------------------------------------------------------------------------------------------
# Inception Score, precision/recall, KID
# ---------------------------------------------------------------------------------------------------


def inception_score(
    logits: np.ndarray, split_size: int | None = 5000, splits: int | None = None
) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of classifier logits (N, K): (mean, std) over splits.

    Split as ADM does (consecutive chunks of ``split_size`` images, the last one possibly shorter) or, with
    ``splits`` given, into that many near-equal chunks as the original improved-GAN code; std is the
    population std over chunks. Computed in float64 from log-softmax. Raises :class:`MetricUnavailable` when
    every row of logits is constant (e.g. an all-zero classification layer): p(y|x) is then uniform and the
    score would be exactly 1 regardless of the images.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"inception_score: expected logits (N, K), got shape {logits.shape}")
    if np.ptp(logits, axis=1).max() == 0.0:
        raise MetricUnavailable(
            "inception_score", "the classifier's logits are constant (its classification layer is all zeros)"
        )
    log_p = torch.log_softmax(torch.from_numpy(logits), dim=1).numpy()
    n = logits.shape[0]
    if splits is not None:
        bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    else:
        bounds = [(start, min(start + split_size, n)) for start in range(0, n, split_size)]
    scores = []
    for start, stop in bounds:
        chunk = log_p[start:stop]
        if chunk.shape[0] == 0:
            raise ValueError(f"inception_score: {n} images cannot fill {splits} splits")
        log_marginal = np.logaddexp.reduce(chunk, axis=0) - np.log(chunk.shape[0])
        kl = (np.exp(chunk) * (chunk - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(1, keepdim=True) - 2.0 * a @ b.T + b.pow(2).sum(1)[None]).clamp_(min=0.0)


_CENTER_CHUNK = 8192  # centers per distance block: rows are converted to float64 one block at a time


def _center_chunks(centers: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, centers.shape[0], _CENTER_CHUNK):
        yield start, centers[start : start + _CENTER_CHUNK].to(torch.float64)


def _knn_radii_sq(feats: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    # k-th nearest neighbour other than the point itself: the (k+1)-th smallest distance (self is at 0).
    # Per block of centers keep the k+1 smallest distances; the (k+1)-th of their union is the row's.
    radii = torch.empty(feats.shape[0], dtype=torch.float64)
    for start in range(0, feats.shape[0], batch_size):
        rows = feats[start : start + batch_size].to(torch.float64)
        best = torch.cat([_squared_distances(rows, chunk).topk(min(k + 1, chunk.shape[0]), dim=1, largest=False).values
                          for _, chunk in _center_chunks(feats)], dim=1)
        radii[start : start + batch_size] = best.kthvalue(k + 1, dim=1).values
    return radii


def _fraction_inside(queries: torch.Tensor, centers: torch.Tensor, radii_sq: torch.Tensor, batch_size: int) -> float:
    inside = 0
    for start in range(0, queries.shape[0], batch_size):
        rows = queries[start : start + batch_size].to(torch.float64)
        hit = torch.zeros(rows.shape[0], dtype=torch.bool)
        for c0, chunk in _center_chunks(centers):
            hit |= (_squared_distances(rows, chunk) <= radii_sq[None, c0 : c0 + chunk.shape[0]]).any(dim=1)
        inside += int(hit.sum())
    return inside / queries.shape[0]


def precision_recall(
    real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3, batch_size: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds, as in ADM's evaluator.

    real_feats (N_r, D), fake_feats (N_f, D): e.g. Inception pool features. Each set's manifold is the
    union of balls around its points with radius = distance to the k-th nearest other point. Precision is
    the fraction of fake points inside the real manifold, recall the fraction of real points inside the
    fake manifold. Distances in float64, in blocks of ``batch_size`` rows by 8192 centers, each converted to
    float64 when used (float32 inputs, as Inception computes them, are never copied whole).
    Returns (precision, recall) in [0, 1].
    """
    def tensor(a):
        a = np.asarray(a)
        return torch.from_numpy(np.ascontiguousarray(a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)))

    real, fake = tensor(real_feats), tensor(fake_feats)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"precision_recall: expected (N, D) feature sets, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if min(real.shape[0], fake.shape[0]) <= k:
        raise UserValueError(
            f"precision_recall: each set needs more than k={k} points, got {real.shape[0]} and {fake.shape[0]}"
        )
    radii_real = _knn_radii_sq(real, k, batch_size)
    radii_fake = _knn_radii_sq(fake, k, batch_size)
    precision = _fraction_inside(fake, real, radii_real, batch_size)
    recall = _fraction_inside(real, fake, radii_fake, batch_size)
    return precision, recall


def kid(
    real_feats: np.ndarray,
    fake_feats: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2 with the polynomial kernel
    k(x, y) = (x.y / D + 1)^degree, averaged over ``subsets`` random subsets of ``subset_size`` points drawn
    without replacement from each set (as torch-fidelity). ``subset_size`` is capped at the smaller set size.
    Returns (mean, population std) over subsets; float64.
    """
    real = np.asarray(real_feats)
    fake = np.asarray(fake_feats)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"kid: expected (N, D) feature sets, got {real.shape} and {fake.shape}")
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise UserValueError(f"kid: need at least 2 points per set, got {real.shape[0]} and {fake.shape[0]}")
    dim = real.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = real[rng.choice(real.shape[0], m, replace=False)].astype(np.float64)  # subsets only, in float64
        y = fake[rng.choice(fake.shape[0], m, replace=False)].astype(np.float64)
        k_xx = (x @ x.T / dim + 1.0) ** degree
        k_yy = (y @ y.T / dim + 1.0) ** degree
        k_xy = (x @ y.T / dim + 1.0) ** degree
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[i] = within - 2.0 * k_xy.mean()
    return float(values.mean()), float(values.std())



# ---------------------------------------------------------------------------------------------------
# Combined metrics
# ---------------------------------------------------------------------------------------------------


def _gaussian_of(feats: Mapping[str, np.ndarray], rows_key: str, mu_key: str, sigma_key: str):
    if mu_key in feats and sigma_key in feats:
        return feats[mu_key], feats[sigma_key]
    if rows_key in feats and len(feats[rows_key]) >= 2:
        return gaussian_stats(feats[rows_key])
    return None


def _rows_route(fake_rows: np.ndarray | None, ref: ReferenceStats, rows: str = "pool", mean: str = "mu") -> bool:
    """FID (``rows="pool"``) or sFID (``"spatial"``) from the rows (:func:`frechet_distance_of_rows`) when both
    sets are small and the reference's rows are the ones its statistics come from (a reference made elsewhere,
    e.g. an ADM batch whose statistics came from another Inception port, keeps its own statistics)."""
    ref_rows, ref_mean = getattr(ref, rows), getattr(ref, mean)
    if ref_rows is None or ref_mean is None or fake_rows is None or len(fake_rows) < 2 or len(ref_rows) < 2:
        return False
    if len(fake_rows) * len(ref_rows) > ref_mean.shape[0] ** 2:
        return False
    return bool(np.allclose(np.asarray(ref_rows, np.float64).mean(axis=0), ref_mean, rtol=1e-5, atol=1e-6))


def compute_generation_metrics(
    fake_feats: Mapping[str, np.ndarray],
    ref: ReferenceStats,
    fc_zero: bool,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_split_size: int = 5000,
    seed: int = 0,
) -> dict:
    """FID, sFID, Inception Score, precision, recall and KID of generated images against a reference.

    fake_feats: :func:`extract_features` / :meth:`FeatureAccumulator.result` output (``pool`` rows required;
    ``mu``/``sigma``, ``mu_s``/``sigma_s`` or ``spatial`` rows, ``logits``). fc_zero: the extractor's
    ``fc_is_zero`` (IS is then unavailable). Returns ``{"fid", "sfid", "inception_score",
    "inception_score_std", "precision", "recall", "kid", "kid_std", "num_images", "unavailable"}``: a
    metric that cannot be computed is None and ``unavailable[name]`` gives the reason.
    """
    out: dict = {"num_images": int(len(fake_feats["pool"])), "unavailable": {}}
    unavailable = out["unavailable"]

    fake_rows = fake_feats["pool"]
    if _rows_route(fake_rows, ref):
        out["fid"] = frechet_distance_of_rows(fake_rows, ref.pool)  # the same number, cheaper for small sets
    else:
        out["fid"] = frechet_distance(*_gaussian_of(fake_feats, "pool", "mu", "sigma"), ref.mu, ref.sigma)

    fake_spatial = _gaussian_of(fake_feats, "spatial", "mu_s", "sigma_s")
    if _rows_route(fake_feats.get("spatial"), ref, rows="spatial", mean="mu_s"):
        out["sfid"] = frechet_distance_of_rows(fake_feats["spatial"], ref.spatial)  # the same number, cheaper
    elif ref.mu_s is None or ref.sigma_s is None:
        out["sfid"] = None
        unavailable["sfid"] = ref.notes.get("spatial", "the reference has no spatial statistics")
    elif fake_spatial is None:
        out["sfid"] = None
        unavailable["sfid"] = "no spatial features of the generated images"
    else:
        out["sfid"] = frechet_distance(*fake_spatial, ref.mu_s, ref.sigma_s)

    out["inception_score"] = out["inception_score_std"] = None
    if fc_zero:
        unavailable["inception_score"] = "the Inception weights' classification layer (fc) is all zeros"
    elif "logits" not in fake_feats or len(fake_feats["logits"]) == 0:
        unavailable["inception_score"] = "no logits of the generated images"
    else:
        try:
            out["inception_score"], out["inception_score_std"] = inception_score(
                fake_feats["logits"], split_size=is_split_size
            )
        except MetricUnavailable as err:
            unavailable["inception_score"] = err.reason

    out["precision"] = out["recall"] = out["kid"] = out["kid_std"] = None
    if ref.pool is None:
        reason = ref.notes.get("pool", "the reference has no pool features")
        unavailable.update(precision=reason, recall=reason, kid=reason)
    else:
        out["precision"], out["recall"] = precision_recall(ref.pool, fake_feats["pool"], k=k)
        out["kid"], out["kid_std"] = kid(
            ref.pool, fake_feats["pool"], subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )
    return out
