"""`ssr probe-channels`: channel unmasking figure, latent dynamics figure, frequency-ordering numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ssr_cli.commands.common import DeviceOpt, DryRunOpt, RecipeArg, SetOpt, load_recipe, print_recipe, start_run


def probe_channels(
    recipe: RecipeArg,
    set_: SetOpt = None,
    dry_run: DryRunOpt = False,
    device: DeviceOpt = None,
    weights: Annotated[
        Optional[str],
        typer.Option("--weights", help="Probe this tokenizer weights file instead of the run's fine-tuned one "
                     "(e.g. the pretrained weights, to compare)."),
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default <run>/probe).")] = None,
) -> None:
    """Decode with the k lowest-frequency channels (k = 1..C), plot latent dynamics under blur, score the order.

    Writes unmasking.png (C+1 columns), latent_dynamics.png, psnr_vs_k.png and probe.json (PSNR vs k,
    Spearman correlation between channel order and the radial frequency each channel adds).
    """
    cfg = load_recipe(recipe, set_, device)
    if dry_run:
        print_recipe(cfg)
        return
    from ssr_cli.probe import run_probe

    with start_run(cfg) as rt:
        run_probe(cfg, rt, weights=weights, out_dir=out)
