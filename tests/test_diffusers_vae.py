"""diffusers AutoencoderKL folders: load into our KL-AE and export from it, checked against diffusers itself."""

from __future__ import annotations

import json

import pytest
import torch

from ssr_cli.models.diffusers_vae import export_diffusers, load_diffusers_vae
from ssr_cli.models.kl_ae import build_kl_ae
from ssr_cli.models.registry import build_tokenizer
from ssr_cli.models.weights import WeightsError

# one xdist group: diffusers is imported by one worker only
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("diffusers")]


def _diffusers():
    """diffusers, imported where a test first needs it rather than at collection (about 3 s with the torch._dynamo
    it imports, which every xdist worker would pay)."""
    return pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e .[test])")

CONFIGS = [
    # SD-like: quant convs, two res blocks, scale only.
    dict(block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8,
         scaling_factor=0.18215, use_quant_conv=True, use_post_quant_conv=True),
    # FLUX-like: no quant convs, scale and shift.
    dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4,
         scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
    # No mid-block attention, widths not doubling.
    dict(block_out_channels=(8, 24, 24, 16), layers_per_block=1, latent_channels=8, norm_num_groups=8,
         scaling_factor=1.7, shift_factor=-0.2, mid_block_add_attention=False),
]


def _diffusers_vae(config: dict, seed: int):
    levels = len(config["block_out_channels"])
    torch.manual_seed(seed)
    vae = _diffusers().AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                  up_block_types=("UpDecoderBlock2D",) * levels, **config)
    with torch.no_grad():  # every tensor random, so no zero-initialised layer hides a mis-mapped one
        for name, p in vae.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return vae.eval()


def _compare(vae, ours, image_size: int) -> None:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    x = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(3)) * 2 - 1
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        post = ours.encode(x)
        torch.testing.assert_close(post.mean, scale * (dist.mean - shift), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(post.logvar, dist.logvar + 2 * torch.log(torch.tensor(scale)), rtol=1e-4, atol=1e-4)
        z = torch.randn(2, vae.config.latent_channels, image_size // factor, image_size // factor)
        torch.testing.assert_close(ours.decode(scale * (z - shift)), vae.decode(z).sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_diffusers_folder_loads_with_the_same_outputs(tmp_path, index):
    vae = _diffusers_vae(CONFIGS[index], seed=index)
    vae.save_pretrained(tmp_path / "vae")
    ours = build_tokenizer("kl-ae", "diffusers", weights=tmp_path / "vae").eval()
    assert ours.scale_factor == pytest.approx(CONFIGS[index]["scaling_factor"])
    assert ours.shift_factor == pytest.approx(CONFIGS[index].get("shift_factor", 0.0))
    _compare(vae, ours, 16)
    # A pipeline folder (the VAE in vae/) and the weights file itself load the same.
    for source in (tmp_path, tmp_path / "vae" / "diffusion_pytorch_model.safetensors"):
        again = build_tokenizer("kl-ae", "diffusers", weights=source)
        for key, value in ours.state_dict().items():
            assert torch.equal(again.state_dict()[key], value), key


@pytest.mark.parametrize("quant", [True, False])
def test_export_is_read_by_diffusers_with_the_same_outputs(tmp_path, quant):
    torch.manual_seed(4)
    ours = build_kl_ae("tiny", quant_conv=quant, scale_factor=0.7, shift_factor=0.05).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    export_diffusers(ours, tmp_path / "out", sample_size=32)
    vae = _diffusers().AutoencoderKL.from_pretrained(tmp_path / "out").eval()
    assert vae.config.scaling_factor == pytest.approx(0.7) and vae.config.shift_factor == pytest.approx(0.05)
    _compare(vae, ours, 16)
    # And back: the exported folder loads into an identical model.
    back = load_diffusers_vae(tmp_path / "out")
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_legacy_attention_names_load(tmp_path):
    vae = _diffusers_vae(CONFIGS[1], seed=7)
    vae.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "diffusion_pytorch_model.safetensors"
    renamed = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
               .replace(".to_out.0.", ".proj_attn."): v for k, v in load_file(str(path)).items()}
    save_file(renamed, str(path))
    _compare(vae, build_tokenizer("kl-ae", "diffusers", weights=tmp_path).eval(), 8)


def test_wrong_diffusers_files_name_what_was_expected(tmp_path):
    vae = _diffusers_vae(CONFIGS[1], seed=8)
    vae.save_pretrained(tmp_path)
    # Another named size: the config describes another architecture, and the error says which fields.
    with pytest.raises(WeightsError, match=r'ch: model 32 vs config 8.*tokenizer.size = "diffusers"'):
        build_tokenizer("kl-ae", "tiny", weights=tmp_path)
    # A missing key is named.
    from safetensors.torch import load_file, save_file

    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    del state["decoder.up_blocks.0.resnets.1.conv2.weight"]
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"missing \['decoder.up_blocks.0.resnets.1.conv2.weight'\]"):
        build_tokenizer("kl-ae", "diffusers", weights=tmp_path)
    # Per-channel latent statistics would be silently dropped: refused instead.
    config = json.loads((tmp_path / "config.json").read_text())
    config["latents_mean"] = [0.0] * 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="latents_mean = null"):
        build_tokenizer("kl-ae", "diffusers", weights=tmp_path)
    # A folder that is no diffusers folder.
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="expects tokenizer.weights to be a diffusers VAE folder"):
        build_tokenizer("kl-ae", "diffusers", weights=tmp_path / "empty")
