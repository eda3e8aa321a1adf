"""Inception-v3 features of images and their Gaussian statistics (the inputs of FID / sFID / IS / P&R / KID).

Inception features follow the protocol of ADM's evaluator (openai/guided-diffusion,
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

Statistics (means, covariances) are computed in float64.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from ssr_cli.errors import UserFileNotFoundError, UserValueError
from ssr_cli.models.weights import read_torch_tensors

SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv: 17 * 17 * 7 = 2023 features


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
            raise UserFileNotFoundError(
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
        self.weights_path = weights_path
        self.cache_id = f"{self.device.type}|{internal_dtype}|torch {torch.__version__}"
        """What else than the weights and the batch makes the rows (feature caches key on it)."""
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
            raise UserValueError(f"need at least 2 feature vectors for a covariance, have {self.count}")
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


class PoolFeatureCache:
    """Inception ``pool`` rows of fixed uint8 image sets, kept on disk between runs.

    The same real images are scored again and again: every ``ssr diffusability`` run of a study ranks its
    samples and interpolations against one pool of data images, and on a CPU their Inception pass costs more
    than the rest of the run. Rows are keyed by the SHA-256 of the images' bytes and shape, of the weights
    file, of the extractor's device, precision and torch version, and of the batch size (batches are what the
    extractor sees, so a cached row equals a recomputed one bit for bit); ``folder=None`` turns the cache off. A
    damaged cache file is recomputed, not fatal. Rows that are float32 values (the Inception's) are stored as
    float32, losslessly."""

    def __init__(self, folder: str | os.PathLike | None, weights_path: str | os.PathLike, batch_size: int,
                 extractor_id: str = "") -> None:
        self.folder = None if folder is None else Path(folder)
        self.weights_path = Path(weights_path)
        self.batch_size = int(batch_size)
        self.extractor_id = extractor_id
        """The extractor's device, precision and torch version (``InceptionFeatures.cache_id``)."""

    @classmethod
    def of(cls, folder: str | os.PathLike | None, extractor: InceptionFeatures, batch_size: int) -> PoolFeatureCache:
        return cls(folder, extractor.weights_path, batch_size, extractor.cache_id)

    def key(self, images: torch.Tensor) -> str:
        import hashlib

        from ssr_cli.inputs import file_sha256

        h = hashlib.sha256()
        h.update(f"pool|{file_sha256(self.weights_path)}|{self.extractor_id}|{self.batch_size}|"
                 f"{tuple(images.shape)}|".encode())
        h.update(images.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    def rows(self, images: torch.Tensor, compute) -> np.ndarray:
        """``compute(images)`` (float64 rows (N, 2048)), read from the cache when these images were scored."""
        if self.folder is None:
            return compute(images)
        path = self.folder / f"pool_{self.key(images)}.npy"
        if path.is_file():
            try:
                rows = np.load(path, allow_pickle=False)
                if isinstance(rows, np.ndarray) and rows.shape == (images.shape[0], 2048):
                    return rows.astype(np.float64)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # truncated, empty, or not an .npy
                pass
            import warnings

            warnings.warn(f"Inception feature cache {path} is damaged; recomputing it", stacklevel=2)
        rows = compute(images)
        from ssr_cli.engine.atomic import atomic_write

        # The Inception computes in float32: its float64 rows are float32 values, kept in half the bytes.
        small = rows.astype(np.float32)
        stored = small if np.array_equal(small.astype(rows.dtype), rows) else rows

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, stored, allow_pickle=False)

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
        return rows


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D), N >= 2."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"gaussian_stats: expected (N >= 2, D) features, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)
