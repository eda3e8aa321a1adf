"""Evaluation you can report: seeded stratified subsets, streamed ADM batches under a memory cap, ADM-readable
reference batches, the protocol record in eval.json and the --compare refusal."""

from __future__ import annotations

import hashlib
import io
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from ssr_cli.data import subset_indices
from ssr_cli.engine.runtime import setup_runtime
from ssr_cli.errors import UserError
from ssr_cli.recipe import from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

INCEPTION_FILE = "inception/pt_inception-2015-12-05-reconstructed-nofc.pth"


def _png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _ten_class_tar(path: Path, per_class: int = 12, size: int = 8, split: str = "test", classes: int = 10) -> Path:
    """A class-sorted tar like CIFAR-10's: members split/<class>/NNNN.png, class k has grey level 20 k."""
    with tarfile.open(path, "w") as tf:
        for k in range(classes):
            for i in range(per_class):
                data = _png_bytes(np.full((size, size, 3), 20 * k + i % 3, dtype=np.uint8))
                info = tarfile.TarInfo(f"{split}/class{k}/{i:04d}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _cfg(tmp_path: Path, **eval_keys):
    return from_dict({
        "run": {"name": "ev", "out_dir": str(tmp_path / "runs"), "device": "cpu", "precision": "fp32"},
        "data": {"source": "builtin", "image_size": 8, "builtin_crops": 10},
        "tokenizer": {"family": "kl-ae", "size": "tiny"},
        "regularizer": {"kind": "none"},
        "eval": eval_keys,
    })


# ---------------------------------------------------------------------------------------------------
# Subsets
# ---------------------------------------------------------------------------------------------------


def test_reference_subset_of_a_ten_class_tar_holds_every_class(tmp_path):
    from ssr_cli.stages.evaluate import image_subset

    tar = _ten_class_tar(tmp_path / "test.tar")
    cfg = _cfg(tmp_path, reference=str(tar), reference_split="test", num_reference_images=30)
    ds, n, record = image_subset(cfg, str(tar), "test", 8, 30)
    counts = np.bincount(ds.labels, minlength=10)
    assert n == 30 and counts.tolist() == [3] * 10  # every class, its share
    assert record == {"rule": "stratified", "seed": 0, "count": 30, "of": 120, "classes": 10, "classes_in_set": 10}
    # The images really are those of their classes (grey level 20 k .. 20 k + 2).
    for i in range(n):
        x, y = ds[(i, None)]
        assert abs(float(x.mean() + 1) * 127.5 - 20 * y) <= 2.5
    # The old rule, first N of the sorted tar: three classes only.
    cfg_first = _cfg(tmp_path, subset="first")
    first, _, rec_first = image_subset(cfg_first, str(tar), "test", 8, 30)
    assert sorted(set(first.labels)) == [0, 1, 2] and rec_first["rule"] == "first" and rec_first["classes"] == 3
    # Another seed, another draw of the same shape.
    other, _, _ = image_subset(_cfg(tmp_path, subset_seed=1), str(tar), "test", 8, 30)
    assert other.indices != ds.indices and np.bincount(other.labels).tolist() == [3] * 10


def test_subset_indices_shares_seeds_and_rules():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    idx = subset_indices(labels, 10, seed=3)
    assert np.bincount(labels[idx]).tolist() == [5, 3, 2] and len(set(idx.tolist())) == 10
    # Largest remainder: 7 of (50, 30, 20) -> quotas 3.5, 2.1, 1.4 -> 3 + 1 (largest remainder .5), 2, 1.
    assert np.bincount(labels[subset_indices(labels, 7, seed=0)]).tolist() == [4, 2, 1]
    assert np.array_equal(idx, subset_indices(labels, 10, seed=3))  # reproducible
    assert not np.array_equal(idx, subset_indices(labels, 10, seed=4))
    uni = subset_indices(labels, 40, seed=0, rule="uniform")
    assert len(set(uni.tolist())) == 40 and np.all(np.diff(uni) > 0)
    assert subset_indices(labels, 5, seed=0, rule="first").tolist() == [0, 1, 2, 3, 4]
    assert subset_indices(labels, 500, seed=0).tolist() == list(range(100))
    with pytest.raises(ValueError, match="stratified"):
        subset_indices(labels, 5, seed=0, rule="balanced")


# ---------------------------------------------------------------------------------------------------
# ADM batches: a reader written from the ADM evaluator's published behaviour
# ---------------------------------------------------------------------------------------------------


def adm_read(path: Path, batch_size: int = 7):
    """What guided-diffusion's evaluations/evaluator.py does with a batch: open ``arr_0.npy`` in the zip (else
    "missing arr_0 in npz file"), read the .npy magic and a 1.0/2.0 header, stream C-order rows of
    ``batch_size`` (images fed as float32 of their uint8 values); statistics from ``np.load(path)["mu"]`` etc.
    when the file has ``mu``."""
    with open(path, "rb") as f, zipfile.ZipFile(f, "r") as zf:
        if "arr_0.npy" not in zf.namelist():
            raise ValueError("missing arr_0 in npz file")
        with zf.open("arr_0.npy", "r") as arr_f:
            version = np.lib.format.read_magic(arr_f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[version]
            shape, fortran, dtype = read_header(arr_f)
            assert not fortran and not dtype.hasobject
            rows, left = [], shape[0]
            while left:
                n = min(batch_size, left)
                data = arr_f.read(int(np.prod((n, *shape[1:]))) * dtype.itemsize)
                rows.append(np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:])))
                left -= n
    images = np.concatenate(rows)
    obj = np.load(path)
    stats = {k: obj[k] for k in ("mu", "sigma", "mu_s", "sigma_s")} if "mu" in obj.files else None
    return images, stats


