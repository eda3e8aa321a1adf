"""Reference statistics for the generation metrics: :class:`ReferenceStats`, and writing / reading reference
files (ours, ``ssr-reference-v1``, and ADM reference or sample batches).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ssr_cli.engine.atomic import atomic_path
from ssr_cli.errors import UserFileNotFoundError, UserValueError, one_line
from ssr_cli.metrics.inception import InceptionFeatures, extract_features, gaussian_stats
from ssr_cli.npz import check_images, iter_npz_batches, npz_array_info

REFERENCE_FORMAT = "ssr-reference-v1"


@dataclass
class ReferenceStats:
    """Statistics of a reference set. ``pool`` (N, 2048) rows are needed for precision/recall and KID;
    ``mu_s``/``sigma_s`` for sFID. ``spatial`` (N, 2023) rows, kept for small sets only
    (:data:`SPATIAL_ROWS_MAX`), let the sFID of a small sample set skip the 2023² eigendecompositions
    (:func:`frechet_distance_of_rows`). Missing parts are None; ``notes`` says why, for the CLI."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None
    num_images: int | None = None
    source: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    subset: dict | None = None  # how a folder/tar reference was cut to size (data.subset_record), None: whole
    spatial: np.ndarray | None = None


SPATIAL_ROWS_MAX = 2023
"""Up to this many images (the spatial features' dimension: where the rows route of the Fréchet distance is
cheaper than the covariances'), references and sample sets keep their ``spatial`` rows (float32, ≤ 16 MiB)."""


def _checked_spatial(path: Path, arrays: dict) -> np.ndarray | None:
    """A reference file's optional ``spatial`` rows, when they are (N, D) numbers matching ``mu_s``."""
    rows = arrays.get("spatial")
    if rows is None:
        return None
    mu_s = arrays.get("mu_s")
    if (not np.issubdtype(rows.dtype, np.number) or rows.ndim != 2 or mu_s is None
            or rows.shape[1] != mu_s.shape[0] or not np.isfinite(rows).all()):
        raise UserValueError(f"{path}: `spatial` {rows.dtype} {rows.shape} are not finite rows (N, D) matching "
                             "`mu_s`; remake it with `ssr evaluate --make-ref`")
    return rows


def save_reference_stats(path: str | os.PathLike, feats: Mapping[str, np.ndarray]) -> Path:
    """Write reference statistics as ``.npz`` (written atomically): ``mu``, ``sigma``, ``mu_s``, ``sigma_s``
    (float64) and ``pool`` rows (float32, as the extractor computes them) for precision/recall and KID; with
    ``spatial`` rows of at most :data:`SPATIAL_ROWS_MAX` images, those too (float32).

    feats: the output of :func:`extract_features` / :meth:`FeatureAccumulator.result` (must contain
    ``pool``; Gaussian statistics are taken from it when present, else computed from ``pool``/``spatial``).
    The mu/sigma keys are those of ADM reference batches, so ADM's evaluator can read the statistics too.
    """
    path = Path(path)
    if "pool" not in feats or len(feats["pool"]) < 2:
        raise ValueError("save_reference_stats: feats needs `pool` features of at least 2 images")
    arrays: dict[str, np.ndarray] = {}
    if "mu" in feats and "sigma" in feats:
        arrays["mu"], arrays["sigma"] = feats["mu"], feats["sigma"]
    else:
        arrays["mu"], arrays["sigma"] = gaussian_stats(feats["pool"])
    if "mu_s" in feats and "sigma_s" in feats:
        arrays["mu_s"], arrays["sigma_s"] = feats["mu_s"], feats["sigma_s"]
    elif "spatial" in feats and len(feats["spatial"]):
        arrays["mu_s"], arrays["sigma_s"] = gaussian_stats(feats["spatial"])
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    arrays["pool"] = np.asarray(feats["pool"], dtype=np.float32)
    if "spatial" in feats and 2 <= len(feats["spatial"]) <= SPATIAL_ROWS_MAX:
        arrays["spatial"] = np.asarray(feats["spatial"], dtype=np.float32)
    arrays["num_images"] = np.asarray(len(feats["pool"]), dtype=np.int64)
    arrays["format"] = np.asarray(REFERENCE_FORMAT)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)  # a file object: np.savez would append .npz to a name without it
    return path


