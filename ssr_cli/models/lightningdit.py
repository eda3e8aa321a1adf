"""LightningDiT checkpoints (hustvl/LightningDiT ``.pt``): import into our DiT and export from it.

Conventions, theirs → ours (our DiT is the same network; only these differ or need checking):
  patch embedding  a stride-p conv ``x_embedder.proj`` (D, C, p, p) → our linear ``x_embedder`` (D, p·p·C) over
                   patches flattened as (pi, pj, c): weight.permute(0, 2, 3, 1).reshape(D, −1); the same map.
  time input       LightningDiT feeds t ∈ [0, 1] to the 256-frequency sinusoid as is; our DiTs trained here see
                   1000·t. An imported DiT gets ``time_scale = 1``; only a ``time_scale = 1`` DiT exports exactly.
  direction of t   both follow the SiT "Linear" path: x_t = t·x1 + (1 − t)·noise, t = 0 noise, t = 1 data, the
                   ODE integrated from 0 to 1; nothing is flipped.
  velocity sign    both predict v = x1 − noise (dx_t/dt); nothing is negated. ``learn_sigma`` checkpoints have
                   2C output channels of which LightningDiT uses the first C; import keeps those rows.
  null class       row ``num_classes`` of ``y_embedder.embedding_table`` in both (the checkpoint has
                   num_classes + 1 rows when trained with label dropout).
  RoPE             EVA-style ``feat_rope.freqs_cos/freqs_sin`` buffers (L, head_dim), each pair's angle twice,
                   rows for the first half of the head, columns for the second: checked equal to our rotation
                   on import (they give the head count) and written on export.
  pos_embed        a frozen parameter in both state dicts; copied, so its own (column-first) sin-cos order is kept.
  normalisation    LightningDiT trains on (z − mean) / std · latent_multiplier with ``latents_stats.pt`` holding
                   mean, std of shape (1, C, 1, 1); ours on (z − mean) / std. Imported: std / multiplier.
Supported: the released configuration (use_swiglu, use_rmsnorm, use_rope, adaLN with shift; qk-norm optional).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ssr_cli.errors import UserFileNotFoundError
from ssr_cli.models.dit import DIT_SIZES, DiT, build_dit, rope_2d_angles
from ssr_cli.models.weights import WeightsError, read_torch_tensors

_ROPE_KEYS = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")


def checkpoint_state(path: str | Path, use: str = "ema") -> dict[str, torch.Tensor]:
    """The model tensors of a LightningDiT ``.pt``: its ``ema`` (or ``model``) entry, or the file itself when it
    is a bare state dict; a DDP ``module.`` prefix is removed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserFileNotFoundError(f"LightningDiT checkpoint not found: {path}")
    data = read_torch_tensors(path, "a LightningDiT .pt")
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a dict (a state dict or {{'model', 'ema'}}), found {type(data).__name__}")
    if use in data and isinstance(data[use], dict):
        data = data[use]
    elif any(k in data for k in ("ema", "model")):
        raise WeightsError(f"{path}: expected an {use!r} entry, found entries {sorted(k for k in data)}")
    state = {k.removeprefix("module."): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"{path}: expected model tensors, found none")
    return state


def _need(state: dict, key: str, what: str) -> torch.Tensor:
    if key not in state:
        found = ", ".join(sorted(state)[:6])
        raise WeightsError(f"expected a LightningDiT state dict with {key} ({what}), found keys {found}, …")
    return state[key]


