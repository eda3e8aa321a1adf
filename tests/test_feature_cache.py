"""The on-disk cache of Inception pool rows: a hit returns exactly what a recomputation gives, a different image set,
weights file or batch size misses, and a damaged file is recomputed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssr_cli.metrics import PoolFeatureCache


def _counting_features():
    calls = []

    def compute(u8: torch.Tensor) -> np.ndarray:
        calls.append(u8.shape[0])
        x = u8.double().flatten(1)
        # a deterministic stand-in for the Inception: 2048 fixed projections of the pixels
        proj = torch.Generator().manual_seed(0)
        w = torch.randn(x.shape[1], 2048, generator=proj, dtype=torch.float64)
        return (x @ w).numpy()

    return compute, calls


@pytest.fixture()
def weights(tmp_path):
    path = tmp_path / "inception.pth"
    path.write_bytes(b"weights v1")
    return path


def _images(seed: int, n: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_hit_equals_recomputation_and_skips_the_extractor(tmp_path, weights):
    compute, calls = _counting_features()
    cache = PoolFeatureCache(tmp_path / "cache", weights, batch_size=4)
    first = cache.rows(_images(0), compute)
    again = PoolFeatureCache(tmp_path / "cache", weights, batch_size=4).rows(_images(0), compute)
    assert calls == [6]
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(again, compute(_images(0)))


def test_other_images_weights_or_batch_size_miss(tmp_path, weights):
    compute, calls = _counting_features()
    folder = tmp_path / "cache"
    PoolFeatureCache(folder, weights, 4).rows(_images(0), compute)
    other = _images(0)
    other[0, 0, 0, 0] ^= 1  # one pixel, one bit
    PoolFeatureCache(folder, weights, 4).rows(other, compute)
    PoolFeatureCache(folder, weights, 5).rows(_images(0), compute)
    weights.write_bytes(b"other weights, another length")
    PoolFeatureCache(folder, weights, 4).rows(_images(0), compute)
    assert len(calls) == 4
    assert len(list(folder.glob("pool_*.npy"))) == 4


def test_damaged_file_is_recomputed(tmp_path, weights):
    compute, calls = _counting_features()
    cache = PoolFeatureCache(tmp_path / "cache", weights, 4)
    good = cache.rows(_images(1), compute)
    (path,) = (tmp_path / "cache").glob("pool_*.npy")
    path.write_bytes(b"not an array")
    with pytest.warns(UserWarning, match="damaged"):
        np.testing.assert_array_equal(cache.rows(_images(1), compute), good)
    assert calls == [6, 6]
    np.testing.assert_array_equal(cache.rows(_images(1), compute), good)
    assert calls == [6, 6]


def test_float32_rows_are_stored_in_half_the_bytes_and_read_back_exactly(tmp_path, weights):
    def compute(u8: torch.Tensor) -> np.ndarray:  # what the Inception gives: float32 values as float64
        return np.repeat(u8.flatten(1)[:, :1].numpy() / 7.0, 2048, axis=1).astype(np.float32).astype(np.float64)

    cache = PoolFeatureCache(tmp_path / "cache", weights, 4)
    first = cache.rows(_images(3), compute)
    (path,) = (tmp_path / "cache").glob("pool_*.npy")
    assert np.load(path).dtype == np.float32
    again = cache.rows(_images(3), compute)
    assert again.dtype == np.float64 and np.array_equal(again, first)


def test_extractor_identity_is_part_of_the_key(tmp_path, weights):
    compute, calls = _counting_features()
    for extractor_id in ("cpu|float32|torch 2", "cuda|float32|torch 2", "cpu|float32|torch 2"):
        PoolFeatureCache(tmp_path / "cache", weights, 4, extractor_id).rows(_images(0), compute)
    assert calls == [6, 6]


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 not an npz either"])
def test_empty_or_foreign_cache_file_is_recomputed(tmp_path, weights, damage):
    compute, calls = _counting_features()
    cache = PoolFeatureCache(tmp_path / "cache", weights, 4)
    good = cache.rows(_images(1), compute)
    (path,) = (tmp_path / "cache").glob("pool_*.npy")
    path.write_bytes(damage)
    with pytest.warns(UserWarning, match="damaged"):
        np.testing.assert_array_equal(cache.rows(_images(1), compute), good)
    assert calls == [6, 6]


def test_no_folder_means_no_cache(tmp_path, weights):
    compute, calls = _counting_features()
    cache = PoolFeatureCache(None, weights, 4)
    cache.rows(_images(2), compute)
    cache.rows(_images(2), compute)
    assert calls == [6, 6] and not any(tmp_path.glob("**/*.npy"))


def test_evaluate_rfid_is_the_same_from_the_cache(tmp_path, shared_data, monkeypatch):
    """`ssr evaluate`'s originals go through the cache: a second evaluation of the same images runs the Inception on
    the reconstructions only and gives the same rFID to the last bit."""
    from pathlib import Path

    from ssr_cli.engine.runtime import Runtime
    from ssr_cli.metrics.inception import InceptionFeatures
    from ssr_cli.models.weights import save_weights
    from ssr_cli.recipe import load
    from ssr_cli.stages.common import build_tokenizer
    from ssr_cli.stages.evaluate import reconstruction

    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"
    inception = shared_data / "inception" / "pt_inception-2015-12-05-reconstructed-nofc.pth"
    if not inception.is_file():
        pytest.skip(f"{inception} is not in the shared data")
    cfg = load(quickstart, [f'run.out_dir="{tmp_path}"', "data.image_size=16", "data.builtin_crops=6",
                            "eval.num_images=6", "eval.batch_size=4", 'eval.subset="first"',
                            f'eval.inception_weights="{inception}"'])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        weights = save_weights(build_tokenizer(cfg, weights=None), tmp_path / "tok.safetensors")
    calls = []
    original = InceptionFeatures.__call__

    def counting(self, images):
        calls.append(images.shape[0])
        return original(self, images)

    monkeypatch.setattr(InceptionFeatures, "__call__", counting)
    first = reconstruction(cfg, Runtime(device=torch.device("cpu")), weights=str(weights))
    assert sum(calls) == 12  # 6 originals + 6 reconstructions
    assert len(list((tmp_path / ".cache" / "inception").glob("pool_*.npy"))) == 2  # one file per batch (4 + 2)
    calls.clear()
    second = reconstruction(cfg, Runtime(device=torch.device("cpu")), weights=str(weights))
    assert sum(calls) == 6
    assert second["rfid"] == first["rfid"] and np.isfinite(first["rfid"])
