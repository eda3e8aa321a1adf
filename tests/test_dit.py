"""LightningDiT: size, shapes, adaLN-Zero init, 2D RoPE, label dropout, FLOP count."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ssr_cli.models.dit import DIT_SIZES, apply_rope, build_dit, flops_per_image, rope_2d_angles, swiglu_hidden


def tiny(patch: int = 2, **kw):
    name = f"DiT-S/{patch}"
    args = dict(input_size=8, in_channels=4, num_classes=10, depth=2, hidden_size=64, num_heads=2)
    args.update(kw)
    return build_dit(name, **args)


def randomize_zero_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised adaLN/output layers random weights so the output depends on the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_b2_parameter_count_matches_lightningdit():
    with torch.device("meta"):
        model = build_dit("DiT-B/2", input_size=32, in_channels=16, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 130.6e6) <= 0.2e6, n
    assert swiglu_hidden(768) == 2048


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_dit("DiT-H/2", input_size=32, in_channels=16, num_classes=10)
    for name in DIT_SIZES:
        assert name in str(err.value)


def test_sizes_table():
    expected = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for name, size in DIT_SIZES.items():
        letter, patch = name[len("DiT-"):].split("/")
        assert (size.depth, size.hidden_size, size.num_heads) == expected[letter]
        assert size.patch_size == int(patch)


@pytest.mark.parametrize("patch", [1, 2])
def test_output_shape_and_zero_init(patch):
    model = tiny(patch)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: final layer and gates start at zero
    randomize_zero_init(model)
    out = model(x, t, y)
    assert out.shape == x.shape and out.abs().mean() > 0


@pytest.mark.parametrize("patch", [1, 2])
def test_patchify_round_trip(patch):
    model = tiny(patch)
    x = torch.randn(2, 4, 8, 8)
    tokens = model.patchify(x)
    assert tokens.shape == (2, (8 // patch) ** 2, patch * patch * 4)
    assert torch.equal(model.unpatchify(tokens), x)
    # Token (i, j) holds exactly the pixels of patch (i, j).
    assert torch.equal(tokens[0, 1].reshape(patch, patch, 4).permute(2, 0, 1), x[0, :, :patch, patch:2 * patch])


def test_rope_preserves_norms_and_is_relative():
    head_dim, grid = 16, 5
    angles = rope_2d_angles(head_dim, grid)
    cos, sin = torch.cos(angles), torch.sin(angles)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, head_dim, generator=g, dtype=torch.float64).float().expand(1, 1, grid * grid, head_dim)
    k = torch.randn(1, 1, 1, head_dim, generator=g, dtype=torch.float64).float().expand(1, 1, grid * grid, head_dim)
    qr, kr = apply_rope(q, cos, sin)[0, 0], apply_rope(k, cos, sin)[0, 0]
    torch.testing.assert_close(qr.norm(dim=-1), q[0, 0].norm(dim=-1))
    scores = (qr @ kr.T).reshape(grid, grid, grid, grid)  # [r1, c1, r2, c2]
    # Same vector at every position: the score must depend only on (r2 − r1, c2 − c1).
    for dr in range(-grid + 1, grid):
        for dc in range(-grid + 1, grid):
            vals = [scores[r, c, r + dr, c + dc] for r in range(grid) for c in range(grid)
                    if 0 <= r + dr < grid and 0 <= c + dc < grid]
            vals = torch.stack(vals)
            torch.testing.assert_close(vals, vals[:1].expand_as(vals), atol=1e-5, rtol=1e-5)
    # ...and it does depend on the offset, in rows and in columns separately.
    assert (scores[0, 0, 0, 1] - scores[0, 0, 0, 0]).abs() > 1e-3
    assert (scores[0, 0, 1, 0] - scores[0, 0, 0, 0]).abs() > 1e-3
    assert (scores[0, 0, 1, 0] - scores[0, 0, 0, 1]).abs() > 1e-3


def test_class_dropout_only_in_training():
    model = tiny(class_dropout=0.5)
    table = model.y_embedder.embedding_table.weight
    y = torch.arange(10).repeat(40)
    torch.manual_seed(0)
    model.train()
    emb = model.y_embedder(y)
    is_null = torch.isclose(emb, table[10].expand_as(emb)).all(dim=1)
    is_label = torch.isclose(emb, table[y]).all(dim=1)
    assert torch.all(is_null ^ is_label)
    assert 0.4 < is_null.float().mean() < 0.6
    model.eval()
    torch.testing.assert_close(model.y_embedder(y), table[y], rtol=0, atol=0)
    # The null label itself is accepted (classifier-free guidance passes it explicitly).
    torch.testing.assert_close(model.y_embedder(torch.tensor([10])), table[10:11], rtol=0, atol=0)


def test_qk_norm_adds_head_dim_weights():
    plain, normed = tiny(), tiny(qk_norm=True)
    extra = sum(p.numel() for p in normed.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * 2 * 32  # depth 2 × (q and k) × head_dim 32
    randomize_zero_init(normed)
    out = normed(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("patch", [1, 2])
def test_flop_count_matches_torch_flop_counter(patch):
    model = tiny(patch)
    n = 3
    x, t, y = torch.randn(n, 4, 8, 8), torch.rand(n), torch.randint(0, 10, (n,))
    # The math backend decomposes attention into matmuls the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    assert counter.get_total_flops() == n * flops_per_image(model)


def test_b2_flops_match_reference():
    with torch.device("meta"):
        model = build_dit("DiT-B/2", input_size=32, in_channels=16, num_classes=1000)
    # references.md: about 23 G multiply-accumulates per forward at 32×32×16.
    assert abs(flops_per_image(model) / 2 - 23e9) < 0.3e9