def from_lightningdit(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(build kwargs for :func:`ssr_cli.models.dit.build_dit` plus ``name``, our state dict) of a LightningDiT one."""
    if "x_embedder.weight" in state:
        raise WeightsError("expected a LightningDiT state dict (x_embedder.proj.weight), found ssr's own DiT layout "
                           "(x_embedder.weight): load it as a run's dit_ema.safetensors instead")
    patch = _need(state, "x_embedder.proj.weight", "the conv patch embedding")
    hidden, channels, p, _ = patch.shape
    _need(state, "blocks.0.mlp.w12.weight", "use_swiglu = true; ssr's DiT has no GELU MLP")
    _need(state, "blocks.0.norm1.weight", "use_rmsnorm = true; ssr's DiT has no affine-free LayerNorm")
    cos = _need(state, _ROPE_KEYS[0], "use_rope = true; it also gives the head count")
    ada = _need(state, "blocks.0.adaLN_modulation.1.weight", "the adaLN modulation")
    if ada.shape[0] != 6 * hidden:
        raise WeightsError(f"expected adaLN with shift (6·{hidden} rows, wo_shift = false), found {ada.shape[0]} rows")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    length, head_dim = cos.shape[-2:]
    grid = math.isqrt(length)
    num_heads = hidden // head_dim
    table = _need(state, "y_embedder.embedding_table.weight", "the class embedding")
    out_rows = _need(state, "final_layer.linear.weight", "the output layer").shape[0]
    if out_rows not in (p * p * channels, 2 * p * p * channels):
        raise WeightsError(f"expected final_layer.linear with {p * p * channels} (or learn_sigma: "
                           f"{2 * p * p * channels}) rows, found {out_rows}")
    angles = rope_2d_angles(head_dim, grid)
    for key, fn in zip(_ROPE_KEYS, (torch.cos, torch.sin)):
        theirs = state[key].reshape(length, head_dim).float()
        if not (torch.allclose(theirs[:, 0::2], fn(angles), atol=1e-4)
                and torch.allclose(theirs[:, 1::2], fn(angles), atol=1e-4)):
            raise WeightsError(f"{key}: expected EVA 2D RoPE tables (theta 10000, rows then columns) for a "
                               f"{grid}×{grid} grid, found other values")
    kwargs = dict(name=_size_name(depth, hidden, num_heads, p), input_size=grid * p, in_channels=channels,
                  num_classes=table.shape[0] - 1, qk_norm="blocks.0.attn.q_norm.weight" in state,
                  depth=depth, hidden_size=hidden, num_heads=num_heads, time_scale=1.0)
    ours = {k: v for k, v in state.items() if k not in _ROPE_KEYS and not k.startswith("x_embedder.proj.")}
    ours["x_embedder.weight"] = patch.permute(0, 2, 3, 1).reshape(hidden, p * p * channels)
    ours["x_embedder.bias"] = _need(state, "x_embedder.proj.bias", "the patch embedding bias")
    if out_rows == 2 * p * p * channels:  # learn_sigma: keep the velocity half of every patch position
        for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
            value = state[key]
            ours[key] = value.reshape(p * p, 2 * channels, *value.shape[1:])[:, :channels].reshape(-1, *value.shape[1:])
    return kwargs, ours


def _size_name(depth: int, hidden: int, heads: int, patch: int) -> str:
    for name, size in DIT_SIZES.items():
        if (size.depth, size.hidden_size, size.num_heads, size.patch_size) == (depth, hidden, heads, patch):
            return name
    if f"DiT-B/{patch}" not in DIT_SIZES:
        raise WeightsError(f"expected a LightningDiT with patch size 1 or 2, found {patch}")
    return f"DiT-B/{patch}"  # the named size only supplies the patch size; depth, width and heads are explicit


def load_lightningdit(path: str | Path, use: str = "ema") -> tuple[DiT, dict]:
    """Our DiT holding a LightningDiT checkpoint's weights (strictly: every tensor placed), and its kwargs."""
    kwargs, state = from_lightningdit(checkpoint_state(path, use))
    build = dict(kwargs)
    model = build_dit(build.pop("name"), **build)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise WeightsError(f"{path}: LightningDiT tensors do not fit the DiT they describe: missing {missing[:6]}, "
                           f"unexpected {unexpected[:6]}, mis-shaped {shapes[:6]}")
    model.load_state_dict(state)
    return model.eval(), kwargs


def to_lightningdit(model: DiT) -> dict[str, torch.Tensor]:
    """Our DiT's state dict in LightningDiT's layout (for ``LightningDiT(..., use_swiglu, use_rope, use_rmsnorm)``)."""
    if model.time_scale != 1.0:
        raise WeightsError(f"expected a DiT with time_scale 1 (LightningDiT feeds t itself to the sinusoid), found "
                           f"time_scale {model.time_scale:g}: train with dit.time_scale = 1 to export to LightningDiT")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    p, c, d = model.patch_size, model.in_channels, model.hidden_size
    state["x_embedder.proj.weight"] = state.pop("x_embedder.weight").reshape(d, p, p, c).permute(0, 3, 1, 2).contiguous()
    state["x_embedder.proj.bias"] = state.pop("x_embedder.bias")
    angles = rope_2d_angles(d // model.num_heads, model.grid).repeat_interleave(2, dim=-1)
    state[_ROPE_KEYS[0]], state[_ROPE_KEYS[1]] = torch.cos(angles), torch.sin(angles)
    return state


def read_stats(path: str | Path, latent_multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (mean, std), each (C,), from a LightningDiT ``latents_stats.pt``: x = (z − mean) / (std / multiplier)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserFileNotFoundError(f"latent statistics not found: {path} (LightningDiT's latents_stats.pt)")
    stats = read_torch_tensors(path, "LightningDiT's latents_stats.pt")
    if not (isinstance(stats, dict) and all(isinstance(stats.get(k), torch.Tensor) for k in ("mean", "std"))):
        found = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
        raise WeightsError(f"{path}: expected a dict with tensors 'mean' and 'std', found {found}")
    if latent_multiplier <= 0:
        raise WeightsError(f"latent_multiplier must be > 0, found {latent_multiplier}")
    return stats["mean"].flatten().float(), (stats["std"].flatten().float() / latent_multiplier)


def write_stats(path: str | Path, mean: torch.Tensor, std: torch.Tensor) -> Path:
    """LightningDiT's ``latents_stats.pt``: {'mean', 'std'} of shape (1, C, 1, 1), as its dataset computes them."""
    path = Path(path)
    torch.save({"mean": mean.detach().float().reshape(1, -1, 1, 1).cpu(),
                "std": std.detach().float().reshape(1, -1, 1, 1).cpu()}, path)
    return path