def test_npz_writer_streams_rows_np_load_and_the_adm_reader_agree(tmp_path):
    from ssr_cli.npz import NpzWriter, iter_npz_batches, npz_array_info

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23, 5, 6, 3), dtype=np.uint8)
    mu, sigma = rng.normal(size=4), np.eye(4)
    with NpzWriter(tmp_path / "b.npz") as w:
        w.add_stream("arr_0", images.shape, np.uint8)
        for i in range(0, 23, 4):
            w.write("arr_0", images[i:i + 4])
        for key, value in {"mu": mu, "sigma": sigma, "mu_s": mu[:2], "sigma_s": sigma[:2, :2]}.items():
            w.add(key, value)
        w.add("count", np.asarray(23))
    with np.load(tmp_path / "b.npz") as f:
        assert f["count"].shape == () and int(f["count"]) == 23
        assert np.array_equal(f["arr_0"], images) and f["arr_0"].dtype == np.uint8 and np.array_equal(f["mu"], mu)
    got, stats = adm_read(tmp_path / "b.npz")
    assert np.array_equal(got, images) and np.array_equal(stats["sigma"], sigma) and stats["mu_s"].shape == (2,)
    assert npz_array_info(tmp_path / "b.npz") == ((23, 5, 6, 3), np.dtype(np.uint8))
    assert [b.shape[0] for b in iter_npz_batches(tmp_path / "b.npz", batch_size=10)] == [10, 10, 3]
    # A writer that fails leaves nothing behind, and a short stream is refused.
    with pytest.raises(UserError, match="3 rows, 4 announced"):
        with NpzWriter(tmp_path / "c.npz") as w:
            w.add_stream("arr_0", (4, 5, 6, 3), np.uint8)
            w.write("arr_0", images[:3])
    assert not (tmp_path / "c.npz").exists() and not list(tmp_path.glob(".c.npz*"))
    # Files without arr_0, or not images: one line saying what was found.
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    with pytest.raises(UserError, match="missing arr_0 in npz file .it holds mu, sigma"):
        next(iter_npz_batches(tmp_path / "stats.npz"))
    np.savez(tmp_path / "f.npz", arr_0=images.astype(np.float32))
    with pytest.raises(UserError, match="uint8 NHWC"):
        next(iter_npz_batches(tmp_path / "f.npz"))


def test_make_ref_file_passes_the_adm_reader(tmp_path, shared_data):
    from ssr_cli.metrics import (
        InceptionFeatures,
        extract_features,
        load_reference,
        to_uint8,
    )
    from ssr_cli.stages.evaluate import make_reference

    tar = _ten_class_tar(tmp_path / "test.tar", per_class=3, size=16, classes=4)
    cfg = _cfg(tmp_path, reference=str(tar), reference_split="test", num_reference_images=4, image_size=16,
               inception_weights=str(shared_data / INCEPTION_FILE))
    rt = setup_runtime("cpu", "fp32")
    path = make_reference(cfg, rt, tmp_path / "ref.npz")
    images, stats = adm_read(path)
    assert images.dtype == np.uint8 and images.shape == (4, 16, 16, 3)
    assert {k: (v.dtype, v.shape) for k, v in stats.items()} == {
        "mu": (np.float64, (2048,)), "sigma": (np.float64, (2048, 2048)),
        "mu_s": (np.float64, (2023,)), "sigma_s": (np.float64, (2023, 2023))}
    # arr_0 holds the stratified subset (one image per class), quantised by rounding, NHWC.
    from ssr_cli.stages.evaluate import image_subset

    ds, _, _ = image_subset(cfg, str(tar), "test", 16, 4)
    expected = to_uint8(torch.stack([ds[(i, None)][0] for i in range(4)])).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(images, expected) and sorted(ds.labels) == list(range(4))
    # The statistics are those of arr_0's images, and our loader reads the file back with its subset record.
    feats = extract_features(torch.from_numpy(images).permute(0, 3, 1, 2), InceptionFeatures(shared_data / INCEPTION_FILE))
    np.testing.assert_allclose(stats["mu"], feats["mu"], rtol=1e-6, atol=1e-8)
    ref = load_reference(path)
    assert ref.num_images == 4 and ref.subset["rule"] == "stratified" and ref.subset["classes"] == 4
    assert ref.pool.shape == (4, 2048) and ref.pool.dtype == np.float32


