"""``ssr evaluate``'s KL metric (issue 13 item 10): nats per image of the raw posterior, for KL tokenizers only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ssr_cli.engine.runtime import Runtime
from ssr_cli.models.tokenizer import DiagonalGaussian
from ssr_cli.models.weights import save_weights
from ssr_cli.recipe import load
from ssr_cli.stages.common import build_tokenizer, image_dataset
from ssr_cli.stages.evaluate import LABELS, posterior_kl, reconstruction

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"


def _kl_closed_form(mean: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²), summed per image over (C, h, w)."""
    return 0.5 * (mean ** 2 + np.exp(logvar) - 1.0 - logvar).sum(axis=(1, 2, 3))


def test_kl_is_that_of_the_raw_posterior_of_a_scaled_latent():
    rng = np.random.default_rng(0)
    raw_mean = rng.normal(0.3, 1.2, size=(3, 4, 5, 6))
    raw_logvar = rng.uniform(-3.0, 1.0, size=(3, 4, 5, 6))
    scale, shift = 0.3611, 0.1159  # Flux's latent normalisation: z = scale·(raw − shift)
    posterior = DiagonalGaussian(torch.from_numpy(scale * (raw_mean - shift)),
                                 torch.from_numpy(raw_logvar + 2 * math.log(scale)), scale=scale, shift=shift)
    kl = posterior_kl(posterior)
    assert kl.shape == (3,)
    np.testing.assert_allclose(kl, _kl_closed_form(raw_mean, raw_logvar), rtol=1e-5)  # float32 inside
    # Under bf16 (what autocast gives on CUDA) the moments are upcast first; the value stays that of the moments.
    bf16 = DiagonalGaussian(posterior.mean.bfloat16(), posterior.logvar.bfloat16(), scale=scale, shift=shift)
    expected = _kl_closed_form(bf16.mean.double().numpy() / scale + shift,
                               bf16.logvar.double().numpy() - 2 * math.log(scale))
    np.testing.assert_allclose(posterior_kl(bf16), expected, rtol=1e-5)
    assert posterior_kl(torch.zeros(2, 4, 3, 3)) is None  # a deterministic latent has no KL


def test_standard_normal_posterior_has_zero_kl():
    post = DiagonalGaussian(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
    np.testing.assert_allclose(posterior_kl(post), 0.0, atol=1e-12)


def _evaluate(tmp_path: Path, family: str, size: str) -> tuple[dict, object, torch.Tensor]:
    cfg = load(QUICKSTART, [f'run.out_dir="{tmp_path}"', "data.image_size=16", "data.builtin_crops=6",
                            f'tokenizer.family="{family}"', f'tokenizer.size="{size}"', "eval.num_images=6",
                            "eval.batch_size=4", 'eval.subset="first"'])
    tok = build_tokenizer(cfg, weights=None)
    weights = save_weights(tok, tmp_path / "tok.safetensors")
    out = reconstruction(cfg, Runtime(device=torch.device("cpu")), weights=str(weights))
    ds = image_dataset(cfg, augment=False, image_size=16)
    images = torch.stack([ds[(i, None)][0] for i in range(6)])
    return out, tok.eval(), images


def test_evaluate_reports_kl_for_a_kl_tokenizer(tmp_path):
    out, tok, images = _evaluate(tmp_path, "kl-ae", "tiny")
    with torch.no_grad():
        post = tok.encode(images)
    raw_mean = post.mean.double().numpy() / post.scale + post.shift
    raw_logvar = post.logvar.double().numpy() - 2 * math.log(post.scale)
    assert out["kl"] == pytest.approx(float(_kl_closed_form(raw_mean, raw_logvar).mean()), rel=1e-4)
    assert "kl" in LABELS


def test_evaluate_has_no_kl_for_a_deterministic_tokenizer(tmp_path):
    out, _, _ = _evaluate(tmp_path, "cosmos-ci", "tiny")
    assert "kl" not in out and "kl" not in out["unavailable"]
    assert np.isfinite(out["psnr"])


def test_pipeline_summary_shows_kl_only_when_measured():
    from ssr_cli.stages.pipeline import summary_rows

    with_kl = summary_rows({"stages": {}, "eval": {"reconstruction": {"psnr": 20.0, "kl": 1234.4}}})
    assert ("reconstruction kl", "1234") in with_kl  # 4 significant digits
    without = summary_rows({"stages": {}, "eval": {"reconstruction": {"psnr": 20.0, "unavailable": {}}}})
    assert not any("kl" in name for name, _ in without)
