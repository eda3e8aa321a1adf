"""Image-quality metrics: PSNR, SSIM, LPIPS, and Inception-based FID / sFID / IS / precision / recall / KID.

Conventions
-----------
- Images inside the toolkit are float tensors NCHW in [-1, 1]. Pixel metrics (PSNR, SSIM) are computed
  on the images quantized to uint8 exactly as they would be saved: ``round((x + 1) * 127.5)`` clamped
  to [0, 255] (see :func:`to_uint8`).
- Inception features follow the protocol of ADM's evaluator (openai/guided-diffusion,
  ``evaluations/evaluator.py``) on the TF Inception-v3 of 2015-12-05, run through torch-fidelity's
  ``FeatureExtractorInceptionV3`` (which resizes any input to 299x299 like TF1's bilinear resize):

  * ``pool``: the 2048-d ``pool_3`` features (FID, precision/recall, KID).
  * ``spatial``: ADM's ``mixed_6/conv`` tensor, first 7 channels, flattened in NHWC order ->
    17 * 17 * 7 = 2023 values (sFID). In the TF graph ``mixed_6`` is the third 17x17 Inception block
    (torch-fidelity's ``Mixed_6d``; its weight converter maps ``mixed_6/conv/*`` to
    ``Mixed_6d.branch1x1.*``), and ``mixed_6/conv`` is that block's 1x1 branch after BN + ReLU. We
    capture the output of ``Mixed_6d.branch1x1`` (a conv-BN-ReLU module) with a forward hook. The
    NHWC flattening order matters only when mixing our statistics with ADM's ``mu_s`` / ``sigma_s``.
  * ``logits``: ``pool @ fc.weight.T`` without the bias, 1008 classes (ADM applies the softmax to the
    ``softmax/logits/MatMul`` output, i.e. without bias; torch-fidelity's ``logits_unbiased``).

- Statistics (means, covariances, Fréchet distances) are computed in float64.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ssr_cli.blur import gaussian_kernels
from ssr_cli.engine.atomic import atomic_path
from ssr_cli.errors import one_line
from ssr_cli.models.weights import read_torch_tensors
from ssr_cli.npz import check_images, iter_npz_batches, npz_array_info

__all__ = [
    "MetricUnavailable",
    "to_uint8",
    "psnr_uint8",
    "ssim",
    "ssim_uint8",
    "load_lpips",
    "fc_is_zero",
    "InceptionFeatures",
    "FeatureAccumulator",
    "extract_features",
    "gaussian_stats",
    "frechet_distance",
    "inception_score",
    "precision_recall",
    "kid",
    "ReferenceStats",
    "save_reference_stats",
    "load_reference",
    "compute_generation_metrics",
    "reconstruction_metrics",
]

SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv: 17 * 17 * 7 = 2023 features
REFERENCE_FORMAT = "ssr-reference-v1"


class MetricUnavailable(Exception):
    """A metric cannot be computed meaningfully; ``reason`` says why (the CLI prints it)."""

    def __init__(self, metric: str, reason: str):
        super().__init__(f"{metric} unavailable: {reason}")
        self.metric = metric
        self.reason = reason


# ---------------------------------------------------------------------------------------------------
# Pixel metrics
# ---------------------------------------------------------------------------------------------------


QUANTIZE_MODES = ("round", "truncate")


def to_uint8(images: torch.Tensor, mode: str = "round") -> torch.Tensor:
    """Quantize images in [-1, 1] (any float dtype, any shape) to uint8, clamped to [0, 255].

    mode "round" (ours, everywhere by default): round((x + 1) * 127.5). "truncate": floor((x + 1) * 127.5),
    what ADM's sampler writes (``((x + 1) * 127.5).clamp(0, 255).to(uint8)``), about half a grey level lower."""
    scaled = (images.detach().to(torch.float32) + 1.0) * 127.5
    if mode == "round":
        scaled = torch.round(scaled)
    elif mode == "truncate":
        scaled = torch.floor(scaled)
    else:
        raise ValueError(f"to_uint8: mode must be one of {QUANTIZE_MODES}, got {mode!r}")
    return scaled.clamp_(0, 255).to(torch.uint8)


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"{name}: expected two (B, C, H, W) tensors of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def psnr_uint8(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image pair, on uint8-quantized pixels with peak 255.

    x, y: (B, C, H, W) floats in [-1, 1]. Returns float64 (B,); +inf where the quantized images are equal.
    """
    _check_pair(x, y, "psnr_uint8")
    return _psnr_of_uint8(to_uint8(x), to_uint8(y))


def _psnr_of_uint8(x_u8: torch.Tensor, y_u8: torch.Tensor) -> torch.Tensor:
    mse = (x_u8.to(torch.float64) - y_u8.to(torch.float64)).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(255.0**2 / mse)  # mse == 0 gives +inf, as it should


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 255.0,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Mean SSIM of each image pair (Wang et al. 2004 settings), per channel then averaged over channels.

    x, y: (B, C, H, W) tensors on a [0, data_range] scale (e.g. uint8 values with data_range=255).
    Gaussian window sigma=1.5 truncated at 3.5 sigma (11x11), K1=0.01, K2=0.03, population (not sample)
    covariances, SSIM map averaged over the "valid" region only (pixels whose window lies inside the
    image). This equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=...)``. Differentiable; computed
    in ``dtype`` (float64 by default: the variance terms cancel catastrophically in float32 at 255 scale).
    Returns (B,) in ``dtype``; H and W must be at least the window size (11).
    """
    _check_pair(x, y, "ssim")
    batch, channels, height, width = x.shape
    # scipy.ndimage.gaussian_filter's support and normalisation (radius int(truncate·σ + 0.5))
    tau = torch.tensor([float(sigma) ** 2], dtype=torch.float64, device=x.device)
    kernel = gaussian_kernels(tau, int(truncate * sigma + 0.5), truncate)[0].to(dtype)
    win = kernel.numel()
    if height < win or width < win:
        raise ValueError(f"ssim: images of {height}x{width} are smaller than the {win}x{win} Gaussian window")
    x = x.to(dtype).reshape(batch * channels, 1, height, width)
    y = y.to(dtype).reshape(batch * channels, 1, height, width)
    # Filter the five moments in one separable "valid" convolution.
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    k_row = kernel.view(1, 1, 1, win).expand(5, 1, 1, win)
    k_col = kernel.view(1, 1, win, 1).expand(5, 1, win, 1)
    filtered = F.conv2d(F.conv2d(moments, k_row, groups=5), k_col, groups=5)
    mu_x, mu_y, e_xx, e_yy, e_xy = filtered.unbind(dim=1)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).view(batch, channels).mean(dim=1)


