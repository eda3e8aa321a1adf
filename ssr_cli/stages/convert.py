"""Run-level hand-offs to and from other tools (``ssr import-dit``, ``ssr export-dit``, ``ssr export-tokenizer``).

import-dit   a LightningDiT ``.pt`` (+ its ``latents_stats.pt``) becomes the run's DiT (``<run>/dit/``: weights,
             config with ``time_scale = 1``, latent statistics), so ``ssr sample`` and ``ssr evaluate`` use it.
export-dit   the run's DiT as a LightningDiT checkpoint ``{"model", "ema"}`` plus ``latents_stats.pt`` beside it.
export-tokenizer  the run's (fine-tuned) kl-ae tokenizer as a diffusers ``AutoencoderKL`` folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ssr_cli.engine.atomic import write_json_atomic
from ssr_cli.engine.progress import console
from ssr_cli.models.diffusers_vae import export_diffusers
from ssr_cli.models.lightningdit import load_lightningdit, read_stats, to_lightningdit, write_stats
from ssr_cli.models.weights import WeightsError, save_weights
from ssr_cli.recipe import Recipe
from ssr_cli.stages.common import (
    CONFIG_FILE,
    DIT_DIR,
    EMA_FILE,
    STATS_FILE,
    dit_latent_stats,
    load_tokenizer_for_run,
    load_trained_dit,
)


def import_dit(cfg: Recipe, checkpoint: str | Path, stats: str | Path, *, latent_multiplier: float = 1.0,
               use: str = "ema") -> Path:
    model, kwargs = load_lightningdit(checkpoint, use)
    mean, std = read_stats(stats, latent_multiplier)
    if mean.numel() != kwargs["in_channels"]:
        raise WeightsError(f"{stats}: expected statistics for {kwargs['in_channels']} latent channels (the DiT's), "
                           f"found {mean.numel()}")
    out = cfg.run_dir() / DIT_DIR
    out.mkdir(parents=True, exist_ok=True)
    save_weights({"mean": mean, "std": std}, out / STATS_FILE)
    write_json_atomic(out / CONFIG_FILE, {**kwargs, "imported_from": str(checkpoint), "latents": str(stats)}, indent=2)
    save_weights(model, out / EMA_FILE)
    n = sum(p.numel() for p in model.parameters())
    console.print(f"[green]imported LightningDiT {checkpoint} ({use}, depth {kwargs['depth']}, width "
                  f"{kwargs['hidden_size']}, {kwargs['num_heads']} heads, patch {model.patch_size}, "
                  f"{n / 1e6:.2f}M parameters) into {out}")
    return out / EMA_FILE


def export_dit(cfg: Recipe, out: str | Path, use_ema: bool = True) -> Path:
    model, _ = load_trained_dit(cfg, use_ema=use_ema)
    state = to_lightningdit(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "ema": state}, out)
    mean, std = dit_latent_stats(cfg)
    stats = write_stats(out.parent / "latents_stats.pt", mean, std)
    console.print(f"[green]LightningDiT checkpoint {out} and {stats} (use latent_norm: true, latent_multiplier: 1.0)")
    return out


def export_tokenizer(cfg: Recipe, out: str | Path, sample_size: int | None = None) -> Path:
    tokenizer, source = load_tokenizer_for_run(cfg)
    folder = export_diffusers(tokenizer, out, sample_size=sample_size or cfg.data.image_size)
    console.print(f"[green]diffusers AutoencoderKL folder {folder} (from {source or 'random initialisation'})")
    return folder
