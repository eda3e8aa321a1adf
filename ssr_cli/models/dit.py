"""LightningDiT: a class-conditional diffusion transformer on latents, in one file.

Architecture (LightningDiT, see ``shared/docs/references.md``): patchify (patch 1 or 2) and a linear
embedding plus a fixed 2D sin-cos position embedding; a sinusoidal timestep embedding through an MLP and a
class embedding with one extra "null" class (index ``num_classes``) used for label dropout and
classifier-free guidance; ``depth`` blocks with adaLN-Zero modulation, RMSNorm, multi-head attention with
2D rotary embedding on q and k (optional RMSNorm qk-norm) and a SwiGLU MLP; a final adaLN layer, a linear
map to ``patch²·C`` and unpatchify. The network predicts the rectified-flow velocity (same shape as the
input, no learned sigma).

Everything in ``forward`` is tensor code without host syncs or data-dependent Python branches, so
``torch.compile(model)`` traces it whole; attention goes through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssr_cli.errors import UserValueError


@dataclass(frozen=True)
class DiTSize:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int


DIT_SIZES: dict[str, DiTSize] = {
    "DiT-S/1": DiTSize(12, 384, 6, 1),
    "DiT-S/2": DiTSize(12, 384, 6, 2),
    "DiT-B/1": DiTSize(12, 768, 12, 1),
    "DiT-B/2": DiTSize(12, 768, 12, 2),
    "DiT-L/1": DiTSize(24, 1024, 16, 1),
    "DiT-L/2": DiTSize(24, 1024, 16, 2),
    "DiT-XL/1": DiTSize(28, 1152, 16, 1),
    "DiT-XL/2": DiTSize(28, 1152, 16, 2),
}

TIME_FREQ_DIM = 256
# The network gets t in [0, 1]; the sinusoid sees 1000·t so its frequencies cover the range the way they
# cover DiT's integer timesteps 0..999 (with t itself the fastest frequency would barely turn once).
TIME_SCALE = 1000.0
ROPE_THETA = 10000.0


def swiglu_hidden(hidden_size: int, mlp_ratio: float = 4.0) -> int:
    """SwiGLU hidden width: 2/3 of the plain MLP's, truncated as LightningDiT does (768 → 2048)."""
    return int(2 / 3 * int(hidden_size * mlp_ratio))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (N, L, D); shift, scale: (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------- position encodings

def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(len(pos), dim) embedding: sin of dim/2 frequencies 1/10000^(i/(dim/2)), then their cos."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, height: int, width: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed (height·width, dim) position embedding (the package's one 2-D sin-cos code; width defaults to height),
    row-major tokens; the first half of dim encodes the row, the second the column, each as :func:`sincos_1d`.
    Computed in float64 and cast once to ``dtype``."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(height if width is None else width), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1)
    return emb.to(dtype)


def rope_2d_angles(head_dim: int, grid: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """Rotation angles (grid², head_dim/2) for axial 2D RoPE on row-major tokens.

    Channel pairs (2j, 2j+1) are rotated together. The first head_dim/4 pairs rotate with the token's row,
    the last head_dim/4 with its column, at frequencies theta^(-i/(head_dim/4)).
    """
    if head_dim % 4:
        raise UserValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = torch.cat([rows.flatten()[:, None] * freqs[None], cols.flatten()[:, None] * freqs[None]], dim=1)
    return angles.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x (N, H, L, Dh) by the angles behind cos, sin (L, Dh/2); computed in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    x_even, x_odd = xf[..., 0], xf[..., 1]
    out = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------- embeddings

class TimestepEmbedder(nn.Module):
    """t in [0, 1] (N,) → (N, D): sinusoid of time_scale·t (256 frequencies) through Linear-SiLU-Linear.

    time_scale is 1000 for models trained here and 1 for imported LightningDiT checkpoints, whose sinusoid sees
    t itself (see ``ssr_cli.models.lightningdit``).
    """

    def __init__(self, hidden_size: int, freq_dim: int = TIME_FREQ_DIM, time_scale: float = TIME_SCALE) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_scale = float(time_scale)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        half = freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = (t.float() * self.time_scale)[:, None] * self.freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb)


class LabelEmbedder(nn.Module):
    """Class label (N,) → (N, D), with row ``num_classes`` the null label.

    In training mode each label is replaced by the null label with probability ``dropout`` (drawn from
    torch's global RNG, which the engine seeds per step and rank), teaching the unconditional model that
    classifier-free guidance needs.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


# ----------------------------------------------------------------------------- transformer

class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.q_norm(q), rope_cos, rope_sin).to(v.dtype)
        k = apply_rope(self.k_norm(k), rope_cos, rope_sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class DiTBlock(nn.Module):
    """Pre-norm attention + SwiGLU, each with adaLN-Zero shift/scale/gate from the conditioning."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a), rope_cos, rope_sin)
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.RMSNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """LightningDiT velocity network. ``forward(x (N,C,H,W), t (N,) in [0,1], y (N,) long) → (N,C,H,W)``.

    ``y == num_classes`` is the null (unconditional) label.
    """

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        num_classes: int,
        patch_size: int = 2,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        qk_norm: bool = False,
        class_dropout: float = 0.1,
        time_scale: float = TIME_SCALE,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise UserValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise UserValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size % 4:
            raise UserValueError(f"hidden_size must be divisible by 4 (2D sin-cos embedding), got {hidden_size}")
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.patch_size, self.hidden_size, self.depth, self.num_heads = patch_size, hidden_size, depth, num_heads
        self.qk_norm, self.class_dropout, self.time_scale = qk_norm, class_dropout, float(time_scale)
        self.grid = input_size // patch_size
        patch_dim = patch_size * patch_size * in_channels

        self.x_embedder = nn.Linear(patch_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout)
        # Fixed sin-cos table, kept as a frozen parameter like DiT/LightningDiT (so it is part of the
        # reported parameter count and of the state dict, but never trained).
        self.pos_embed = nn.Parameter(sincos_2d(hidden_size, self.grid)[None], requires_grad=False)
        angles = rope_2d_angles(hidden_size // num_heads, self.grid)
        self.register_buffer("rope_cos", torch.cos(angles), persistent=False)
        self.register_buffer("rope_sin", torch.sin(angles), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, qk_norm) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # Patch embedding initialised like a conv kernel flattened to a matrix (DiT does the same).
        nn.init.xavier_uniform_(self.x_embedder.weight)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, L, p·p·C), tokens row-major, features ordered (pi, pj, c)."""
        n, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``patchify``: (N, L, p·p·C) → (N, C, H, W)."""
        n = x.shape[0]
        p, g, c = self.patch_size, self.grid, self.in_channels
        x = x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(self.patchify(x)) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c, self.rope_cos, self.rope_sin)
        return self.unpatchify(self.final_layer(h, c))


