"""probe-channels building blocks against independent computations (the figure itself is checked end to
end in test_pipeline.py on the SSR-trained quickstart tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from ssr_cli.dynamics import SSRDynamics, load_dynamics, save_dynamics
from ssr_cli.engine.runtime import Runtime
from ssr_cli.models.weights import WeightsError, save_weights
from ssr_cli.recipe import RecipeError, load
from ssr_cli.stages.common import (
    build_tokenizer,
    dynamics_error,
    finetuned_weights,
    image_dataset,
    learned_dynamics_path,
)
from ssr_cli.stages.probe_channels import (
    FILLS,
    blur_decay,
    blur_ladder,
    channel_basis_maps,
    latent_norm_maps,
    mask_fill,
    partial_decodes,
    probe_dynamics,
    radial_centroid,
    run_probe,
)

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"


class PixelTokenizer(torch.nn.Module):
    """A 'tokenizer' whose latent channels are the image's colour channels at full resolution, each with
    its own gain, and whose decoder is the identity: everything about it is known in closed form."""

    def __init__(self, gains=(1.0, 2.0, -0.5)) -> None:
        super().__init__()
        self.gains = torch.tensor(gains, dtype=torch.float64).reshape(1, -1, 1, 1)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() * self.gains

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.gains


def test_blur_decay_matches_scipy_filter():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(-1, 1, size=(3, 3, 24, 20)))
    tau = 4.0
    decay = blur_decay(PixelTokenizer(), images, tau)
    blurred = gaussian_filter(images.numpy(), sigma=(0, 0, np.sqrt(tau), np.sqrt(tau)), mode="reflect")
    for c in range(3):
        def norm(a):
            a = a[:, c]
            return np.sqrt(((a - a.mean(axis=(-2, -1), keepdims=True)) ** 2).sum())
        assert decay[c] == pytest.approx(norm(blurred) / norm(images.numpy()), rel=1e-5)  # gains cancel
    assert np.all(decay < 1.0)  # blur only removes detail


def test_partial_decodes_fill_and_unmask_in_order():
    tok = PixelTokenizer()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    z = tok.encode_latent(x)
    fill = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    out = partial_decodes(tok, z, [2, 0, 1], fill)
    assert len(out) == 3
    expected = (fill.reshape(1, -1, 1, 1) / tok.gains).expand_as(x).clone()
    for k, ch in enumerate([2, 0, 1]):
        expected[:, ch] = x[:, ch]
        torch.testing.assert_close(out[k].double(), expected.clamp(-1, 1))
    torch.testing.assert_close(out[-1].double(), x)  # all channels kept: the input itself


def test_radial_centroid_of_pure_cosines():
    h = w = 32
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for cycles in (2, 5, 9):
        img = np.cos(2 * np.pi * cycles * xx / w)
        t = torch.from_numpy(np.repeat(img[None, None], 3, axis=1))
        assert radial_centroid(t) == pytest.approx(cycles / w, rel=1e-9)  # all power at f = cycles / W


class IdentityDynamics(torch.nn.Module):
    def predict(self, z1: torch.Tensor, mean_centering: bool = True) -> torch.Tensor:
        return z1


class ScaleDynamics(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def predict(self, z1: torch.Tensor, mean_centering: bool = True) -> torch.Tensor:
        mean = z1.mean(dim=(-2, -1), keepdim=True)
        return mean + self.factor * (z1 - mean)


def test_dynamics_error_against_scipy_blur():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.uniform(-1, 1, size=(2, 3, 20, 20))).float()
    pairs = [(0.0, 2.0), (1.0, 3.0)]
    tok = PixelTokenizer(gains=(1.0, 1.0, 1.0))
    identity = dynamics_error(tok, images, IdentityDynamics(), pairs)
    assert identity["relative"] == pytest.approx(identity["no_change"], rel=1e-12)
    # By hand with scipy: Σ‖z1 − z2‖² / Σ‖z2 − mean‖² over the pairs.
    x = images.numpy().astype(np.float64)
    num = den = 0.0
    for t1, t2 in pairs:
        b1 = gaussian_filter(x, sigma=(0, 0, np.sqrt(t1), np.sqrt(t1)), mode="reflect") if t1 else x
        b2 = gaussian_filter(x, sigma=(0, 0, np.sqrt(t2), np.sqrt(t2)), mode="reflect")
        num += ((b1 - b2) ** 2).sum()
        den += ((b2 - b2.mean(axis=(-2, -1), keepdims=True)) ** 2).sum()
    assert identity["no_change"] == pytest.approx(num / den, rel=1e-4)
    # A contraction of the detail (what blur does) predicts better than "no change".
    assert dynamics_error(tok, images, ScaleDynamics(0.8), pairs)["relative"] < identity["no_change"]



# ----------------------------------------------------------------------------------- masked-channel fill


def _images_with_known_means(means: np.ndarray, size: int = 8) -> torch.Tensor:
    """(N, 3, size, size) images whose channel c of image i is means[i, c] plus a zero-mean checkerboard."""
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    checker = 0.1 * np.where((xx + yy) % 2 == 0, 1.0, -1.0)  # spatial mean exactly 0 on an even grid
    return torch.from_numpy(means[:, :, None, None] + checker[None, None])


@pytest.mark.parametrize("rule", FILLS)
def test_each_fill_rule_against_a_hand_computation(rule):
    means = np.array([[0.2, -0.4, 0.1], [0.6, 0.0, -0.3]])
    x = _images_with_known_means(means)
    tok = PixelTokenizer()
    z = tok.encode_latent(x)
    # By hand, in image space (the decoder divides by the gains): the value a masked channel decodes to.
    by_hand = {"dataset_mean": np.broadcast_to(means.mean(axis=0), means.shape), "image_mean": means,
               "zero": np.zeros_like(means)}[rule]
    fill = mask_fill(z, rule)
    assert fill.shape == (2, 3)
    np.testing.assert_allclose((fill / tok.gains[0, :, 0, 0]).numpy(), by_hand, atol=1e-12)
    out = partial_decodes(tok, z, [1, 2, 0], fill)
    # k = 1: channel 1 is kept, channels 0 and 2 decode to the hand value everywhere.
    for c in (0, 2):
        np.testing.assert_allclose(out[0][:, c].numpy(), np.broadcast_to(by_hand[:, c, None, None], (2, 8, 8)),
                                   atol=1e-6)  # partial decodes are float32
    torch.testing.assert_close(out[0][:, 1].double(), x[:, 1], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="probe.fill"):
        mask_fill(z, "median")


def test_recipe_fill_default_is_todays_dataset_mean():
    assert load(None).probe.fill == "dataset_mean"
    assert load(None, ["probe.fill=\"zero\""]).probe.fill == "zero"
    with pytest.raises(RecipeError, match="fill"):
        load(None, ["probe.fill=\"median\""])


# ----------------------------------------------------------------------------------- figures' data


def test_latent_norm_maps_raw_and_centred():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(2, 5, 4, 6)) + np.arange(5)[None, :, None, None]
    raw, centred = latent_norm_maps(torch.from_numpy(z))
    np.testing.assert_allclose(raw.numpy(), np.linalg.norm(z, axis=1), rtol=1e-12)
    np.testing.assert_allclose(centred.numpy(), np.linalg.norm(z - z.mean(axis=(2, 3), keepdims=True), axis=1),
                               rtol=1e-12)
    # A spatially constant latent has no centred part: its centred norm map is 0 everywhere.
    const = torch.ones(1, 3, 4, 4) * torch.tensor([1.0, -2.0, 2.0]).reshape(1, 3, 1, 1)
    raw, centred = latent_norm_maps(const)
    torch.testing.assert_close(raw, torch.full((1, 4, 4), 3.0, dtype=torch.float64))
    assert float(centred.abs().max()) < 1e-12


def test_blur_ladder_levels_and_decodes():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.uniform(-1, 1, size=(2, 3, 16, 16)))
    taus, blurred, decoded = blur_ladder(PixelTokenizer(), x, tau_max=10.0, levels=6)
    assert taus == pytest.approx([0.0, 2.0, 4.0, 6.0, 8.0, 10.0])
    torch.testing.assert_close(blurred[0], x)  # τ = 0 is the image itself
    for tau, b, d in zip(taus[1:], blurred[1:], decoded[1:]):
        expected = gaussian_filter(x.numpy(), sigma=(0, 0, np.sqrt(tau), np.sqrt(tau)), mode="reflect")
        np.testing.assert_allclose(b.numpy(), expected, atol=1e-5)
        torch.testing.assert_close(d.double(), b.double().clamp(-1, 1))  # the identity tokenizer's decode


def test_channel_basis_maps_fourier_closed_form():
    W, H, hp, wp = 4, 2, 6, 10
    maps = channel_basis_maps("fourier", W, H, hp, wp)
    assert maps.shape == (W * H, hp, wp) and maps.dtype == np.float64
    y = (np.arange(hp) + 0.5) / hp
    x = (np.arange(wp) + 0.5) / wp
    for n in range(W * H):
        w, h = n % W, n // W
        np.testing.assert_allclose(maps[n], np.cos(2 * np.pi * (h * y[:, None] + w * x[None, :])), atol=1e-12)


# ----------------------------------------------------------------------------------- learned dynamics


def _quick_cfg(tmp_path, *extra):
    return load(QUICKSTART, [f'run.out_dir="{tmp_path}"', "data.image_size=16", "data.builtin_crops=8",
                             "probe.num_images=1", "probe.score_images=4", "probe.channels_shown=2", *extra])


def _modified_dynamics(discretization="zoh"):
    dyn = SSRDynamics.from_basis("fourier", 4, 4, delta_init=0.37, discretization=discretization)
    with torch.no_grad():
        dyn.a_values.mul_(1.5)
        dyn.a_values[0] += 0.05  # off the analytic A: no recipe setting reproduces it
    return dyn


@pytest.mark.parametrize("discretization", ["zoh", "euler"])
def test_saved_dynamics_load_back_exactly(tmp_path, discretization):
    dyn = _modified_dynamics(discretization)
    loaded = load_dynamics(save_dynamics(dyn, tmp_path / "d.safetensors"))
    assert loaded.discretization == discretization
    torch.testing.assert_close(loaded.a_bar(), dyn.a_bar(), rtol=1e-6, atol=1e-7)
    assert float(loaded.delta) == pytest.approx(0.37, rel=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_damaged_dynamics_file_is_a_weights_error(tmp_path):
    bad = tmp_path / "d.safetensors"
    save_weights({"A": torch.eye(3)}, bad)
    with pytest.raises(WeightsError, match="A_bar"):
        load_dynamics(bad)
    save_weights({"A": torch.eye(3), "A_bar": 2 * torch.eye(3), "delta": torch.tensor([0.1])}, bad)
    with pytest.raises(WeightsError, match="neither"):
        load_dynamics(bad)


def test_probe_scores_the_learned_dynamics(tmp_path):
    cfg = _quick_cfg(tmp_path)
    recipe_dyn, record = probe_dynamics(cfg, 4, 4)
    assert record["source"] == "recipe" and record["delta"] == pytest.approx(0.1)
    learned = _modified_dynamics()
    save_dynamics(learned, learned_dynamics_path(cfg))
    tok = build_tokenizer(cfg, weights=None)
    save_weights(tok, finetuned_weights(cfg))  # the run's own (here random-initialised) tokenizer
    result = run_probe(cfg, Runtime(device=torch.device("cpu")))
    assert result["dynamics"]["source"] == "learned" and result["dynamics"]["delta"] == pytest.approx(0.37, rel=1e-6)
    # The number in probe.json is the error of the learned Ā, recomputed here on the probe's own images and pairs.
    ds = image_dataset(cfg, augment=False, image_size=16)
    pool = torch.stack([ds[(2 * i, None)][0] for i in range(4)])  # 8 crops / 4 score images: stride 2
    pairs = [tuple(p) for p in result["dynamics_tau_pairs"]]
    tok = tok.eval()
    assert result["dynamics_error"] == pytest.approx(dynamics_error(tok, pool, learned, pairs)["relative"], rel=1e-5)
    assert result["dynamics_error"] != pytest.approx(dynamics_error(tok, pool, recipe_dyn, pairs)["relative"], rel=1e-3)
    saved = json.loads((cfg.run_dir() / "probe" / "probe.json").read_text())
    assert saved["dynamics"]["source"] == "learned" and saved["fill"] == "dataset_mean"
    for name in ("unmasking", "psnr_vs_k", "latent_dynamics", "latent_norms", "blur_ladder", "basis_channels"):
        with Image.open(result["figures"][name]) as im:
            assert im.format == "PNG" and im.size[0] > 0
    assert result["blur_ladder_taus"] == pytest.approx(list(np.linspace(0.0, cfg.regularizer.tau_max, 6)))
    # Fig. 4(a)'s data: the per-position channel norm of the first image's latent.
    with np.load(result["latent_norms_data"]) as saved_maps, torch.no_grad():
        z = tok.encode_latent(pool[:1]).double().numpy()
        np.testing.assert_allclose(saved_maps["sharp_raw"], np.linalg.norm(z, axis=1), rtol=1e-5)


def test_pipeline_redoes_the_probe_when_the_learned_dynamics_change(tmp_path):
    from ssr_cli.stages import probe_channels

    cfg = _quick_cfg(tmp_path)
    before = probe_channels.inputs(cfg)
    assert before["dynamics"] is None
    save_dynamics(_modified_dynamics(), learned_dynamics_path(cfg))
    after = probe_channels.inputs(cfg)
    assert after["dynamics"] is not None and after != before


@pytest.mark.slow  # a 3-step SSR fine-tune (checkpoint, curves) then the probe: ~10–20 s on a shared 2-core CPU
def test_probe_after_a_real_ssr_finetune_scores_what_it_learned(tmp_path):
    from ssr_cli.recipe import from_dict
    from ssr_cli.stages.finetune import run_finetune

    cfg = from_dict({
        "run": {"name": "learned", "out_dir": str(tmp_path), "device": "cpu", "precision": "fp32"},
        "data": {"source": "builtin", "image_size": 16, "builtin_crops": 8},
        "tokenizer": {"family": "kl-ae", "size": "tiny"},
        # every step takes the SSR branch, at an LR that visibly moves A and Δ in 3 steps
        "regularizer": {"kind": "ssr", "alpha": 1.0, "lambda_pred_lpips": 0.0, "a_lr_mult": 10.0},
        "loss": {"lambda_lpips": 0.0},
        "train": {"steps": 3, "batch_size": 4, "ckpt_every_steps": 3, "log_every_steps": 1,
                  "image_every_steps": 100, "lr": 1e-3, "lr_init": 1e-3, "schedule": "constant"},
        "probe": {"num_images": 1, "score_images": 4},
    })
    run_finetune(cfg, Runtime(device=torch.device("cpu")))
    learned = load_dynamics(learned_dynamics_path(cfg))
    initial = SSRDynamics.from_basis("fourier", 4, 4, delta_init=0.1)
    assert not torch.allclose(learned.a_bar(), initial.a_bar(), atol=1e-6)  # training moved Ā
    result = run_probe(cfg, Runtime(device=torch.device("cpu")))
    assert result["dynamics"]["source"] == "learned"
    assert result["dynamics"]["delta"] == pytest.approx(float(learned.delta), rel=1e-6)


def test_compare_draws_latent_norms_of_runs_on_one_scale(tmp_path):
    from ssr_cli.stages.probe_channels import compare_latent_norms

    rng = np.random.default_rng(4)
    results = {}
    for label, gain, size in (("with C", 1.0, 4), ("without C", 5.0, 2)):  # latents of different sizes
        z_sharp = torch.from_numpy(gain * rng.normal(size=(1, 3, size, size)))
        maps = {"sharp": latent_norm_maps(z_sharp), "blurred": latent_norm_maps(0.5 * z_sharp)}
        path = tmp_path / f"{label}.npz"
        np.savez(path, tau=np.float64(10.0), sharp_images=rng.uniform(-1, 1, (1, 3, 8, 8)),
                 blurred_images=rng.uniform(-1, 1, (1, 3, 8, 8)),
                 **{f"{k}_{part}": m.numpy() for k, pair in maps.items() for part, m in zip(("raw", "centred"), pair)})
        results[label] = {"latent_norms_data": str(path)}
    out = compare_latent_norms(results, tmp_path / "cmp.png")
    with Image.open(out) as im:
        assert im.format == "PNG"
    assert compare_latent_norms({"a": {}}, tmp_path / "none.png") is None  # an older probe.json without the data
