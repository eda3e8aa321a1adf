"""Image-quality metrics: PSNR, SSIM, LPIPS, and Inception-based FID / sFID / IS / precision / recall / KID.

One job per module; this package re-exports their public names, so ``from ssr_cli.metrics import X`` works:

- :mod:`~ssr_cli.metrics.pixel`: uint8 quantization (:func:`to_uint8`), PSNR, SSIM, :func:`reconstruction_metrics`.
- :mod:`~ssr_cli.metrics.lpips`: the LPIPS network, its backbone loaded from a local file.
- :mod:`~ssr_cli.metrics.inception`: Inception-v3 features (ADM's protocol), their accumulation and Gaussian
  statistics.
- :mod:`~ssr_cli.metrics.generation`: Fréchet distance, Inception Score, precision/recall, KID,
  :func:`compute_generation_metrics`.
- :mod:`~ssr_cli.metrics.reference`: :class:`ReferenceStats` and the reference files (ours and ADM batches).

Conventions: images inside the toolkit are float tensors NCHW in [-1, 1]; pixel metrics see them quantized to
uint8 as they would be saved; statistics (means, covariances, Fréchet distances) are computed in float64.
"""

from ssr_cli.metrics.generation import (
    MetricUnavailable,
    compute_generation_metrics,
    frechet_distance,
    frechet_distance_of_rows,
    inception_score,
    kid,
    precision_recall,
)
from ssr_cli.metrics.inception import (
    SPATIAL_CHANNELS,
    FeatureAccumulator,
    InceptionFeatures,
    PoolFeatureCache,
    extract_features,
    fc_is_zero,
    gaussian_stats,
)
from ssr_cli.metrics.lpips import build_lpips, load_lpips
from ssr_cli.metrics.pixel import QUANTIZE_MODES, psnr_uint8, reconstruction_metrics, ssim, ssim_uint8, to_uint8
from ssr_cli.metrics.reference import (
    REFERENCE_FORMAT,
    SPATIAL_ROWS_MAX,
    ReferenceStats,
    load_reference,
    save_reference_stats,
)

__all__ = [
    "MetricUnavailable",
    "QUANTIZE_MODES",
    "to_uint8",
    "psnr_uint8",
    "ssim",
    "ssim_uint8",
    "reconstruction_metrics",
    "build_lpips",
    "load_lpips",
    "SPATIAL_CHANNELS",
    "fc_is_zero",
    "InceptionFeatures",
    "PoolFeatureCache",
    "FeatureAccumulator",
    "extract_features",
    "gaussian_stats",
    "frechet_distance",
    "frechet_distance_of_rows",
    "inception_score",
    "precision_recall",
    "kid",
    "REFERENCE_FORMAT",
    "SPATIAL_ROWS_MAX",
    "ReferenceStats",
    "save_reference_stats",
    "load_reference",
    "compute_generation_metrics",
]
