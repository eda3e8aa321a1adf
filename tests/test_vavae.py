"""VA-VAE (LightningDiT's vavae_f16d32) in our KL-AE: the preset's layout and its checkpoint keys.

The checkpoint is built the way VA-VAE's Lightning module saves one: ``{"state_dict": ...}`` with the
encoder/decoder/quant-conv keys plus its training-only entries (``loss.*``, ``foundation_model.model.*``,
``linear_proj.weight``, see vavae/ldm/models/autoencoder.py in hustvl/LightningDiT).
"""

from __future__ import annotations

import pytest
import torch

from ssr_cli.errors import UserError
from ssr_cli.models.kl_ae import TRAINING_ONLY_PREFIXES, build_kl_ae
from ssr_cli.models.registry import build_tokenizer
from ssr_cli.models.weights import WeightsError, load_weights

# The vavae preset scaled down for the CPU: 32-px images, attention at 8 px (the 16-of-256 level's role).
SMALL = dict(ch=16, ch_mult=(1, 1, 2), z_channels=8, norm_groups=4, attn_resolutions=(8,), resolution=32)
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
    path = _vavae_checkpoint(tmp_path, source, {**EXTRA, "ema.encoder.conv_in.weight": (16, 3, 3, 3)})
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