def _check_gaussian(path: Path, arrays: dict, mean: str, cov: str) -> None:
    """A reference file's statistics ``mean`` (D,) and ``cov`` (D, D), finite, when it has both (with one of them
    only, they are computed from its images): other shapes are a user error naming the file, not a failure deep
    inside the Fréchet distance."""
    mu, sigma = arrays.get(mean), arrays.get(cov)
    if mu is None or sigma is None:
        return
    numbers = all(np.issubdtype(a.dtype, np.number) for a in (mu, sigma))
    if (not numbers or mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0])
            or not (np.isfinite(mu).all() and np.isfinite(sigma).all())):
        raise UserValueError(f"{path}: `{mean}` {mu.dtype} {mu.shape} and `{cov}` {sigma.dtype} {sigma.shape} are not "
                             "finite statistics of shape (D,) and (D, D); remake it with `ssr evaluate --make-ref`")


def load_reference(
    path: str | os.PathLike, extractor: InceptionFeatures | None = None, batch_size: int = 50
) -> ReferenceStats:
    """Load reference statistics from our ``.npz`` (see :func:`save_reference_stats`) or an ADM batch ``.npz``.

    ADM reference batches hold ``mu``/``sigma``/``mu_s``/``sigma_s`` and images ``arr_0`` (uint8 NHWC);
    ADM sample batches hold only ``arr_0``. Features of ``arr_0`` are computed with ``extractor`` when given
    (for precision/recall/KID, and for the statistics when the file has none); without it the pool rows are
    missing and ``notes`` says so.
    """
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"reference file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            arrays = {k: data[k] for k in keys if k != "arr_0"}  # arr_0 (the images) is streamed, never loaded whole
    except ValueError as exc:  # e.g. an object array: numpy refuses to unpickle it (allow_pickle=False)
        raise UserValueError(f"{path}: not a reference batch of plain arrays ({one_line(exc)}; pickled objects are "
                             "never loaded); remake it with `ssr evaluate --make-ref`") from None
    if "format" in arrays and str(arrays["format"]) == REFERENCE_FORMAT:
        missing = sorted({"mu", "sigma", "pool", "num_images"} - set(arrays))
        if missing:
            raise UserValueError(f"{path}: an ssr reference without {', '.join(missing)}; remake it with "
                                 "`ssr evaluate --make-ref`")
        _check_gaussian(path, arrays, "mu", "sigma")
        _check_gaussian(path, arrays, "mu_s", "sigma_s")
        return ReferenceStats(
            mu=arrays["mu"], sigma=arrays["sigma"], mu_s=arrays.get("mu_s"), sigma_s=arrays.get("sigma_s"),
            pool=arrays["pool"], num_images=int(arrays["num_images"]), source=f"{path} (ssr)",
            subset=json.loads(str(arrays["subset"])) if "subset" in arrays else None,
            spatial=_checked_spatial(path, arrays),
        )
    # ADM batch
    notes: dict[str, str] = {}
    pool = mu_s = sigma_s = None
    _check_gaussian(path, arrays, "mu", "sigma")
    _check_gaussian(path, arrays, "mu_s", "sigma_s")
    mu, sigma = arrays.get("mu"), arrays.get("sigma")
    mu_s, sigma_s = arrays.get("mu_s"), arrays.get("sigma_s")
    num_images = None
    if "arr_0" in keys:
        shape, dtype = npz_array_info(path)
        check_images(path, shape, dtype)
        num_images = shape[0]
        if extractor is not None:
            nchw = (torch.from_numpy(rows).permute(0, 3, 1, 2) for rows in iter_npz_batches(path, batch_size=batch_size))
            feats = extract_features(nchw, extractor, batch_size=batch_size, keep=("pool",), rows_dtype=np.float32)
            pool = feats["pool"]
            if mu is None or sigma is None:
                mu, sigma = feats["mu"], feats["sigma"]
            if mu_s is None or sigma_s is None:
                mu_s, sigma_s = feats["mu_s"], feats["sigma_s"]
        else:
            notes["pool"] = "no Inception extractor was given to compute features of the batch's images (arr_0)"
    else:
        notes["pool"] = f"{path} has no images (arr_0) to compute features for precision/recall/KID"
    if mu is None or sigma is None:
        raise UserValueError(
            f"{path}: neither `mu`/`sigma` statistics nor images `arr_0` with an Inception extractor are available; "
            f"make a reference with `ssr evaluate --make-ref`"
        )
    if mu_s is None:
        notes["spatial"] = f"{path} has no spatial statistics (mu_s/sigma_s)"
    return ReferenceStats(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=pool, num_images=num_images,
                          source=f"{path} (ADM batch)", notes=notes)
