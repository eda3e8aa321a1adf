"""Tokenizer zoo: published layouts and sizes, the shared interface, freezing, Haar patcher, attention."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssr_cli.models.cosmos import haar_patchify, haar_unpatchify
from ssr_cli.models.kl_ae import AttnBlock
from ssr_cli.models.registry import TOKENIZER_SIZES, build_tokenizer, parameter_counts
from ssr_cli.models.tokenizer import DiagonalGaussian

KEYS = Path(__file__).resolve().parents[1].parent / "shared" / "docs" / "keys"


pytestmark = pytest.mark.usefixtures("one_thread")


def _layout(name: str) -> list[tuple[str, tuple[int, ...]]]:
    path = KEYS / name
    if not path.is_file():
        pytest.skip(f"key layout {path} not found")
    rows = []
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


def _meta(family: str, size: str, **overrides):
    with torch.device("meta"):  # full-size models without allocating or initialising 80M parameters
        return build_tokenizer(family, size, **overrides)


@pytest.mark.parametrize(
    "family, size, tsv, total, encoder",
    [
        # references.md: Flux AE 83.82M (encoder 34.27M, decoder 49.55M); Cosmos CI16x16 81.51M (encoder+quant 33.51M)
        ("kl-ae", "flux", "flux_ae.tsv", 83.82e6, 34.27e6),
        ("cosmos-ci", "ci16x16", "cosmos_ci16x16.tsv", 81.51e6, 33.51e6),
    ],
)
def test_published_layouts(family, size, tsv, total, encoder):
    model = _meta(family, size)
    expected = _layout(tsv)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected  # names, shapes and order
    counts = parameter_counts(model)
    assert counts["total"] == sum(math.prod(s) for _, s in expected)
    assert abs(counts["total"] - total) <= 0.01e6
    assert abs(counts["encoder"] - encoder) <= 0.01e6
    assert counts["decoder"] == counts["total"] - counts["encoder"]
    assert counts["trainable"] == counts["total"]


def test_sd_vae_size_and_attributes():
    sd = _meta("kl-ae", "sd")
    # The SD-VAE (kl-f8) has 83,653,863 parameters, quant convs included.
    assert parameter_counts(sd)["total"] == 83_653_863
    assert tuple(sd.state_dict()["quant_conv.weight"].shape) == (8, 8, 1, 1)
    assert tuple(sd.state_dict()["post_quant_conv.weight"].shape) == (4, 4, 1, 1)
    assert (sd.latent_channels, sd.downsample_factor, sd.scale_factor, sd.shift_factor) == (4, 8, 0.18215, 0.0)
    flux = _meta("kl-ae", "flux")
    assert (flux.latent_channels, flux.downsample_factor, flux.is_kl) == (16, 8, True)
    assert (flux.scale_factor, flux.shift_factor, flux.input_range) == (0.3611, 0.1159, (-1.0, 1.0))
    ci8 = _meta("cosmos-ci", "ci8x8")
    assert (ci8.downsample_factor, ci8.latent_channels, ci8.is_kl) == (8, 16, False)
    assert not hasattr(ci8.encoder.down[1], "downsample") and hasattr(ci8.decoder.up[2], "upsample")


@pytest.mark.parametrize(
    "family, size, hw, latent",
    [
        ("kl-ae", "tiny", 32, (16, 8, 8)),
        ("kl-ae", "tiny8", 32, (16, 4, 4)),
        ("kl-ae", "small", 64, (16, 8, 8)),
        ("cosmos-ci", "tiny", 32, (16, 4, 4)),
        ("taesd", "taesd", 32, (4, 4, 4)),
        ("taesd", "taef1", 32, (16, 4, 4)),
        ("taesd", "taef2", 32, (32, 4, 4)),
    ],
)
def test_encode_decode_shapes(family, size, hw, latent):
    model = build_tokenizer(family, size).eval()
    x = torch.rand(2, 3, hw, hw) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        z = model.encode_latent(x)
        y = model.decode(z)
    assert isinstance(posterior, DiagonalGaussian) == model.is_kl
    assert tuple(z.shape) == (2, *latent)
    assert (model.latent_channels, model.downsample_factor) == (latent[0], hw // latent[1])
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_every_named_size_builds_consistently():
    for family, sizes in TOKENIZER_SIZES.items():
        for size in sizes:
            model = _meta(family, size)
            assert model.latent_channels > 0 and model.downsample_factor in (4, 8, 16), (family, size)
            assert parameter_counts(model)["encoder"] > 0


def test_posterior_lives_in_scaled_space_its_kl_is_the_raw_ones():
    scale, shift = 0.5, 0.2
    model = build_tokenizer("kl-ae", "tiny", scale_factor=scale, shift_factor=shift).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = model.raw_moments(x)
        post = model.encode(x)
        z = torch.randn_like(post.mean)
        decoded = model.decode(z)
        reference = model.decoder(z / scale + shift)
    torch.testing.assert_close(post.mean, scale * (mean - shift))
    # std of scale·(u − shift) is scale·std(u)
    torch.testing.assert_close(post.std, scale * torch.exp(0.5 * logvar.clamp(-30, 20)))
    torch.testing.assert_close(decoded, reference)
    # the KL is that of the raw posterior (as LDM / EQ-VAE), not of the scaled Gaussian
    lv = logvar.clamp(-30, 20)
    kl = 0.5 * (mean**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), kl, rtol=1e-5, atol=1e-4)


def test_attention_matches_explicit_softmax():
    block = AttnBlock(32, norm_groups=8).double()
    x = torch.randn(2, 32, 5, 3, dtype=torch.float64)
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # (B, C, N)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=-1)
    out = torch.einsum("bij,bcj->bci", weights, v).reshape(x.shape)
    torch.testing.assert_close(block(x), x + block.proj_out(out))


@pytest.mark.parametrize("family", ["kl-ae", "cosmos-ci"])
def test_grad_checkpointing_gives_identical_gradients(family):
    torch.manual_seed(1)
    model = build_tokenizer(family, "tiny").train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def grads():
        model.zero_grad(set_to_none=True)
        y, _ = model(x, sample=False)
        (y - x).abs().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.grad_checkpointing = True
    assert model.encoder.grad_checkpointing and model.decoder.grad_checkpointing
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family, size, tsv", [("kl-ae", "flux", "flux_ae.tsv"),
                                              ("cosmos-ci", "ci16x16", "cosmos_ci16x16.tsv")])
def test_freezing_published_layouts(family, size, tsv):
    model = _meta(family, size)
    frozen = model.frozen_blocks(encoder=2, decoder=2)
    prefixes = ("encoder.down.0.", "encoder.down.1.", "decoder.up.0.", "decoder.up.1.")
    expected = [k for k, _ in _layout(tsv) if k.startswith(prefixes)]
    assert frozen == expected
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == expected
    counts = parameter_counts(model)
    frozen_numel = sum(math.prod(s) for k, s in _layout(tsv) if k.startswith(prefixes))
    assert counts["trainable"] == counts["total"] - frozen_numel


def test_decoder_up_runs_in_reverse():
    """up.0 is the last executed stage: it works at full resolution, right before norm_out/conv_out."""
    model = build_tokenizer("kl-ae", "tiny").eval()
    seen: list[tuple[str, int]] = []
    for i, level in enumerate(model.decoder.up):
        level.block[0].register_forward_hook(lambda m, a, o, i=i: seen.append((f"up.{i}", o.shape[-1])))
    with torch.no_grad():
        model.decode(torch.randn(1, 16, 8, 8))
    assert seen == [("up.2", 8), ("up.1", 16), ("up.0", 32)]


@pytest.mark.parametrize("family, size", [("kl-ae", "tiny"), ("cosmos-ci", "tiny"), ("taesd", "taef2")])
def test_frozen_parameters_get_no_gradient(family, size):
    model = build_tokenizer(family, size).train()
    frozen = set(model.frozen_blocks(encoder=2, decoder=2))
    assert frozen
    y, _ = model(torch.rand(2, 3, 32, 32) * 2 - 1, sample=False)
    y.square().mean().backward()
    for name, param in model.named_parameters():
        if name in frozen:
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad and param.grad is not None, name


def test_taesd_stage_names_are_documented_indices():
    model = build_tokenizer("taesd", "taef2")
    assert model.frozen_block_names(1, 1) == ["encoder.1", "encoder.2", "decoder.18"]
    names = model.frozen_block_names(2, 2)
    assert names == ["encoder.1", "encoder.2", "encoder.3", "encoder.4", "encoder.5", "encoder.6",
                     "decoder.18", "decoder.13", "decoder.14", "decoder.15", "decoder.17"]
    # encoder.2 is the first stride-2 conv; decoder.17 the conv after the last upsample
    assert model.encoder[2].stride == (2, 2) and isinstance(model.decoder[16], torch.nn.Upsample)
    with pytest.raises(ValueError, match="encoder stages"):
        model.frozen_block_names(5, 0)


def test_taesd_decoder_soft_clamps_latents():
    model = build_tokenizer("taesd", "taesd").eval()
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        big = model.decode(z * 1e4)
        saturated = model.decoder[1:](torch.sign(z) * 3.0) * 2 - 1  # tanh(±∞)·3 = ±3, then [0, 1] -> [-1, 1]
    torch.testing.assert_close(big, saturated)


def _haar_by_convolution(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Reference: separable stride-2 correlation with the Haar filters [1, 1]/√2 and [1, −1]/√2, /2 per level."""
    s = 1 / math.sqrt(2)
    low, high = torch.tensor([s, s], dtype=x.dtype), torch.tensor([s, -s], dtype=x.dtype)
    for _ in range(levels):
        g = x.shape[1]

        def along_w(t, f):
            return F.conv2d(t, f.view(1, 1, 1, 2).repeat(g, 1, 1, 1), stride=(1, 2), groups=g)

        def along_h(t, f):
            return F.conv2d(t, f.view(1, 1, 2, 1).repeat(g, 1, 1, 1), stride=(2, 1), groups=g)

        xl, xh = along_w(x, low), along_w(x, high)
        x = torch.cat([along_h(xl, low), along_h(xl, high), along_h(xh, low), along_h(xh, high)], dim=1) / 2
    return x


