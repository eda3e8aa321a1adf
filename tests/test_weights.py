"""Weight files: exact save/load round trips, strict key reports, original layouts, local-only loading, TAEF2 on Kodak."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

from ssr_cli.models.registry import build_tokenizer
from ssr_cli.models.taesd import save_original_pair
from ssr_cli.models.weights import WeightsError, load_state_dict_file, load_weights, save_weights


pytestmark = pytest.mark.usefixtures("one_thread")


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("family, size", [("kl-ae", "tiny"), ("cosmos-ci", "tiny"), ("taesd", "taef2")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_load_round_trip_is_exact(tmp_path, family, size, suffix):
    torch.manual_seed(1)
    source = build_tokenizer(family, size).eval()
    path = save_weights(source, tmp_path / f"tok{suffix}")
    torch.manual_seed(2)
    loaded = build_tokenizer(family, size, weights=path).eval()
    _same_state(source, loaded)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(source.decode(source.encode_latent(x)), loaded.decode(loaded.encode_latent(x)))


def test_mis_shaped_checkpoint_names_the_key(tmp_path):
    state = build_tokenizer("kl-ae", "tiny").state_dict()
    state["decoder.conv_in.weight"] = torch.zeros(64, 8, 3, 3)  # z_channels 8 instead of 16
    del state["encoder.norm_out.bias"]
    state["encoder.extra.weight"] = torch.zeros(3)
    path = save_weights(state, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as info:
        build_tokenizer("kl-ae", "tiny", weights=path)
    message = str(info.value)
    assert "decoder.conv_in.weight: model (64, 16, 3, 3) vs file (64, 8, 3, 3)" in message
    assert "encoder.norm_out.bias" in message and "encoder.extra.weight" in message
    assert "tokenizer.strict" in message

    # not strict: loads every matching tensor, leaves the rest, and warns with the same report
    fresh = build_tokenizer("kl-ae", "tiny")
    before = fresh.decoder.conv_in.weight.clone()
    with pytest.warns(UserWarning, match="decoder.conv_in.weight"):
        report = load_weights(fresh, path, strict=False)
    assert report.missing == ["encoder.norm_out.bias"] and report.unexpected == ["encoder.extra.weight"]
    assert [k for k, _, _ in report.mismatched] == ["decoder.conv_in.weight"]
    assert torch.equal(fresh.decoder.conv_in.weight, before)
    assert torch.equal(fresh.encoder.conv_out.weight, state["encoder.conv_out.weight"])


class NotATensor:
    """An arbitrary pickled object: weights_only=True must refuse to build it."""


def test_torch_files_load_weights_only(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"encoder.conv_in.weight": NotATensor()}, path)
    with pytest.raises(WeightsError, match="weights_only"):
        load_state_dict_file(path)
    with pytest.raises(FileNotFoundError, match="tokenizer.weights"):
        load_state_dict_file(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="unsupported"):
        (tmp_path / "w.npz").write_bytes(b"")
        load_state_dict_file(tmp_path / "w.npz")


def test_wrapped_checkpoints_are_unwrapped(tmp_path):
    """Lightning-style {"state_dict": ...} files and full LDM checkpoints (first_stage_model.*) load."""
    torch.manual_seed(3)
    source = build_tokenizer("kl-ae", "tiny", quant_conv=True)
    wrapped = {"state_dict": {f"first_stage_model.{k}": v for k, v in source.state_dict().items()}}
    wrapped["state_dict"]["model.diffusion_model.x"] = torch.zeros(1)
    torch.save(wrapped, tmp_path / "full.ckpt")
    loaded = build_tokenizer("kl-ae", "tiny", quant_conv=True, weights=tmp_path / "full.ckpt")
    _same_state(source, loaded)


def test_taesd_original_pair_layout(tmp_path):
    torch.manual_seed(4)
    source = build_tokenizer("taesd", "taef1")
    save_original_pair(source, tmp_path / "taef1_encoder.pth", tmp_path / "taef1_decoder.pth")
    halves = torch.load(tmp_path / "taef1_encoder.pth", weights_only=True)
    assert "0.weight" in halves and "1.conv.0.weight" in halves  # plain Sequential indices
    for half in ("encoder", "decoder"):  # either half finds the other
        _same_state(source, build_tokenizer("taesd", "taef1", weights=tmp_path / f"taef1_{half}.pth"))
    (tmp_path / "taef1_decoder.pth").unlink()
    with pytest.raises(FileNotFoundError, match="taef1_decoder.pth"):
        build_tokenizer("taesd", "taef1", weights=tmp_path / "taef1_encoder.pth")


def test_cosmos_torchscript_files(tmp_path):
    """Cosmos ships TorchScript halves: encoder.jit (encoder, quant_conv), decoder.jit (post_quant_conv, decoder)."""
    torch.manual_seed(5)
    source = build_tokenizer("cosmos-ci", "tiny").eval()
    patched = torch.zeros(1, 48, 8, 8)
    encoder_half = torch.nn.Sequential(OrderedDict(encoder=source.encoder, quant_conv=source.quant_conv))
    decoder_half = torch.nn.Sequential(OrderedDict(post_quant_conv=source.post_quant_conv, decoder=source.decoder))
    torch.jit.trace(encoder_half, patched).save(str(tmp_path / "encoder.jit"))
    torch.jit.trace(decoder_half, torch.zeros(1, 16, 4, 4)).save(str(tmp_path / "decoder.jit"))
    loaded = build_tokenizer("cosmos-ci", "tiny", weights=tmp_path / "encoder.jit")
    _same_state(source, loaded)


def test_urls_are_refused_and_missing_files_say_where_to_get_them(tmp_path):
    with pytest.raises(WeightsError, match="local files only"):
        load_state_dict_file("hf://black-forest-labs/FLUX.1-schnell/ae.safetensors")
    with pytest.raises(FileNotFoundError) as info:
        build_tokenizer("kl-ae", "flux", weights=tmp_path / "ae.safetensors")
    message = str(info.value)
    assert str(tmp_path / "ae.safetensors") in message and "tokenizer.weights" in message
    assert "FLUX.1" in message and "ae.safetensors" in message


def test_shipped_taef2_loads_strictly(shared_data):
    model = build_tokenizer("taesd", "taef2", weights=shared_data / "taesd" / "taef2_encoder.pth")
    original = torch.load(shared_data / "taesd" / "taef2_decoder.pth", weights_only=True, map_location="cpu")
    assert len(original) == 79
    for key, value in original.items():
        assert torch.equal(model.decoder.state_dict()[key], value.float()), key


@pytest.mark.slow
def test_taef2_reconstructs_kodak(shared_data):
    """Encode → decode all 24 Kodak images, centre-cropped to 128² for speed; mean uint8 PSNR ≥ 28.75 dB.

    Measured: 29.04 dB on these crops, 29.37 dB on 192² crops (2.2× the time), 30.19 dB on the full-size images
    (data/README.md: ≈ 30.2 dB); the untrained model: 7.1 dB on the first 8 crops.
    """
    model = build_tokenizer("taesd", "taef2", weights=shared_data / "taesd" / "taef2_encoder.pth").eval()
    files = sorted((shared_data / "kodak24").glob("kodim*.png"))
    assert len(files) == 24
    side = 128
    crops = []
    for f in files:
        img = np.array(Image.open(f).convert("RGB"))
        top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
        crops.append(img[top:top + side, left:left + side])
    ref = np.stack(crops)  # (24, side, side, 3) uint8
    x = torch.from_numpy(ref).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        y = torch.cat([model.decode(model.encode(chunk)) for chunk in x.split(8)])
    out = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    mse = ((out.astype(np.float64) - ref.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(255.0**2 / mse)
    assert psnr.mean() >= 28.75, psnr


def test_cosmos_autoencoder_jit_loads_strictly_and_reports_missing_keys(tmp_path):
    """autoencoder.jit (the whole traced model) loads strictly; a half without its partner names the missing keys."""
    torch.manual_seed(6)
    source = build_tokenizer("cosmos-ci", "tiny").eval()
    x = torch.zeros(1, 3, 16, 16)
    torch.jit.trace(traceable_autoencoder(source), x).save(str(tmp_path / "autoencoder.jit"))
    _same_state(source, build_tokenizer("cosmos-ci", "tiny", weights=tmp_path / "autoencoder.jit"))
    half = torch.nn.Sequential(OrderedDict(encoder=source.encoder, quant_conv=source.quant_conv))
    torch.jit.trace(half, torch.zeros(1, 48, 8, 8)).save(str(tmp_path / "lonely_encoder.jit"))
    with pytest.raises(WeightsError, match=r"missing from the file: (decoder|post_quant_conv)\."):
        build_tokenizer("cosmos-ci", "tiny", weights=tmp_path / "lonely_encoder.jit")


def traceable_autoencoder(model):
    """A traceable wrapper returning the reconstruction of ``model`` (TorchScript needs tensor outputs)."""

    class Reconstruct(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = model.encoder, model.decoder
            self.quant_conv, self.post_quant_conv = model.quant_conv, model.post_quant_conv

        def forward(self, x):
            return model.decode(model.encode(x))

    return Reconstruct()