def ssim_uint8(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM (see :func:`ssim`) of images in [-1, 1] after uint8 quantization, data range 255. Returns float64 (B,)."""
    _check_pair(x, y, "ssim_uint8")
    return ssim(to_uint8(x), to_uint8(y), data_range=255.0)


# ---------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------

# torchvision's file names, so a torch hub cache that already holds them is found without configuration.
_LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


@functools.cache
def _frozen_lpips_class():
    import lpips  # lazy: the optional LPIPS package (and its torchvision backbones) loads only where LPIPS is used

    class FrozenLPIPS(lpips.LPIPS):
        """lpips.LPIPS that stays in eval mode: ``.train()`` on a parent module must not enable the heads' dropout."""

        def train(self, mode: bool = True):  # noqa: ARG002 - mode is ignored on purpose
            return super().train(False)

    return FrozenLPIPS


def _check_lpips_net(net: str) -> None:
    if net not in _LPIPS_BACKBONE_FILES:
        raise ValueError(f"load_lpips: net must be one of {sorted(_LPIPS_BACKBONE_FILES)}, got {net!r}")


def build_lpips(net: str = "alex"):
    """The LPIPS v0.1 network with its calibrated linear heads (shipped inside the ``lpips`` package) and a
    randomly initialised backbone: the model :func:`load_lpips` fills, and what ``--dry-run`` builds."""
    _check_lpips_net(net)
    with warnings.catch_warnings():
        # lpips builds its torchvision trunk with the deprecated `pretrained=` argument; the trunk is
        # randomly initialized here (pnet_rand=True), so nothing is downloaded.
        warnings.filterwarnings("ignore", message=r".*(pretrained|weight enum).*", category=UserWarning)
        return _frozen_lpips_class()(net=net, pretrained=True, pnet_rand=True, verbose=False)


def load_lpips(net: str = "alex", weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """LPIPS v0.1 with its backbone loaded from a local file; frozen, in eval mode, differentiable in its inputs.

    net: "alex" or "vgg". weights_path: a torchvision state dict of the backbone, either features only
    (``features.K.*``, e.g. ``../shared/data/lpips/alexnet-owt-7be5be79.features-only.pth``) or the full
    torchvision checkpoint (``classifier.*`` is ignored); ``None`` looks for torchvision's file in the torch
    hub cache. The calibrated linear heads ship inside the ``lpips`` package.
    Call as ``model(x, y)`` with x, y (B, 3, H, W) in [-1, 1]; returns (B, 1, 1, 1).
    Raises FileNotFoundError when the backbone file is missing.
    """
    _check_lpips_net(net)
    if weights_path is None:
        weights_path = Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_BACKBONE_FILES[net]
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"LPIPS backbone weights not found at {weights_path}. Nothing is downloaded at run time: get "
            f"torchvision's ImageNet {net} checkpoint ({_LPIPS_BACKBONE_FILES[net]}, from "
            f"https://download.pytorch.org/models/), or its features-only subset (in this project's shared "
            f"data: lpips/alexnet-owt-7be5be79.features-only.pth), and set the recipe key "
            f"`eval.lpips_weights` (evaluation) or `loss.lpips_weights` (training loss) to its path."
        )
    model = build_lpips(net)
    state = read_torch_tensors(weights_path, f"a torchvision {net} state dict")
    features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    # Map torchvision's `features.K.*` to lpips' `sliceN.K.*` by the layer index K.
    slice_of_layer = {}
    for name in model.net.state_dict():
        slice_name, layer, _ = name.split(".", 2)
        slice_of_layer[layer] = slice_name
    remapped = {}
    for key, tensor in features.items():
        layer = key.split(".", 1)[0]
        if layer not in slice_of_layer:
            raise ValueError(f"{weights_path}: unexpected layer `features.{key}` for the LPIPS {net} trunk")
        remapped[f"{slice_of_layer[layer]}.{key}"] = tensor
    try:
        model.net.load_state_dict(remapped, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_path} is not a torchvision {net} state dict (features.K.*): {err}") from None

    # lpips loads its heads with strict=False; check they really arrived so a renamed key cannot go unnoticed.
    import lpips  # lazy: see _frozen_lpips_class

    heads_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    heads = torch.load(heads_path, weights_only=True, map_location="cpu")
    own = model.state_dict()
    if not heads or any(k not in own or not torch.equal(own[k], v) for k, v in heads.items()):
        raise RuntimeError(f"LPIPS linear heads from {heads_path} were not loaded into the model")

    model.requires_grad_(False)
    model.eval()
    return model.to(device)


# ---------------------------------------------------------------------------------------------------
# Inception features
# ---------------------------------------------------------------------------------------------------


def _fc_is_zero_state(state: Mapping[str, torch.Tensor]) -> bool:
    weight, bias = state.get("fc.weight"), state.get("fc.bias")
    if weight is None:
        return True
    return not bool(weight.any()) and (bias is None or not bool(bias.any()))


def fc_is_zero(weights_path: str | os.PathLike) -> bool:
    """True when the Inception state dict at ``weights_path`` has an all-zero (or no) classification layer,
    i.e. its logits carry no class information and the Inception Score is meaningless."""
    return _fc_is_zero_state(read_torch_tensors(weights_path, "an Inception state dict"))


@contextlib.contextmanager
def _ieee_fp32_on_cuda(device: torch.device) -> Iterator[None]:
    """Run CUDA convs/matmuls in full fp32 (not TF32) so GPU features match CPU ones to float32 rounding."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        saved = (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
        conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved
    else:  # older torch
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class InceptionFeatures:
    """The FID Inception-v3 (TF 2015-12-05 weights from a local file) as a feature extractor.

    weights_path: state dict in torch-fidelity layout (e.g. ``../shared/data/inception/
    pt_inception-2015-12-05-reconstructed-nofc.pth``). ``fc_is_zero`` tells whether its classification
    layer is all zeros (then logits, and so the Inception Score, are meaningless).
    Call with uint8 images (B, 3, H, W) in [0, 255], any H, W (resized to 299 inside); returns float64 numpy
    arrays: ``pool`` (B, 2048), ``logits`` (B, 1008), ``spatial`` (B, 2023). See the module docstring.
    """

    def __init__(
        self, weights_path: str | os.PathLike, device: str | torch.device = "cpu", internal_dtype: str = "float32"
    ):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise FileNotFoundError(
                f"Inception weights not found at {weights_path}. Nothing is downloaded at run time: pass the "
                f"path of the FID Inception-v3 state dict in torch-fidelity layout (this project's shared data "
                f"has inception/pt_inception-2015-12-05-reconstructed-nofc.pth)."
            )
        # torch-fidelity reads the file with weights_only=False; loading it here first with
        # weights_only=True guarantees the file holds only tensors before that happens.
        state = read_torch_tensors(weights_path, "an Inception state dict (torch-fidelity layout)")
        self.fc_is_zero = _fc_is_zero_state(state)
        del state
        self.device = torch.device(device)
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(weights_path),
            feature_extractor_internal_dtype=internal_dtype,
        ).to(self.device)
        if self.device.type == "cpu":
            # oneDNN convolutions run ~1.5x faster in channels-last layout; values agree to float32 rounding.
            self.model = self.model.to(memory_format=torch.channels_last)
        self._spatial: torch.Tensor | None = None
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._capture_spatial)

    def _capture_spatial(self, module, inputs, output: torch.Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].detach()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3):
            raise ValueError(
                "InceptionFeatures expects uint8 images (B, 3, H, W) in [0, 255]; convert [-1, 1] floats with "
                f"metrics.to_uint8. Got {getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}"
            )
        images = images.to(self.device)
        if self.device.type == "cpu":
            images = images.contiguous(memory_format=torch.channels_last)
        self._spatial = None
        with _ieee_fp32_on_cuda(self.device):
            pool, logits = self.model(images)
        spatial = self._spatial
        self._spatial = None
        # NCHW -> NHWC before flattening, as ADM flattens TF's NHWC tensor.
        spatial = spatial.permute(0, 2, 3, 1).reshape(spatial.shape[0], -1)
        return {
            "pool": pool.to(torch.float64).cpu().numpy(),
            "logits": logits.to(torch.float64).cpu().numpy(),
            "spatial": spatial.to(torch.float64).cpu().numpy(),
        }


# ---------------------------------------------------------------------------------------------------
# Feature accumulation and statistics
# ---------------------------------------------------------------------------------------------------


class _RunningGaussian:
    """Mean and covariance of streamed rows in float64.

    Chan et al.'s pairwise update of centered sums, so there is no E[xx^T] - mu mu^T cancellation."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None  # sum of outer products of centered rows

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        n_b = rows.shape[0]
        if n_b == 0:
            return
        mean_b = rows.mean(axis=0)
        centered = rows - mean_b
        m2_b = centered.T @ centered
        if self.count == 0:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.count}")
        return self.mean.copy(), self.m2 / (self.count - 1)