# ---------------------------------------------------------------------------------------------------
# Streaming under a memory cap
# ---------------------------------------------------------------------------------------------------


class PixelFeatures:
    """A cheap stand-in for the Inception network (a fixed random projection of 4x4-average-pooled pixels),
    so that memory, not Inception's CPU time, is what the test exercises; same call contract."""

    fc_is_zero = True

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.proj = {"pool": torch.randn(48, 12, generator=g, dtype=torch.float64),
                     "spatial": torch.randn(48, 6, generator=g, dtype=torch.float64),
                     "logits": torch.randn(48, 10, generator=g, dtype=torch.float64)}

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.double(), 4).flatten(1) / 255.0
        return {k: (pooled @ p).float().double().numpy() for k, p in self.proj.items()}


def _fid_direct(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * covmean))


def test_generation_streams_samples_larger_than_a_memory_cap(tmp_path):
    from ssr_cli.stages.evaluate import generation

    cap = 4 * 2**20  # bytes of Python/numpy heap the evaluation may hold at its peak
    rng = np.random.default_rng(0)
    n, side = 160, 128  # 7.9 MB per batch: twice the cap
    base = rng.integers(0, 256, (n, 1, 1, 3), dtype=np.uint8)
    samples = np.clip(base + rng.integers(0, 40, (n, side, side, 3)), 0, 255).astype(np.uint8)
    reference = np.clip(base[::-1] + rng.integers(0, 60, (n, side, side, 3)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples, arr_1=np.arange(n) % 10)
    np.savez(tmp_path / "ref.npz", arr_0=reference)
    assert (tmp_path / "samples.npz").stat().st_size > cap and (tmp_path / "ref.npz").stat().st_size > cap
    extractor = PixelFeatures()
    truth_fake = extractor(torch.from_numpy(samples).permute(0, 3, 1, 2))
    truth_real = extractor(torch.from_numpy(reference).permute(0, 3, 1, 2))
    del samples, reference
    cfg = _cfg(tmp_path, reference=str(tmp_path / "ref.npz"), batch_size=8, kid_subset_size=50)
    tracemalloc.start()
    try:
        with np.load(tmp_path / "samples.npz") as f:
            f["arr_0"]  # what evaluation did before: the whole array at once
        _, loading_all = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = generation(cfg, setup_runtime("cpu", "fp32"), tmp_path / "samples.npz", inception=extractor)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert loading_all > cap > peak, (loading_all, peak)
    assert result["num_images"] == n and result["reference_images"] == n
    assert result["fid"] == pytest.approx(_fid_direct(truth_fake["pool"], truth_real["pool"]), rel=1e-6)
    assert result["sfid"] == pytest.approx(_fid_direct(truth_fake["spatial"], truth_real["spatial"]), rel=1e-6)
    protocol = result["protocol"]
    assert protocol["num_samples"] == n and protocol["labels"] == "balanced"  # from arr_1: 16 per class
    assert protocol["label_counts"] == {"classes": 10, "min": 16, "max": 16}
    assert protocol["reference_sha256"] == hashlib.sha256((tmp_path / "ref.npz").read_bytes()).hexdigest()
    assert protocol["sampler"] == "unknown" and "samples.json" in protocol["note"]
    assert protocol["evaluator"].startswith("ssr ") and protocol["reference_subset"] is None


# ---------------------------------------------------------------------------------------------------
# Sampling record, quantisation, protocol comparison, rFID's reference
# ---------------------------------------------------------------------------------------------------


def test_write_npz_streams_pngs_and_records_the_sampling_protocol(tmp_path):
    from ssr_cli.stages.evaluate import samples_protocol
    from ssr_cli.stages.sample import sampling_protocol, write_npz

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 6, 5, 3), dtype=np.uint8)
    (tmp_path / "png").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "png" / f"{i:06d}.png")
    cfg = from_dict({"sample": {"labels": "uniform", "quantize": "truncate", "cfg_scale": 1.5, "steps": 12}})
    labels = [3, 1, 4, 1, 5, 9, 2]
    path = write_npz(tmp_path, 7, labels, protocol=sampling_protocol(cfg))
    images_adm, stats = adm_read(path)
    assert np.array_equal(images_adm, images) and stats is None
    with np.load(path) as f:
        assert f["arr_1"].tolist() == labels and f["arr_1"].dtype == np.int64
    record = samples_protocol(path, np.asarray(labels))
    assert record["labels"] == "uniform" and record["quantize"] == "truncate" and record["cfg_scale"] == 1.5
    assert record["steps"] == 12 and record["cfg_interval"] == [0.0, 1.0] and "note" not in record