def build_dit(
    name: str,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int,
    qk_norm: bool = False,
    class_dropout: float = 0.1,
    depth: int | None = None,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    time_scale: float = TIME_SCALE,
) -> DiT:
    """A DiT of a named size (``DIT_SIZES``); depth/hidden_size/num_heads override the size's values."""
    if name not in DIT_SIZES:
        raise UserValueError(f"unknown DiT model {name!r}; choose one of {', '.join(DIT_SIZES)}")
    size = DIT_SIZES[name]
    return DiT(
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        patch_size=size.patch_size,
        hidden_size=hidden_size if hidden_size is not None else size.hidden_size,
        depth=depth if depth is not None else size.depth,
        num_heads=num_heads if num_heads is not None else size.num_heads,
        qk_norm=qk_norm,
        class_dropout=class_dropout,
        time_scale=time_scale,
    )


def flops_per_image(model: DiT) -> int:
    """Forward FLOPs per image (2 × multiply-accumulates) of every matmul, attention included.

    Per-token linears scale with the token count L; the conditioning path (timestep MLP, adaLN
    modulations) runs once per image. Elementwise work (norms, RoPE, softmax, SiLU) is not counted.
    """
    length = model.grid * model.grid
    d = model.hidden_size
    patch_dim = model.patch_size ** 2 * model.in_channels
    ffn = swiglu_hidden(d)
    per_block = (
        length * (3 * d * d + d * d + 2 * d * ffn + ffn * d)  # qkv, proj, SwiGLU
        + 2 * length * length * d  # q·kᵀ and attention·v over all heads
        + d * 6 * d  # adaLN modulation
    )
    macs = (
        length * patch_dim * d  # patch embedding
        + TIME_FREQ_DIM * d + d * d  # timestep MLP
        + model.depth * per_block
        + d * 2 * d + length * d * patch_dim  # final adaLN and output projection
    )
    return 2 * macs