class FeatureAccumulator:
    """Streams Inception feature batches: running float64 Gaussian statistics plus the raw rows you keep.

    keep: feature names whose rows are stored (``pool`` for precision/recall/KID, ``logits`` for IS).
    stats: feature names whose mean/covariance are accumulated without storing rows (``pool`` for FID,
    ``spatial`` for sFID), so 50k-image sets stream in bounded memory.
    """

    def __init__(self, keep: Iterable[str] = ("pool", "logits"), stats: Iterable[str] = ("pool", "spatial"),
                 rows_dtype=np.float64):
        self.keep = tuple(keep)
        self.rows_dtype = np.dtype(rows_dtype)
        if not self.keep and not tuple(stats):
            raise ValueError("FeatureAccumulator: nothing to keep or accumulate")
        self._rows: dict[str, list[np.ndarray]] = {name: [] for name in self.keep}
        self._gaussians = {name: _RunningGaussian() for name in stats}
        self.num_images = 0

    def update(self, feats: Mapping[str, np.ndarray]) -> None:
        """Add one batch: a dict of (B, D) arrays as returned by :class:`InceptionFeatures`."""
        sizes = {len(feats[name]) for name in (*self.keep, *self._gaussians)}
        if len(sizes) != 1:
            raise ValueError(f"feature batch has inconsistent row counts {sizes}")
        for name in self.keep:
            self._rows[name].append(np.asarray(feats[name], dtype=self.rows_dtype))
        for name, gaussian in self._gaussians.items():
            gaussian.update(feats[name])
        self.num_images += sizes.pop()

    def stats(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) float64 of the accumulated ``name`` features (unbiased covariance)."""
        return self._gaussians[name].stats()

    def features(self) -> dict[str, np.ndarray]:
        """The kept raw rows, each (N, D) in ``rows_dtype`` (float64 by default)."""
        return {
            name: np.concatenate(rows, axis=0) if rows else np.zeros((0, 0), dtype=self.rows_dtype)
            for name, rows in self._rows.items()
        }

    def result(self) -> dict[str, np.ndarray]:
        """Kept rows plus ``mu``/``sigma`` (pool) and ``mu_s``/``sigma_s`` (spatial) where accumulated; the
        input format of :func:`save_reference_stats` and :func:`compute_generation_metrics`."""
        out = self.features()
        for name, (mu_key, sigma_key) in {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}.items():
            if name in self._gaussians and self._gaussians[name].count >= 2:
                out[mu_key], out[sigma_key] = self.stats(name)
        return out


def _batches_of(images: Iterable[torch.Tensor] | torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Re-batch uint8 images (a (N, 3, H, W) tensor, or an iterable of (B, 3, H, W) / (3, H, W) tensors) into
    batches of at most ``batch_size`` images of one size."""
    if torch.is_tensor(images):
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    buffer: list[torch.Tensor] = []
    buffered = 0
    for item in images:
        item = item.unsqueeze(0) if item.dim() == 3 else item
        if buffer and item.shape[1:] != buffer[0].shape[1:]:
            yield torch.cat(buffer)  # sizes differ: flush so a batch can be stacked
            buffer, buffered = [], 0
        buffer.append(item)
        buffered += item.shape[0]
        while buffered >= batch_size:
            merged = torch.cat(buffer)
            yield merged[:batch_size]
            rest = merged[batch_size:]
            buffer, buffered = ([rest] if rest.shape[0] else []), rest.shape[0]
    if buffer:
        yield torch.cat(buffer)