def test_haar_patcher():
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    p = haar_patchify(x, 2)
    assert p.shape == (2, 48, 4, 6)
    torch.testing.assert_close(p, _haar_by_convolution(x, 2))
    torch.testing.assert_close(p[:, :3], F.avg_pool2d(x, 4))  # LL of LL = 4×4 mean
    torch.testing.assert_close(p.square().sum(), x.square().sum() / 16)  # orthogonal up to 1/4 per level
    torch.testing.assert_close(haar_unpatchify(p, 2), x)
    with pytest.raises(ValueError, match="even"):
        haar_patchify(torch.zeros(1, 3, 6, 6), 2)


def test_bad_names_are_explained():
    with pytest.raises(ValueError, match="tokenizer.family"):
        build_tokenizer("vqgan", "f16")
    with pytest.raises(ValueError, match="tokenizer.size.*tiny"):
        build_tokenizer("kl-ae", "huge")
    with pytest.raises(ValueError, match="z_chanels"):
        build_tokenizer("kl-ae", "tiny", z_chanels=8)
    with pytest.raises(ValueError, match="norm_groups"):
        build_tokenizer("kl-ae", "tiny", ch=12)
    custom = build_tokenizer("kl-ae", "tiny", z_channels=8, ch_mult=[1, 2])
    assert (custom.latent_channels, custom.downsample_factor) == (8, 2)