def test_quantisation_round_and_adm_truncate():
    from ssr_cli.metrics import to_uint8

    x = torch.tensor([-1.0, -0.999, 0.0, 0.3, 0.999, 1.0, 1.2])
    scaled = (x.double() + 1) * 127.5  # 0, 0.1275, 127.5, 165.75, 254.87, 255, 280.5
    assert to_uint8(x).tolist() == [0, 0, 128, 166, 255, 255, 255]
    assert to_uint8(x, "truncate").tolist() == [0, 0, 127, 165, 254, 255, 255]
    assert to_uint8(x, "truncate").tolist() == scaled.floor().clamp(0, 255).long().tolist()
    with pytest.raises(ValueError, match="round"):
        to_uint8(x, "nearest")


def _result(**protocol):
    base = {"num_samples": 50000, "labels": "balanced", "sampler": "euler", "steps": 250, "cfg_scale": 1.0,
            "cfg_interval": [0.0, 1.0], "seed": 0, "quantize": "round", "reference": "a/ref.npz",
            "reference_sha256": "ab" * 32, "reference_subset": None, "evaluator": "ssr 0.1.0"}
    return {"generation": {"fid": 3.0, "protocol": {**base, **protocol}}}


def test_compare_refuses_mixed_protocols_unless_told():
    from ssr_cli.stages.evaluate import check_protocols

    same = {"a": _result(), "b": _result(seed=7, reference="b/ref.npz")}  # a seed or a path (same hash) is no change
    assert check_protocols(same) == []
    mixed = {"a": _result(), "b": _result(labels="uniform", quantize="truncate")}
    with pytest.raises(UserError, match=r"generation labels .a: \"balanced\", b: \"uniform\".*quantize.*"
                                        r"--mixed-protocols"):
        check_protocols(mixed)
    assert len(check_protocols(mixed, allow_mixed=True)) == 2
    other_ref = {"a": _result(), "b": _result(reference_sha256="cd" * 32)}
    assert "reference_sha256" in check_protocols(other_ref, allow_mixed=True)[0]
    no_numbers = {"a": _result(), "b": {"generation": {"unavailable": {"all": "no samples"}}}}
    assert check_protocols(no_numbers) == []


def test_rfid_reference_is_the_reconstructions_own_originals():
    from ssr_cli.metrics import FeatureAccumulator, frechet_distance
    from ssr_cli.stages.evaluate import paired_rfid

    rng = np.random.default_rng(0)
    real, recon = FeatureAccumulator(keep=(), stats=("pool",)), FeatureAccumulator(keep=(), stats=("pool",))
    a, b = rng.normal(size=(20, 3)), rng.normal(size=(20, 3)) + 0.5
    real.update({"pool": a})
    recon.update({"pool": b})
    assert paired_rfid(real, recon, list(range(20)), list(range(20))) == pytest.approx(
        frechet_distance(*recon.stats("pool"), *real.stats("pool")))
    assert paired_rfid(real, recon, list(range(20)), list(range(20))) == pytest.approx(_fid_direct(b, a), rel=1e-6)
    with pytest.raises(RuntimeError, match="originals of exactly the reconstructed images"):
        paired_rfid(real, recon, list(range(20)), list(range(1, 21)))


def test_tables_state_labels_quantisation_and_reference():
    from ssr_cli.engine.progress import console
    from ssr_cli.stages.evaluate import print_comparison, print_table

    result = _result(reference_subset={"rule": "stratified", "count": 1000, "of": 10000, "classes": 10})
    width, console.width = console.width, 200
    try:
        with console.capture() as cap:
            print_table(result)
        out = cap.get()
        with console.capture() as cap:
            print_comparison({"a": result, "b": _result()})
        compared = cap.get()
    finally:
        console.width = width
    assert "sample labels" in out and "balanced" in out and "quantisation" in out and "round" in out
    assert "stratified 1000/10000, 10 classes" in out and "sha256 abababababab" in out
    assert "generation sample labels" in compared and "generation subset" in compared  # b: a whole reference