def extract_features(
    images: Iterable[torch.Tensor] | torch.Tensor,
    extractor: InceptionFeatures,
    batch_size: int = 50,
    keep: Iterable[str] = ("pool", "logits", "spatial"),
    rows_dtype=np.float64,
) -> dict[str, np.ndarray]:
    """Inception features of uint8 images (a (N, 3, H, W) tensor or an iterable of batches / single images).

    Returns the kept features as ``rows_dtype`` arrays (``pool`` (N, 2048), ``logits`` (N, 1008), ``spatial``
    (N, 2023)) plus ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` (see :meth:`FeatureAccumulator.result`).
    ``rows_dtype=np.float32`` halves the kept rows' memory losslessly: the Inception computes in float32.
    """
    accumulator = FeatureAccumulator(keep=keep, rows_dtype=rows_dtype)
    for batch in _batches_of(images, batch_size):
        accumulator.update(extractor(batch))
    if accumulator.num_images == 0:
        raise ValueError("extract_features: no images")
    return accumulator.result()


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D), N >= 2."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"gaussian_stats: expected (N >= 2, D) features, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root through a symmetric eigendecomposition (negative rounding noise clipped)."""
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID when these are Inception statistics).

    |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2)) in float64, without scipy.linalg.sqrtm (a Schur
    method on the non-symmetric product: slow, and wrong or complex on some BLAS builds). Both square roots
    come from symmetric eigendecompositions, and tr((s1 s2)^(1/2)) = tr((s1^(1/2) s2 s1^(1/2))^(1/2)) is
    the sum of the singular values of s1^(1/2) s2^(1/2). Taking singular values of that product rather than
    square roots of the eigenvalues of s1^(1/2) s2 s1^(1/2) avoids squaring the condition number: the error
    stays ~1e-11 for ill-conditioned or singular (N < D) covariances, where the eigenvalue route errs by
    ~1e-5 (measured on 2048-d covariances with a 1e-7..50 spectrum). mu: (D,), sigma: (D, D). Returns a float.
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
    trace_sqrt_product = np.linalg.svd(_sqrt_psd(sigma1) @ _sqrt_psd(sigma2), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product)


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
        raise ValueError(
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
        raise ValueError(f"kid: need at least 2 points per set, got {real.shape[0]} and {fake.shape[0]}")
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
# Reference statistics
# ---------------------------------------------------------------------------------------------------


@dataclass
class ReferenceStats:
    """Statistics of a reference set. ``pool`` (N, 2048) rows are needed for precision/recall and KID;
    ``mu_s``/``sigma_s`` for sFID. Missing parts are None; ``notes`` says why, for the CLI."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None
    num_images: int | None = None
    source: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    subset: dict | None = None  # how a folder/tar reference was cut to size (data.subset_record), None: whole


