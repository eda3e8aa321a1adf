"""`ssr diffusability`: cheap proxies of how generation-friendly a tokenizer's latent space is."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ssr_cli.commands.common import (
    CompareOpt,
    DeviceOpt,
    DryRunOpt,
    RecipeArg,
    SetOpt,
    WeightsOpt,
    compared_results,
    run_command,
)


def diffusability(
    recipe: RecipeArg,
    set_: SetOpt = None,
    dry_run: DryRunOpt = False,
    device: DeviceOpt = None,
    weights: WeightsOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default <run>/diffusability).")] = None,
    compare: CompareOpt = None,
) -> None:
    """Score the latent space of the recipe's tokenizer on its data with the [diffusability] proxies.

    Latent statistics, radially averaged power spectra (latents and images), equivariance errors (downsampling,
    rot90, flip; Ā error under blur), iFID (decoded nearest-neighbour interpolations; needs
    eval.inception_weights), a nearest-neighbour posterior estimate of the irreducible velocity variance, and
    a fixed-budget flow probe (small LightningDiT: held-out loss per t, FID of its samples). Writes
    diffusability.json, diffusability.png and ranking.md; each proxy is cached in parts/ and an interrupted
    run resumes. With --compare, also compare_diffusability.png/.json and compare_ranking.md.
    """
    def compare_with(cfg, rt, result) -> None:
        if compare and rt.is_main:
            from ssr_cli.stages.diffusability import compare_diffusability, run_diffusability

            results = compared_results(cfg, result, compare, device, lambda other: run_diffusability(other, rt))
            compare_diffusability(results, Path(out) if out else cfg.run_dir() / "diffusability")

    run_command(recipe, set_, device, dry_run, "diffusability", after=compare_with, weights=weights, out_dir=out)
