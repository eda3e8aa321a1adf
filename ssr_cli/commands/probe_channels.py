"""`ssr probe-channels`: channel unmasking figure, latent dynamics figure, frequency-ordering numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ssr_cli.commands.common import (
    DeviceOpt,
    DryRunOpt,
    RecipeArg,
    SetOpt,
    load_recipe,
    print_recipe,
    run_label,
    start_run,
)


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
    compare: Annotated[
        Optional[list[Path]],
        typer.Option("--compare", help="Also probe these recipes' runs (repeatable; --device applies, --set does "
                     "not) and draw all PSNR-vs-k curves in one figure with the scores side by side."),
    ] = None,
) -> None:
    """Decode with the k lowest-frequency channels (k = 1..C), plot latent dynamics under blur, score the order.

    Writes unmasking.png (C+1 columns), latent_dynamics.png, psnr_vs_k.png and probe.json (PSNR vs k, two
    frequency-order scores, the Ā-prediction error under blur). With --compare, also compare_psnr_vs_k.png.
    """
    cfg = load_recipe(recipe, set_, device)
    if dry_run:
        print_recipe(cfg)
        return
    from ssr_cli.probe import run_probe

    with start_run(cfg) as rt:
        result = run_probe(cfg, rt, weights=weights, out_dir=out)
        if compare and rt.is_main:
            from ssr_cli.probe import compare_probes

            results = {cfg.run.name: result}
            for other in compare:
                other_cfg = load_recipe(other, None, device)
                label = run_label(results, other_cfg, other)
                results[label] = run_probe(other_cfg, rt)
            compare_probes(results, Path(out) if out else cfg.run_dir() / "probe")