def save_reference_stats(path: str | os.PathLike, feats: Mapping[str, np.ndarray]) -> Path:
    """Write reference statistics as ``.npz`` (written atomically): ``mu``, ``sigma``, ``mu_s``, ``sigma_s``
    (float64) and ``pool`` rows (float32, as the extractor computes them) for precision/recall and KID.

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
    arrays["num_images"] = np.asarray(len(feats["pool"]), dtype=np.int64)
    arrays["format"] = np.asarray(REFERENCE_FORMAT)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)  # a file object: np.savez would append .npz to a name without it
    return path


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
        raise FileNotFoundError(f"reference file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            arrays = {k: data[k] for k in keys if k != "arr_0"}  # arr_0 (the images) is streamed, never loaded whole
    except ValueError as exc:  # e.g. an object array: numpy refuses to unpickle it (allow_pickle=False)
        raise ValueError(f"{path}: not a reference batch of plain arrays ({one_line(exc)}; pickled objects are "
                         "never loaded); remake it with `ssr evaluate --make-ref`") from None
    if "format" in arrays and str(arrays["format"]) == REFERENCE_FORMAT:
        return ReferenceStats(
            mu=arrays["mu"], sigma=arrays["sigma"], mu_s=arrays.get("mu_s"), sigma_s=arrays.get("sigma_s"),
            pool=arrays["pool"], num_images=int(arrays["num_images"]), source=f"{path} (ssr)",
            subset=json.loads(str(arrays["subset"])) if "subset" in arrays else None,
        )
    # ADM batch
    notes: dict[str, str] = {}
    pool = mu_s = sigma_s = None
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
        raise ValueError(
            f"{path}: neither `mu`/`sigma` statistics nor images `arr_0` with an Inception extractor are available; "
            f"make a reference with `ssr evaluate --make-ref`"
        )
    if mu_s is None:
        notes["spatial"] = f"{path} has no spatial statistics (mu_s/sigma_s)"
    return ReferenceStats(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=pool, num_images=num_images,
                          source=f"{path} (ADM batch)", notes=notes)


# ---------------------------------------------------------------------------------------------------
# Combined metrics
# ---------------------------------------------------------------------------------------------------


def _gaussian_of(feats: Mapping[str, np.ndarray], rows_key: str, mu_key: str, sigma_key: str):
    if mu_key in feats and sigma_key in feats:
        return feats[mu_key], feats[sigma_key]
    if rows_key in feats and len(feats[rows_key]) >= 2:
        return gaussian_stats(feats[rows_key])
    return None


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

    fake_pool = _gaussian_of(fake_feats, "pool", "mu", "sigma")
    out["fid"] = frechet_distance(*fake_pool, ref.mu, ref.sigma)

    fake_spatial = _gaussian_of(fake_feats, "spatial", "mu_s", "sigma_s")
    if ref.mu_s is None or ref.sigma_s is None:
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


@torch.no_grad()
def reconstruction_metrics(real: torch.Tensor, recon: torch.Tensor, lpips_model=None) -> dict[str, np.ndarray]:
    """Per-image PSNR (dB), SSIM and, with ``lpips_model`` (see :func:`load_lpips`), LPIPS of a batch.

    real, recon: (B, 3, H, W) in [-1, 1]. All metrics see the uint8-quantized images (what would be saved),
    LPIPS after mapping them back to [-1, 1]. Returns float64 numpy arrays (B,) under ``psnr``, ``ssim``
    and ``lpips``. rFID is a set-level metric: accumulate :class:`InceptionFeatures` of ``to_uint8(real)``
    and ``to_uint8(recon)`` in two :class:`FeatureAccumulator` and call :func:`frechet_distance`.
    """
    _check_pair(real, recon, "reconstruction_metrics")
    real_u8, recon_u8 = to_uint8(real), to_uint8(recon)
    out = {
        "psnr": _psnr_of_uint8(real_u8, recon_u8).cpu().numpy(),
        "ssim": ssim(real_u8, recon_u8, data_range=255.0).cpu().numpy(),
    }
    if lpips_model is not None:
        param = next(lpips_model.parameters())
        to_unit = lambda u8: (u8.to(device=param.device, dtype=torch.float32) / 127.5 - 1.0)  # noqa: E731
        out["lpips"] = lpips_model(to_unit(real_u8), to_unit(recon_u8)).flatten().to(torch.float64).cpu().numpy()
    return out
