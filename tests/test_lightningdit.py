"""LightningDiT checkpoints: import and export against a reference LightningDiT written here from the published
architecture (SiT/DiT backbone with a conv patch embedding, RMSNorm, SwiGLU, EVA-style 2D RoPE buffers, raw-t
sinusoid), with every tensor random so no zero-initialised layer can hide a mis-mapped one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssr_cli.models.dit import build_dit
from ssr_cli.models.lightningdit import (
    checkpoint_state,
    from_lightningdit,
    load_lightningdit,
    read_stats,
    to_lightningdit,
    write_stats,
)
from ssr_cli.models.weights import WeightsError

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- reference LightningDiT

class RefRMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * self.weight


def ref_rotate_half(x):
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class RefRope(nn.Module):
    """EVA 'fast' vision RoPE: per-axis frequencies 1/theta^(2i/d) for d = head_dim/2, each repeated for its pair,
    the row half then the column half, stored as (L, head_dim) cos/sin buffers (saved in the state dict)."""

    def __init__(self, half_head_dim: int, grid: int) -> None:
        super().__init__()
        freqs = 1.0 / 10000 ** (torch.arange(0, half_head_dim, 2)[: half_head_dim // 2].float() / half_head_dim)
        per_axis = torch.outer(torch.arange(grid).float(), freqs).repeat_interleave(2, dim=-1)  # (g, d)
        table = torch.cat([per_axis[:, None, :].expand(grid, grid, -1), per_axis[None, :, :].expand(grid, grid, -1)],
                          dim=-1).reshape(grid * grid, -1)
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    def forward(self, x):
        return x * self.freqs_cos + ref_rotate_half(x) * self.freqs_sin


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RefRMSNorm(dim), RefRMSNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.q_norm = RefRMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.attn.k_norm = RefRMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.attn.proj = nn.Linear(dim, dim)
        hidden = int(2 / 3 * int(dim * 4.0))
        self.mlp = nn.Module()
        self.mlp.w12, self.mlp.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def attention(self, x, rope):
        b, n, d = x.shape
        q, k, v = self.attn.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rope(self.attn.q_norm(q)), rope(self.attn.k_norm(k))
        weights = ((q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # explicit, not SDPA
        return self.attn.proj((weights @ v).transpose(1, 2).reshape(b, n, d))

    def forward(self, x, c, rope):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attention(self.norm1(x) * (1 + sc1.unsqueeze(1)) + s1.unsqueeze(1), rope)
        h = self.norm2(x) * (1 + sc2.unsqueeze(1)) + s2.unsqueeze(1)
        a, b = self.mlp.w12(h).chunk(2, dim=-1)
        return x + g2.unsqueeze(1) * self.mlp.w3(F.silu(a) * b)


class RefLightningDiT(nn.Module):
    def __init__(self, *, input_size=8, patch=2, channels=4, dim=64, depth=2, heads=4, classes=10,
                 qk_norm=False, learn_sigma=False) -> None:
        super().__init__()
        self.patch, self.channels, self.learn_sigma = patch, channels, learn_sigma
        out = 2 * channels if learn_sigma else channels
        self.out_channels = out
        grid = input_size // patch
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(channels, dim, patch, stride=patch)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(classes + 1, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim), requires_grad=False)
        self.feat_rope = RefRope(dim // heads // 2, grid)
        self.blocks = nn.ModuleList([RefBlock(dim, heads, qk_norm) for _ in range(depth)])
        self.final_layer = nn.Module()
        self.final_layer.norm_final = RefRMSNorm(dim)
        self.final_layer.linear = nn.Linear(dim, patch * patch * out)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, t, y):
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]  # t itself, no 1000x
        c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        c = c + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            h = block(h, c, self.feat_rope)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        h = self.final_layer.linear(self.final_layer.norm_final(h) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))
        n, g, p = h.shape[0], math.isqrt(h.shape[1]), self.patch
        out = torch.einsum("nhwpqc->nchpwq", h.reshape(n, g, g, p, p, self.out_channels))
        out = out.reshape(n, self.out_channels, g * p, g * p)
        return out[:, : self.channels] if self.learn_sigma else out


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if "norm" in name else 0.0))
    return module.eval()


def _inputs(channels=4, size=8, classes=10):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, channels, size, size, generator=gen)
    t = torch.tensor([0.0, 0.13, 0.5, 1.0])
    y = torch.tensor([0, 3, classes, 9])  # index `classes` is the null class
    return x, t, y


@pytest.mark.parametrize("patch, qk_norm, learn_sigma", [(2, False, False), (1, True, False), (2, True, True)])
def test_imported_checkpoint_gives_the_reference_velocity(tmp_path, patch, qk_norm, learn_sigma):
    ema = _randomise(RefLightningDiT(patch=patch, qk_norm=qk_norm, learn_sigma=learn_sigma), seed=1)
    raw = _randomise(RefLightningDiT(patch=patch, qk_norm=qk_norm, learn_sigma=learn_sigma), seed=2)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {"step": torch.tensor(3)}}, path)
    x, t, y = _inputs()
    for use, ref in (("ema", ema), ("model", raw)):
        model, kwargs = load_lightningdit(path, use)
        assert (kwargs["depth"], kwargs["hidden_size"], kwargs["num_heads"], model.patch_size) == (2, 64, 4, patch)
        assert kwargs["num_classes"] == 10 and kwargs["qk_norm"] == qk_norm and model.time_scale == 1.0
        with torch.no_grad():  # float32 op-order rounding differs between CPUs: up to 2.3e-4 seen on outputs of
            # size ~1 (weights 0.3·N(0, 1)); a wrong key or layout is off by O(1)
            torch.testing.assert_close(model(x, t, y), ref(x, t, y), rtol=1e-3, atol=1e-3)


def test_export_loads_strictly_into_the_reference_with_the_same_velocity():
    torch.manual_seed(0)
    ours = _randomise(build_dit("DiT-B/2", input_size=8, in_channels=4, num_classes=10, depth=2, hidden_size=64,
                                num_heads=4, qk_norm=True, time_scale=1.0), seed=3)
    ref = RefLightningDiT(qk_norm=True).eval()
    ref.load_state_dict(to_lightningdit(ours), strict=True)
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ref(x, t, y), ours(x, t, y), rtol=1e-4, atol=1e-4)
    # And back again: identical tensors.
    kwargs, state = from_lightningdit(to_lightningdit(ours))
    for key, value in ours.state_dict().items():
        assert torch.equal(state[key], value), key


def test_time_scale_is_what_differs_from_a_native_dit():
    """Same weights, our native 1000·t: a different velocity; so export refuses such a DiT."""
    ref = _randomise(RefLightningDiT(), seed=4)
    kwargs, state = from_lightningdit(ref.state_dict())
    kwargs.pop("time_scale")
    native = build_dit(kwargs.pop("name"), **kwargs)
    native.load_state_dict(state)
    x, t, y = _inputs()
    with torch.no_grad():
        assert (native(x, t, y) - ref(x, t, y)).abs().max() > 1e-2
    with pytest.raises(WeightsError, match="time_scale 1000.*dit.time_scale = 1"):
        to_lightningdit(native)


def test_wrong_checkpoints_say_what_was_expected(tmp_path):
    state = _randomise(RefLightningDiT(), seed=6).state_dict()
    ours = build_dit("DiT-B/2", input_size=8, in_channels=4, num_classes=10, depth=1, hidden_size=64, num_heads=4)
    with pytest.raises(WeightsError, match=r"x_embedder.proj.weight.*ssr's own DiT layout"):
        from_lightningdit(ours.state_dict())
    gelu = {k.replace("mlp.w12", "mlp.fc1"): v for k, v in state.items()}
    with pytest.raises(WeightsError, match=r"blocks.0.mlp.w12.weight \(use_swiglu = true"):
        from_lightningdit(gelu)
    no_rope = {k: v for k, v in state.items() if not k.startswith("feat_rope")}
    with pytest.raises(WeightsError, match=r"feat_rope.freqs_cos \(use_rope = true"):
        from_lightningdit(no_rope)
    bad_rope = {**state, "feat_rope.freqs_cos": state["feat_rope.freqs_cos"].flip(0)}
    with pytest.raises(WeightsError, match="expected EVA 2D RoPE tables"):
        from_lightningdit(bad_rope)
    torch.save({"model": state}, tmp_path / "only_model.pt")
    with pytest.raises(WeightsError, match=r"expected an 'ema' entry, found entries \['model'\]"):
        checkpoint_state(tmp_path / "only_model.pt", "ema")


def test_stats_follow_lightningdit_normalisation(tmp_path):
    mean, std = torch.randn(4), torch.rand(4) + 0.5
    path = write_stats(tmp_path / "latents_stats.pt", mean, std)
    raw = torch.load(path, weights_only=True)
    assert raw["mean"].shape == (1, 4, 1, 1) and raw["std"].shape == (1, 4, 1, 1)
    m, s = read_stats(path, latent_multiplier=0.5)
    z = torch.randn(2, 4, 3, 3)
    # LightningDiT's model input (z − mean) / std · multiplier equals ours (z − m) / s.
    theirs = (z - raw["mean"]) / raw["std"] * 0.5
    torch.testing.assert_close((z - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1), theirs)


def test_import_dit_makes_it_the_runs_dit(tmp_path):
    from typer.testing import CliRunner

    from ssr_cli.cli import app
    from ssr_cli.stages.common import dit_latent_stats, load_trained_dit

    ref = _randomise(RefLightningDiT(), seed=9)
    torch.save({"ema": ref.state_dict()}, tmp_path / "lightningdit.pt")
    write_stats(tmp_path / "latents_stats.pt", torch.arange(4.0), torch.full((4,), 2.0))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[run]\nname = "imp"\nout_dir = "{tmp_path}"\ndevice = "cpu"\n')
    args = ["import-dit", str(tmp_path / "lightningdit.pt"), str(recipe), "--stats", str(tmp_path / "latents_stats.pt"),
            "--latent-multiplier", "0.5"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from ssr_cli.recipe import load

    cfg = load(recipe, [])
    model, kwargs = load_trained_dit(cfg)
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), ref(x, t, y), rtol=1e-4, atol=1e-4)
    mean, std = dit_latent_stats(cfg)
    assert mean.tolist() == [0.0, 1.0, 2.0, 3.0] and std.tolist() == [4.0] * 4
    # A wrong file: one line saying what was expected.
    torch.save({"ema": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    args[1] = str(tmp_path / "other.pt")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "expected a LightningDiT state dict with x_embedder.proj.weight" in result.output
