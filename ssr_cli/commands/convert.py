"""`ssr import-dit`, `ssr export-dit`, `ssr export-tokenizer`: hand-offs to and from LightningDiT and diffusers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ssr_cli.commands.common import RecipeArg, SetOpt, load_recipe, start_run


def import_dit(
    checkpoint: Annotated[Path, typer.Argument(help="LightningDiT .pt (its 'ema' or 'model' entry, or a bare state "
                                                    "dict), any size.", show_default=False)],
    recipe: RecipeArg,
    stats: Annotated[Path, typer.Option("--stats", help="LightningDiT's latents_stats.pt (per-channel mean, std) "
                                        "for the latents the DiT was trained on.", show_default=False)],
    latent_multiplier: Annotated[float, typer.Option("--latent-multiplier", help="LightningDiT's "
                                 "data.latent_multiplier (1.0 for VA-VAE configs).")] = 1.0,
    use: Annotated[str, typer.Option("--use", help="Checkpoint entry: ema or model.")] = "ema",
    set_: SetOpt = None,
) -> None:
    """Make a LightningDiT checkpoint the run's DiT, so `ssr sample` and `ssr evaluate` run it.

    Writes <run>/dit/dit_ema.safetensors, dit_config.json (time_scale 1: LightningDiT feeds t in [0, 1] to its
    sinusoid) and latent_stats.safetensors (mean, std / latent_multiplier). The recipe's tokenizer decodes.
    """
    cfg = load_recipe(recipe, set_)
    from ssr_cli.stages.convert import import_dit as run

    with start_run(cfg):
        run(cfg, checkpoint, stats, latent_multiplier=latent_multiplier, use=use)


def export_dit(
    recipe: RecipeArg,
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write (latents_stats.pt goes beside it).",
                                      show_default=False)],
    raw: Annotated[bool, typer.Option("--raw", help="Export the last training checkpoint instead of the EMA.")] = False,
    set_: SetOpt = None,
) -> None:
    """Write the run's DiT as a LightningDiT checkpoint {"model", "ema"} plus latents_stats.pt.

    Load it with LightningDiT(use_swiglu=True, use_rope=True, use_rmsnorm=True, use_qknorm=dit.qk_norm) and
    latent_norm: true, latent_multiplier: 1.0. Needs a DiT trained with dit.time_scale = 1.
    """
    cfg = load_recipe(recipe, set_)
    from ssr_cli.stages.convert import export_dit as run

    with start_run(cfg):
        run(cfg, out, use_ema=not raw)


def export_tokenizer(
    recipe: RecipeArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write config.json and "
                                      "diffusion_pytorch_model.safetensors into.", show_default=False)],
    sample_size: Annotated[Optional[int], typer.Option("--sample-size", help="config.json sample_size "
                           "(default data.image_size).", show_default=False)] = None,
    set_: SetOpt = None,
) -> None:
    """Write the run's (fine-tuned) kl-ae tokenizer as a diffusers AutoencoderKL folder.

    AutoencoderKL.from_pretrained(folder) reads it; scaling_factor and shift_factor carry the latent normalisation.
    A kl-ae with attention in its down/up levels (size vavae) has no such layout and is refused.
    """
    cfg = load_recipe(recipe, set_)
    from ssr_cli.stages.convert import export_tokenizer as run

    with start_run(cfg):
        run(cfg, out, sample_size=sample_size)
