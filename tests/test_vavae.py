"""VA-VAE (LightningDiT's vavae_f16d32) in our KL-AE: the preset's layout and its checkpoint keys.

The checkpoint is built the way VA-VAE's Lightning module saves one: ``{"state_dict": ...}`` with the
encoder/decoder/quant-conv keys plus its training-only entries (``loss.*``, ``foundation_model.model.*``,
``linear_proj.weight``, see vavae/ldm/models/autoencoder.py in hustvl/LightningDiT).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssr_cli.errors import UserError
from ssr_cli.models.kl_ae import TRAINING_ONLY_PREFIXES, build_kl_ae
from ssr_cli.models.registry import build_tokenizer
from ssr_cli.models.weights import WeightsError, load_weights

# The vavae preset scaled down for the CPU: 32-px images, attention at 8 px (the 16-of-256 level's role).
SMALL = dict(ch=32, ch_mult=(1, 1, 2), z_channels=8, norm_groups=32, attn_resolutions=(8,), resolution=32)
EXTRA = {  # VA-VAE's training-only entries (shapes as in its modules, sizes shrunk)
    "linear_proj.weight": (24, 8, 1, 1),  # reverse_proj: Conv2d(embed_dim -> vf_feature_dim, 1x1, bias=False)
    "foundation_model.model.cls_token": (1, 1, 24),
    "foundation_model.model.blocks.0.attn.qkv.weight": (72, 24),
    "loss.logvar": (),
    "loss.perceptual_loss.net.slice1.0.weight": (64, 3, 3, 3),
    "loss.discriminator.main.0.weight": (64, 3, 4, 4),
}


def _vavae_checkpoint(tmp_path, model, extra_keys=EXTRA, name="vavae.pt"):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update({k: torch.randn(shape) for k, shape in extra_keys.items()})
    path = tmp_path / name
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1200}, path)
    return path


def test_preset_is_the_ldm_f16d32_layout():
    with torch.device("meta"):
        model = build_kl_ae("vavae")
    state = model.state_dict()
    assert model.downsample_factor == 16 and model.latent_channels == 32
    assert (model.scale_factor, model.shift_factor) == (1.0, 0.0)
    attn = {k.rsplit(".", 2)[0] for k in state if ".attn." in k and not k.startswith(("encoder.mid", "decoder.mid"))}
    assert attn == {"encoder.down.4.attn.0", "encoder.down.4.attn.1",
                    "decoder.up.4.attn.0", "decoder.up.4.attn.1", "decoder.up.4.attn.2"}
    assert "encoder.mid.attn_1.q.weight" in state and "decoder.mid.attn_1.q.weight" in state
    assert tuple(state["encoder.conv_in.weight"].shape) == (128, 3, 3, 3)
    assert tuple(state["encoder.down.4.block.0.conv1.weight"].shape) == (512, 256, 3, 3)  # ch·ch_mult[4] = 512
    assert tuple(state["encoder.conv_out.weight"].shape) == (64, 512, 3, 3)  # double_z: 2·32
    assert tuple(state["quant_conv.weight"].shape) == (64, 64, 1, 1)
    assert tuple(state["post_quant_conv.weight"].shape) == (32, 32, 1, 1)
    assert tuple(state["decoder.conv_in.weight"].shape) == (512, 32, 3, 3)


def test_vavae_checkpoint_loads_strictly_skipping_training_only_keys(tmp_path, capsys):
    torch.manual_seed(0)
    source = build_tokenizer("kl-ae", "vavae", **SMALL).eval()
    path = _vavae_checkpoint(tmp_path, source)
    torch.manual_seed(1)
    loaded = build_tokenizer("kl-ae", "vavae", **SMALL).eval()
    report = load_weights(loaded, path, strict=True)
    assert report.ok and report.loaded == len(source.state_dict())
    assert sorted(report.skipped) == sorted(EXTRA)
    assert all(k.startswith(TRAINING_ONLY_PREFIXES) for k in report.skipped)
    err = capsys.readouterr().err
    assert "skipped 6 training-only tensors" in err and "linear_proj.*" in err and "loss.*" in err
    for key, tensor in source.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key]), key

    # encode/decode round trip: the same posterior and image as the source, and the posterior is VA-VAE's raw
    # one (quant_conv moments; scale 1, shift 0), f16 -> here f4 with ch_mult of 3 levels, 8 channels
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post, ref = loaded.encode(x), source.encode(x)
        raw_mean, raw_logvar = loaded.raw_moments(x)
        assert post.mean.shape == (2, 8, 8, 8)
        assert torch.equal(post.mean, ref.mean) and torch.equal(post.mean, raw_mean)
        assert torch.equal(post.logvar, raw_logvar.clamp(-30.0, 20.0))
        image = loaded.decode(post.mean)
        assert image.shape == x.shape
        assert torch.equal(image, source.decode(ref.mean))
        assert torch.equal(image, loaded.decoder(loaded.post_quant_conv(raw_mean)))


def test_unknown_key_is_one_error_naming_it(tmp_path):
    torch.manual_seed(0)
    source = build_tokenizer("kl-ae", "vavae", **SMALL)
    path = _vavae_checkpoint(tmp_path, source, {**EXTRA, "ema.encoder.conv_in.weight": (32, 3, 3, 3)})
    with pytest.raises(WeightsError) as info:
        build_tokenizer("kl-ae", "vavae", weights=path, **SMALL)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "1 unexpected in the file: ema.encoder.conv_in.weight" in message
    assert "6 training-only skipped" in message  # reported, but not what failed
    # a key the model needs but the file lacks is an error too (the skip list never hides a missing key)
    state = {k: v for k, v in source.state_dict().items() if k != "encoder.down.2.attn.1.q.weight"}
    torch.save({"state_dict": state}, tmp_path / "short.pt")
    with pytest.raises(WeightsError, match="1 missing from the file: encoder.down.2.attn.1.q.weight"):
        build_tokenizer("kl-ae", "vavae", weights=tmp_path / "short.pt", **SMALL)


def test_diffusers_export_refuses_level_attention(tmp_path):
    from ssr_cli.models.diffusers_vae import export_diffusers

    with pytest.raises(WeightsError, match=r"attn_resolutions = \[8\].*no DownEncoderBlock2D"):
        export_diffusers(build_tokenizer("kl-ae", "vavae", **SMALL), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- VA-VAE's forward pass, written here from its published description (the LDM AutoencoderKL of
# hustvl/LightningDiT tokenizer/autoencoder.py: GroupNorm(32, eps 1e-6), swish, single-head attention with
# 1/sqrt(C) scaling after each ResnetBlock of a level whose current resolution is in attn_resolutions, stride-2
# conv after (0, 1, 0, 1) padding, nearest ×2 + conv), acting on a plain state dict.

def _norm(sd, p, x):
    return F.group_norm(x, 32, sd[p + "weight"], sd[p + "bias"], eps=1e-6)


def _conv(sd, p, x, **kw):
    return F.conv2d(x, sd[p + "weight"], sd.get(p + "bias"), **kw)


def _resnet(sd, p, x):
    h = _conv(sd, p + "conv1.", F.silu(_norm(sd, p + "norm1.", x)), padding=1)
    h = _conv(sd, p + "conv2.", F.silu(_norm(sd, p + "norm2.", h)), padding=1)
    return (_conv(sd, p + "nin_shortcut.", x) if p + "nin_shortcut.weight" in sd else x) + h


def _attn(sd, p, x):
    b, c, hh, ww = x.shape
    n = _norm(sd, p + "norm.", x)
    q, k, v = (_conv(sd, p + name + ".", n).reshape(b, c, hh * ww) for name in ("q", "k", "v"))
    weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) / c**0.5, dim=2)  # (b, query, key)
    return x + _conv(sd, p + "proj_out.", torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, hh, ww))


def _reference_moments(sd, x, levels, blocks, attn_res, resolution):
    h, res = _conv(sd, "encoder.conv_in.", x, padding=1), resolution
    for i in range(levels):
        for j in range(blocks):
            h = _resnet(sd, f"encoder.down.{i}.block.{j}.", h)
            if res in attn_res:
                h = _attn(sd, f"encoder.down.{i}.attn.{j}.", h)
        if i != levels - 1:
            h, res = _conv(sd, f"encoder.down.{i}.downsample.conv.", F.pad(h, (0, 1, 0, 1)), stride=2), res // 2
    h = _resnet(sd, "encoder.mid.block_2.", _attn(sd, "encoder.mid.attn_1.", _resnet(sd, "encoder.mid.block_1.", h)))
    h = _conv(sd, "encoder.conv_out.", F.silu(_norm(sd, "encoder.norm_out.", h)), padding=1)
    return _conv(sd, "quant_conv.", h).chunk(2, dim=1)


def _reference_decode(sd, z, levels, blocks, attn_res, resolution):
    h = _conv(sd, "decoder.conv_in.", _conv(sd, "post_quant_conv.", z), padding=1)
    h = _resnet(sd, "decoder.mid.block_2.", _attn(sd, "decoder.mid.attn_1.", _resnet(sd, "decoder.mid.block_1.", h)))
    res = resolution // 2 ** (levels - 1)
    for i in reversed(range(levels)):
        for j in range(blocks + 1):
            h = _resnet(sd, f"decoder.up.{i}.block.{j}.", h)
            if res in attn_res:
                h = _attn(sd, f"decoder.up.{i}.attn.{j}.", h)
        if i != 0:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv.", F.interpolate(h, scale_factor=2.0, mode="nearest"),
                      padding=1)
            res *= 2
    return _conv(sd, "decoder.conv_out.", F.silu(_norm(sd, "decoder.norm_out.", h)), padding=1)


def test_loaded_vavae_computes_what_the_reference_forward_computes(tmp_path):
    torch.manual_seed(0)
    source = build_tokenizer("kl-ae", "vavae", **SMALL)
    with torch.no_grad():  # non-trivial norms and biases, so every term of the forward pass matters
        for name, tensor in source.state_dict().items():
            if name.endswith("bias") or ".norm" in name:
                tensor.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    path = _vavae_checkpoint(tmp_path, source)
    checkpoint = torch.load(path, weights_only=True)["state_dict"]  # the file as VA-VAE's own loader reads it
    model = build_tokenizer("kl-ae", "vavae", weights=path, **SMALL).eval()
    arch = (3, 2, (8,), 32)  # levels, num_res_blocks, attn_resolutions, resolution
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = _reference_moments(checkpoint, x, *arch)
        post = model.encode(x)
        torch.testing.assert_close(post.mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(post.logvar, logvar.clamp(-30.0, 20.0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.decode(mean), _reference_decode(checkpoint, mean, *arch), rtol=1e-4,
                                   atol=1e-5)
