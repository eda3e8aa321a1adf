"""Tests of ssr_cli.metrics against independent truths: scikit-image, the lpips package, torch-fidelity,
closed forms, brute-force computations, and real images from ../shared/data."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg, special
from scipy.spatial.distance import cdist
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ssr_cli import metrics as M

import real_images  # tests/real_images.py: the FID tests' real images and their committed features

# one xdist group: under `--dist loadgroup` the module-scoped Inception and real-image features are made once
pytestmark = pytest.mark.xdist_group("metrics")

# Same location as conftest.SHARED_DATA; module-scoped fixtures cannot use the function-scoped `shared_data`.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
INCEPTION_FILE = "inception/pt_inception-2015-12-05-reconstructed-nofc.pth"
ALEX_FILE = "lpips/alexnet-owt-7be5be79.features-only.pth"


def _shared_or_skip() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


def _hwc(u8: torch.Tensor) -> np.ndarray:
    return u8.permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------------------------- PSNR / SSIM


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-1.5, -1.0, -1.0 + 0.5 / 127.5 + 1e-4, 0.0, 1.0, 2.0])
    assert M.to_uint8(x).tolist() == [0, 0, 1, 128, 255, 255]  # 127.5 rounds half to even: 128


def test_psnr_matches_skimage_and_closed_form():
    x = torch.rand(3, 3, 24, 20) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    ours = M.psnr_uint8(x, y)
    xu, yu = M.to_uint8(x), M.to_uint8(y)
    expected = [peak_signal_noise_ratio(_hwc(xu[i]), _hwc(yu[i]), data_range=255) for i in range(3)]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-10)

    # A constant offset of d grey levels (no clipping) has MSE d^2: PSNR = 20 log10(255 / d).
    base = torch.randint(10, 240, (2, 3, 16, 16)).to(torch.float64)
    for d in (1, 5):
        psnr = M.psnr_uint8(base / 127.5 - 1, (base + d) / 127.5 - 1)
        np.testing.assert_allclose(psnr.numpy(), 20 * np.log10(255 / d), atol=1e-9)
    assert torch.isinf(M.psnr_uint8(x, x)).all()


def test_ssim_matches_skimage():
    gen = torch.Generator().manual_seed(1)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(3, 3, 40, 37, generator=gen), 5, stride=1, padding=2)
    x_u8 = (smooth * 255).round().to(torch.uint8)
    y_u8 = (smooth * 255 + 25 * torch.randn(smooth.shape, generator=gen)).round().clamp(0, 255).to(torch.uint8)
    ours = M.ssim(x_u8, y_u8, data_range=255.0)
    expected = [
        structural_similarity(
            _hwc(x_u8[i]), _hwc(y_u8[i]), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=255, channel_axis=-1,
        )
        for i in range(3)
    ]
    assert 0.05 < min(expected) < max(expected) < 0.95  # a non-trivial regime
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(M.ssim(x_u8, x_u8).numpy(), 1.0, atol=1e-12)

    # The [-1, 1] entry point quantizes first.
    x, y = x_u8.double() / 127.5 - 1, y_u8.double() / 127.5 - 1
    np.testing.assert_allclose(M.ssim_uint8(x, y).numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="window"):
        M.ssim(x_u8[..., :10, :10], y_u8[..., :10, :10])


# --------------------------------------------------------------------------------------------------- LPIPS


def test_lpips_matches_package_with_independently_loaded_weights(shared_data):
    import lpips
    import torchvision

    ours = M.load_lpips("alex", shared_data / ALEX_FILE)

    # Independent route: torchvision AlexNet gets the file by its own key names, then its layers are put
    # into the package's LPIPS trunk by module replacement (no key remapping involved).
    alexnet = torchvision.models.alexnet(weights=None)
    missing, unexpected = alexnet.load_state_dict(
        torch.load(shared_data / ALEX_FILE, weights_only=True, map_location="cpu"), strict=False
    )
    assert not unexpected and all(k.startswith("classifier.") for k in missing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of lpips' `pretrained=` argument
        reference = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    for slice_module in (getattr(reference.net, f"slice{i}") for i in range(1, 6)):
        for name in list(slice_module._modules):
            slice_module._modules[name] = alexnet.features[int(name)]
    reference.eval()

    x = torch.rand(3, 3, 64, 64) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        expected = reference(x, y).flatten()
        got = ours(x, y).flatten()
        assert torch.all(expected > 0.01)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert float(ours(x, x).abs().max()) == 0.0

    # Frozen weights, but differentiable in the inputs (used as a training loss too); stays in eval mode.
    ours.train()
    assert not ours.training and not any(m.training for m in ours.modules())
    assert not any(p.requires_grad for p in ours.parameters())
    x_var = x.clone().requires_grad_(True)
    ours(x_var, y).sum().backward()
    assert x_var.grad is not None and x_var.grad.abs().sum() > 0


def test_lpips_vgg_backbone_mapping(tmp_path):
    # No VGG weights ship offline: write random torchvision-layout VGG16 features (plus a classifier entry,
    # as in the full torchvision file) and check each tensor lands in the lpips trunk at its layer.
    import torchvision

    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # VGG16's `features`
    state = {f"features.{k}": v.normal_() for k, v in features.state_dict().items()}
    state["classifier.0.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "vgg16.pth")
    model = M.load_lpips("vgg", tmp_path / "vgg16.pth")
    trunk = {name.split(".", 1)[1]: tensor for name, tensor in model.net.state_dict().items()}
    assert len(trunk) == 26
    for key, tensor in trunk.items():
        assert torch.equal(tensor, state[f"features.{key}"]), key
    state["features.99.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="features.99"):
        M.load_lpips("vgg", tmp_path / "bad.pth")


def test_lpips_missing_weights_is_actionable(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"eval\.lpips_weights.*loss\.lpips_weights"):
        M.load_lpips("alex", tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="net"):
        M.load_lpips("resnet", tmp_path / "nope.pth")


# ------------------------------------------------------------------------------------------ Fréchet distance


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    dim = 12
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    # Diagonal covariances, then the same pair rotated by a common orthogonal Q (commuting covariances).
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    rotated = M.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(closed, rel=1e-10)
    # One dimension: (m1 - m2)^2 + (s1 - s2)^2.
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_non_commuting_matches_independent_computations():
    rng = np.random.default_rng(1)
    dim = 30
    a1, a2 = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    s1, s2 = a1 @ a1.T / dim + 0.5 * np.eye(dim), a2 @ a2.T / dim + 0.5 * np.eye(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 0.1
    base = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
    # (1) scipy's sqrtm of the product, fine on this well-conditioned pair; (2) the eigenvalues of s1 s2
    # (real and positive, as s1 s2 is similar to a PSD matrix).
    by_sqrtm = base - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real
    by_eigvals = base - 2 * np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real))
    ours = M.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(by_sqrtm, rel=1e-9)
    assert ours == pytest.approx(by_eigvals, rel=1e-9)
    with pytest.raises(ValueError, match="shapes"):
        M.frechet_distance(mu1, s1, mu2[:-1], s2[:-1, :-1])


def test_frechet_distance_ill_conditioned_commuting_pair():
    # Spectra spanning 1e-7..50 (like Inception pool covariances): exact closed form via a common basis.
    rng = np.random.default_rng(7)
    dim = 512
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a = np.exp(rng.uniform(np.log(1e-7), np.log(50.0), dim))
    b = a * np.exp(0.1 * rng.normal(size=dim))
    closed = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    zeros = np.zeros(dim)
    assert M.frechet_distance(zeros, (q * a) @ q.T, zeros, (q * b) @ q.T) == pytest.approx(closed, abs=1e-9)
    assert abs(M.frechet_distance(zeros, (q * a) @ q.T, zeros, (q * a) @ q.T)) < 1e-9


def test_frechet_distance_of_a_singular_covariance_equals_the_exact_rows_route():
    """Covariances of fewer samples than dimensions (sFID of a small set) have eigenvalues that are rounding noise
    around 0; the covariance route must not count them: it equals the rows route, exact in the samples' span
    (full square roots of the noisy spectrum erred by ~4e-9 relative here)."""
    rng = np.random.default_rng(3)
    dim = 256
    x = rng.normal(size=(40, dim)) * np.exp(rng.uniform(-4, 2, dim)) + 1.0  # rank 39 < 256
    y = rng.normal(size=(600, dim)) * np.exp(rng.uniform(-4, 2, dim))  # full rank
    exact = M.frechet_distance_of_rows(x, y)
    assert M.frechet_distance(*M.gaussian_stats(x), *M.gaussian_stats(y)) == pytest.approx(exact, rel=1e-11)
    assert M.frechet_distance(*M.gaussian_stats(x[:20]), *M.gaussian_stats(x[20:])) == pytest.approx(
        M.frechet_distance_of_rows(x[:20], x[20:]), rel=1e-11)


def test_fid_of_a_set_with_itself_is_zero_even_rank_deficient():
    rng = np.random.default_rng(2)
    for n in (400, 40):  # 40 < 64 dims: singular covariance
        feats = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) + 3.0
        mu, sigma = M.gaussian_stats(feats)
        assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)


def test_frechet_distance_of_rows_is_the_covariance_route_and_a_closed_form():
    rng = np.random.default_rng(4)
    dim = 96
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    for n1, n2 in ((40, 70), (300, 25), (150, 150)):  # singular covariances on one or both sides, and neither
        x = rng.normal(size=(n1, dim)) @ mix + 1.5
        y = rng.exponential(size=(n2, dim)) @ mix
        independent = M.frechet_distance(*M.gaussian_stats(x), *M.gaussian_stats(y))
        # the covariance route takes square roots of rounding-noise eigenvalues of the singular side (~1e-9)
        assert M.frechet_distance_of_rows(x, y) == pytest.approx(independent, rel=1e-8)
        if n1 < dim and n2 < dim:  # scipy's sqrtm on the product, an implementation we share nothing with
            (m1, s1), (m2, s2) = M.gaussian_stats(x), M.gaussian_stats(y)
            by_sqrtm = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real
            assert M.frechet_distance_of_rows(x, y) == pytest.approx(by_sqrtm, rel=1e-6)
    # 40-digit truth (mpmath): the covariances and the eigenvalues of s1 s2, on a small singular pair.
    import mpmath

    with mpmath.workdps(40):
        x, y = rng.normal(size=(6, 16)) + 0.5, rng.normal(size=(11, 16)) @ mix[:16, :16]
        m1, m2 = (mpmath.matrix([[sum(r[j] for r in z) / len(z)] for j in range(16)]) for z in (x, y))

        def cov(z, m):
            c = mpmath.matrix(z.tolist()) - mpmath.ones(len(z), 1) * m.T
            return c.T * c / (len(z) - 1)

        s1, s2 = cov(x, m1), cov(y, m2)
        eig = mpmath.eig(s1 * s2, left=False, right=False)
        truth = (sum((m1[j] - m2[j]) ** 2 for j in range(16)) + sum(s1[j, j] + s2[j, j] for j in range(16))
                 - 2 * sum(mpmath.sqrt(max(mpmath.re(e), 0)) for e in eig))
    assert M.frechet_distance_of_rows(x, y) == pytest.approx(float(truth), rel=1e-12)
    # A set against itself shifted by v: same covariance, so the distance is |v|^2 exactly.
    x = rng.normal(size=(30, dim)) @ mix
    shift = rng.normal(size=dim)
    assert M.frechet_distance_of_rows(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-10)
    assert abs(M.frechet_distance_of_rows(x, x)) < 1e-10 * float(np.trace(M.gaussian_stats(x)[1]))
    with pytest.raises(ValueError, match="at least 2 rows"):
        M.frechet_distance_of_rows(x[:1], x)


def test_feature_accumulator_streams_exact_statistics():
    rng = np.random.default_rng(3)
    pool, spatial = rng.normal(5.0, 2.0, size=(103, 16)), rng.exponential(size=(103, 9))
    acc = M.FeatureAccumulator(keep=("pool",), stats=("pool", "spatial"))
    for start, stop in ((0, 1), (1, 40), (40, 41), (41, 103)):
        acc.update({"pool": pool[start:stop], "spatial": spatial[start:stop]})
    out = acc.result()
    assert acc.num_images == 103
    np.testing.assert_array_equal(out["pool"], pool)
    np.testing.assert_allclose(out["mu"], pool.mean(0), rtol=1e-12)
    np.testing.assert_allclose(out["sigma"], np.cov(pool, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["sigma_s"], np.cov(spatial, rowvar=False), rtol=1e-10, atol=1e-12)
    assert "spatial" not in out


# ------------------------------------------------------------------------------------------ Inception Score


def _is_direct(logits: np.ndarray, bounds) -> list[float]:
    p = special.softmax(logits, axis=1)
    scores = []
    for start, stop in bounds:
        part = p[start:stop]
        kl = np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), axis=1)
        scores.append(float(np.exp(kl.mean())))
    return scores


def test_inception_score_matches_direct_computation():
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=3.0, size=(230, 50))
    mean, std = M.inception_score(logits, split_size=100)  # ADM-style chunks: 100, 100, 30
    direct = _is_direct(logits, [(0, 100), (100, 200), (200, 230)])
    assert mean == pytest.approx(np.mean(direct), rel=1e-10)
    assert std == pytest.approx(np.std(direct), rel=1e-8)
    mean, std = M.inception_score(logits, splits=4)  # improved-GAN style: 57, 58, 57, 58
    direct = _is_direct(logits, [(0, 57), (57, 115), (115, 172), (172, 230)])
    assert mean == pytest.approx(np.mean(direct), rel=1e-10)

    # Confident, balanced predictions over K classes score K; identical predictions score 1.
    classes = 10
    confident = np.full((classes * 20, classes), -40.0)
    confident[np.arange(classes * 20), np.arange(classes * 20) % classes] = 40.0
    assert M.inception_score(confident)[0] == pytest.approx(classes, rel=1e-9)
    assert M.inception_score(np.tile(logits[:1], (50, 1)))[0] == pytest.approx(1.0, abs=1e-12)


def test_inception_score_unavailable_for_constant_logits():
    with pytest.raises(M.MetricUnavailable) as info:
        M.inception_score(np.zeros((20, 1008)))
    assert info.value.metric == "inception_score" and "all zeros" in info.value.reason


# ------------------------------------------------------------------------------------ precision/recall, KID


def _pr_brute_force(real, fake, k):
    def radii(x):
        return np.sort(cdist(x, x), axis=1)[:, k]

    r_real, r_fake = radii(real), radii(fake)
    precision = np.mean((cdist(fake, real) <= r_real[None]).any(axis=1))
    recall = np.mean((cdist(real, fake) <= r_fake[None]).any(axis=1))
    return precision, recall


def test_precision_recall_identical_far_and_brute_force():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(120, 32))
    assert M.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert M.precision_recall(real, real + 1000.0, k=3) == (0.0, 0.0)

    # Half the fake points are real points, half are far away: precision is exactly 1/2.
    fake = np.concatenate([real[:50], rng.normal(size=(50, 32)) + 1000.0])
    assert M.precision_recall(real, fake, k=3)[0] == 0.5

    # Partly overlapping sets against a brute-force cdist implementation; batching must not matter.
    fake = 1.1 * np.random.default_rng(7).normal(size=(90, 32)) + 0.6
    expected = _pr_brute_force(real, fake, 3)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95
    assert M.precision_recall(real, fake, k=3) == pytest.approx(expected, abs=1e-12)
    assert M.precision_recall(real, fake, k=3, batch_size=7) == pytest.approx(expected, abs=1e-12)
    assert M.precision_recall(real, fake, k=5) == pytest.approx(_pr_brute_force(real, fake, 5), abs=1e-12)


def test_kid_matches_torch_fidelity_and_behaves():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(80, 64)), rng.normal(size=(80, 64)) + 0.5
    # One subset holding every point: the unbiased MMD^2 does not depend on the draw order.
    ours, _ = M.kid(real, fake, subsets=1, subset_size=80)
    theirs = kid_features_to_metric(
        torch.from_numpy(real), torch.from_numpy(fake), kid_subsets=1, kid_subset_size=80,
        kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=0, verbose=False,
    )["kernel_inception_distance_mean"]
    assert ours == pytest.approx(theirs, rel=1e-10)

    same_mean, same_std = M.kid(real, rng.normal(size=(80, 64)), subsets=20, subset_size=40)
    far_mean, _ = M.kid(real, fake, subsets=20, subset_size=40)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert far_mean > 10 * abs(same_mean) and far_mean > 0.05


# ------------------------------------------------------------------------------- Inception and real images


@pytest.fixture(scope="module")
def inception():
    return M.InceptionFeatures(_shared_or_skip() / INCEPTION_FILE)


def test_inception_features_shapes_and_spatial_tensor(inception):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    assert inception.fc_is_zero and M.fc_is_zero(SHARED_DATA / INCEPTION_FILE)
    images = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8)
    feats = inception(images)
    assert feats["pool"].shape == (2, 2048) and feats["logits"].shape == (2, 1008)
    assert feats["spatial"].shape == (2, 17 * 17 * 7)
    assert all(v.dtype == np.float64 for v in feats.values())
    assert np.all(feats["logits"] == 0)  # the zero fc layer

    # Recompute ADM's mixed_6/conv (Mixed_6d's 1x1 branch after BN+ReLU) by walking the network by hand,
    # in the plain NCHW layout: first 7 channels flattened in NHWC order.
    net = inception.model
    with torch.no_grad():
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"):
            x = getattr(net, name)(x.contiguous())
        branch = net.Mixed_6d.branch1x1.conv(x)
        branch = torch.relu(net.Mixed_6d.branch1x1.bn(branch))
    expected = branch[:, :7].permute(0, 2, 3, 1).reshape(2, -1).double().numpy()
    np.testing.assert_allclose(feats["spatial"], expected, rtol=1e-4, atol=1e-4)
    assert feats["spatial"].min() >= 0 and feats["spatial"].max() > 0

    # Pool features equal torch-fidelity's own extractor used plainly (NCHW, no hook).
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    plain = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(SHARED_DATA / INCEPTION_FILE)
    )
    with torch.no_grad():
        (pool,) = plain(images)
    np.testing.assert_allclose(feats["pool"], pool.double().numpy(), rtol=1e-4, atol=1e-5)


N_PER_SET = real_images.N_PER_SET
# FID is strongly biased upwards at small n (2048-d covariances from 150 samples). Measured CIFAR-10 test
# half vs half / CIFAR-10 vs Kodak crops: n=150: ~145 / ~256; n=200: ~128 / ~239; n=500: ~75 / ~192.
# KID is unbiased: ~0.0002 +- 0.0013 vs ~0.095 at n=200.
FID_SAME_MAX = 175.0
FID_FAR_MIN = 215.0
# The committed rows are float16: 2^-11 relative rounding, on top of float32 batch-composition noise.
COMMITTED_RTOL, COMMITTED_ATOL = 2e-3, 1e-3


@pytest.fixture(scope="module")
def real_image_features(inception):
    """The Inception rows of CIFAR-10 test half A / half B / Kodak crops (150 each), read from
    ``tests/data/real_image_features.npz`` (see ``tests/real_images.py``; extracting them here would cost
    ~170 s of one core). ``test_committed_real_image_features_match_the_extractor`` extracts a spread of them
    again on every run. Logits are ``pool @ fc.weight.T``, as the extractor computes them."""
    root = _shared_or_skip()
    feats = real_images.load(root)
    fc = inception.model.fc.weight.detach().double().numpy()
    feats["logits"] = feats["pool"] @ fc.T
    split = lambda lo, hi: {k: feats[k][lo:hi] for k in ("pool", "spatial", "logits")}  # noqa: E731
    return {
        "cifar_a": split(0, N_PER_SET),
        "cifar_b": split(N_PER_SET, 2 * N_PER_SET),
        "kodak": split(2 * N_PER_SET, 3 * N_PER_SET),
        "cifar_a_images": real_images.cifar_test_images(root, N_PER_SET, seed=real_images.CIFAR_SEED),
    }


@pytest.mark.slow
def test_committed_real_image_features_match_the_extractor(real_image_features, inception):
    """The committed rows are what the extractor gives today for those images: a spread of rows from every set
    (first, middle, last of each) is extracted again and compared, pool, spatial and logits."""
    f, root = real_image_features, _shared_or_skip()
    images = real_images.real_images(root)
    rows = [0, 75, 149, 150, 225, 299, 300, 301, 375, 449]
    assert images.shape == (3 * N_PER_SET, 3, 32, 32)
    np.testing.assert_array_equal(images[rows[:3]], f["cifar_a_images"][rows[:3]])
    live = M.extract_features(images[rows], inception, batch_size=len(rows))
    committed = {k: np.concatenate([f[s][k] for s in ("cifar_a", "cifar_b", "kodak")])[rows]
                 for k in ("pool", "spatial", "logits")}
    for key in ("pool", "spatial", "logits"):
        np.testing.assert_allclose(committed[key], live[key], rtol=COMMITTED_RTOL, atol=COMMITTED_ATOL, err_msg=key)
    # the tolerance tells images apart: another image's rows are far outside it
    assert np.abs(live["pool"][1] - committed["pool"][0]).max() > 100 * COMMITTED_ATOL


@pytest.fixture(scope="module")
def generation_results(real_image_features, inception, tmp_path_factory):
    """CIFAR half B and Kodak crops scored against a reference saved from CIFAR half A and loaded back."""
    f = real_image_features
    ref_path = M.save_reference_stats(tmp_path_factory.mktemp("ref") / "ref.npz", f["cifar_a"])
    ref = M.load_reference(ref_path)
    kwargs = dict(fc_zero=inception.fc_is_zero, kid_subset_size=100, kid_subsets=20)
    return {
        "ref": ref,
        "same": M.compute_generation_metrics(f["cifar_b"], ref, **kwargs),
        "far": M.compute_generation_metrics(f["kodak"], ref, **kwargs),
    }


@pytest.mark.slow
def test_fid_cifar_halves_small_and_cifar_vs_kodak_large(generation_results):
    same, far = generation_results["same"], generation_results["far"]
    print(f"\nn={N_PER_SET}: CIFAR-10 half vs half: {same}\nCIFAR-10 vs Kodak crops: {far}")
    assert same["fid"] < FID_SAME_MAX
    assert far["fid"] > FID_FAR_MIN
    assert far["fid"] > 1.5 * same["fid"]
    assert abs(same["kid"]) < 0.01 and far["kid"] > 0.05
    assert far["sfid"] > same["sfid"] > 0
    assert same["precision"] > far["precision"] and same["recall"] > far["recall"]


@pytest.mark.slow
def test_small_sets_take_the_sfid_rows_route_with_the_covariance_routes_number(generation_results, real_image_features,
                                                                               tmp_path):
    """A reference of ≤ SPATIAL_ROWS_MAX images keeps its spatial rows through the file round trip, and the sFID
    computed from rows equals the one from the 2023² covariances (the statistics route, taken without rows)."""
    f, ref, same = real_image_features, generation_results["ref"], generation_results["same"]
    assert ref.spatial is not None and ref.spatial.shape == (N_PER_SET, 2023)
    np.testing.assert_array_equal(ref.spatial, f["cifar_a"]["spatial"].astype(np.float32))
    no_rows = M.ReferenceStats(mu=ref.mu, sigma=ref.sigma, mu_s=ref.mu_s, sigma_s=ref.sigma_s, pool=ref.pool)
    b = f["cifar_b"]["spatial"]
    fake_stats = {"pool": f["cifar_b"]["pool"], "mu_s": b.mean(axis=0), "sigma_s": np.cov(b, rowvar=False)}
    stats_route = M.compute_generation_metrics(fake_stats, no_rows, fc_zero=True, kid_subset_size=100, kid_subsets=2)
    assert stats_route["sfid"] == pytest.approx(same["sfid"], rel=1e-9)
    # a large reference does not keep them; a file whose rows do not match its statistics is refused
    big = {"pool": np.zeros((2, 2048)), "spatial": np.ones((M.SPATIAL_ROWS_MAX + 1, 2023))}
    assert "spatial" not in np.load(M.save_reference_stats(tmp_path / "big.npz", big)).files
    bad = tmp_path / "bad.npz"
    with np.load(M.save_reference_stats(tmp_path / "ok.npz", f["cifar_a"])) as data:
        arrays = dict(data)
    np.savez(bad, **{**arrays, "spatial": arrays["spatial"][:, :100]})
    with pytest.raises(ValueError, match="spatial"):
        M.load_reference(bad)


@pytest.mark.slow
def test_generation_metrics_fields_and_references(generation_results, real_image_features, inception, tmp_path):
    f, ref, same = real_image_features, generation_results["ref"], generation_results["same"]
    # Our reference file round trip.
    assert ref.num_images == N_PER_SET and ref.pool.shape == (N_PER_SET, 2048)
    np.testing.assert_array_equal(ref.pool, f["cifar_a"]["pool"].astype(np.float32))
    np.testing.assert_allclose(ref.sigma, np.cov(f["cifar_a"]["pool"], rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(ref.sigma_s, np.cov(f["cifar_a"]["spatial"], rowvar=False), rtol=1e-12)
    # FID(x, x) on real 2048-d features with a singular covariance (150 < 2048 samples).
    assert abs(M.frechet_distance(ref.mu, ref.sigma, ref.mu, ref.sigma)) < 1e-8
    assert same["num_images"] == N_PER_SET
    assert same["inception_score"] is None and "all zeros" in same["unavailable"]["inception_score"]
    assert set(same["unavailable"]) == {"inception_score"}

    # An ADM-style batch: statistics plus images arr_0 (uint8 NHWC); pool rows come from the images.
    images = f["cifar_a_images"][:12]
    adm_path = tmp_path / "adm.npz"
    np.savez(adm_path, mu=ref.mu, sigma=ref.sigma, mu_s=ref.mu_s, sigma_s=ref.sigma_s,
             arr_0=images.permute(0, 2, 3, 1).numpy())
    adm = M.load_reference(adm_path, extractor=inception, batch_size=5)
    np.testing.assert_array_equal(adm.mu, ref.mu)
    assert adm.num_images == 12
    np.testing.assert_allclose(adm.pool, f["cifar_a"]["pool"][:12], rtol=COMMITTED_RTOL, atol=COMMITTED_ATOL)

    # Without an extractor the ADM batch still gives FID; what is missing is reported with a reason.
    no_extractor = M.load_reference(adm_path)
    assert no_extractor.pool is None
    partial = M.compute_generation_metrics({"pool": f["cifar_b"]["pool"]}, no_extractor, fc_zero=False)
    assert partial["fid"] == pytest.approx(same["fid"], rel=1e-12)
    assert partial["precision"] is None and "arr_0" in partial["unavailable"]["precision"]
    assert partial["sfid"] is None and "spatial" in partial["unavailable"]["sfid"]
    assert partial["inception_score"] is None and "logits" in partial["unavailable"]["inception_score"]


def test_reconstruction_metrics(shared_data):
    lpips_model = M.load_lpips("alex", shared_data / ALEX_FILE)
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (real + 0.05 * torch.randn_like(real)).clamp(-1, 1)
    out = M.reconstruction_metrics(real, recon, lpips_model)
    np.testing.assert_allclose(out["psnr"], M.psnr_uint8(real, recon).numpy())
    np.testing.assert_allclose(out["ssim"], M.ssim_uint8(real, recon).numpy())
    quant = lambda t: M.to_uint8(t).float() / 127.5 - 1  # noqa: E731
    with torch.no_grad():
        np.testing.assert_allclose(out["lpips"], lpips_model(quant(real), quant(recon)).flatten().numpy(), rtol=1e-6)
    assert out["lpips"].shape == (2,) and np.all(out["lpips"] > 0)
