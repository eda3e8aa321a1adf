"""KL-AE with LDM attn_resolutions (the VA-VAE layout): level attention keys and where attention runs."""

from __future__ import annotations

import torch

from ssr_cli.models.kl_ae import KLAEParams, KLAutoEncoder

# VA-VAE's layout (ch_mult 1,1,2,2,4, 32 latent channels, attention at 16 px of 256), scaled down: 32-px
# images, so attention at 2 px, i.e. the deepest level, as 16 of 256 is in VA-VAE.
SMALL = KLAEParams(ch=8, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=32, norm_groups=4,
                   attn_resolutions=(2,), resolution=32, scale_factor=1.0, shift_factor=0.0)


def test_attention_keys_and_strict_round_trip():
    torch.manual_seed(0)
    model = KLAutoEncoder(SMALL)
    keys = list(model.state_dict())
    enc_attn = {k.split(".attn.")[0] + ".attn." + k.split(".attn.")[1].split(".")[0]
                for k in keys if k.startswith("encoder.down.") and ".attn." in k}
    dec_attn = {k.split(".attn.")[0] + ".attn." + k.split(".attn.")[1].split(".")[0]
                for k in keys if k.startswith("decoder.up.") and ".attn." in k}
    assert enc_attn == {"encoder.down.4.attn.0", "encoder.down.4.attn.1"}
    assert dec_attn == {"decoder.up.4.attn.0", "decoder.up.4.attn.1", "decoder.up.4.attn.2"}
    other = KLAutoEncoder(SMALL)
    result = other.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.raw_moments(x)[0], other.raw_moments(x)[0])


def test_attention_runs_at_the_stated_resolution():
    torch.manual_seed(0)
    model = KLAutoEncoder(SMALL).eval()
    sizes = []
    for name, module in model.named_modules():
        if ".attn." in name and name.count(".") == 4:
            module.register_forward_hook(lambda m, inp, out, n=name: sizes.append((n, tuple(inp[0].shape[-2:]))))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = model.raw_moments(x)[0]
        model.decoder(z)
    assert len(sizes) == 5 and all(size == (2, 2) for _, size in sizes)
    # and the blocks change the result: re-drawing one level-attention projection moves the latent
    with torch.no_grad():
        before = model.raw_moments(x)[0].clone()
        torch.nn.init.normal_(model.encoder.down[4].attn[0].proj_out.weight, std=1.0)
        assert not torch.allclose(model.raw_moments(x)[0], before)
