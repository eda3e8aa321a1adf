"""`ssr evaluate`: reconstruction and generation metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ssr_cli.commands.common import (
    CompareOpt,
    DeviceOpt,
    DryRunOpt,
    RunRecipeArg,
    SetOpt,
    compared_results,
    current_run_recipe,
    run_command,
)


def evaluate(
    recipe: RunRecipeArg = None,
    set_: SetOpt = None,
    dry_run: DryRunOpt = False,
    device: DeviceOpt = None,
    gfid: Annotated[
        Optional[bool],
        typer.Option("--gfid/--no-gfid", help="Generation metrics (FID, sFID, IS, precision/recall, KID) on the "
                     "samples; default: when samples exist and eval.generation is on.", show_default=False),
    ] = None,
    samples: Annotated[Optional[Path], typer.Option("--samples", help="ADM-style .npz to evaluate (default <run>/samples/samples.npz).")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="Evaluate this tokenizer weights file instead of the run's.")] = None,
    make_ref: Annotated[Optional[Path], typer.Option("--make-ref", help="Only write an ADM reference batch of eval.reference (or [data]) here (.npz): arr_0 (uint8 NHWC "
                  "images, eval.subset applies) + mu/sigma/mu_s/sigma_s, readable by ADM's evaluator.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="JSON output (default <run>/eval.json).")] = None,
    compare: CompareOpt = None,
    mixed_protocols: Annotated[bool, typer.Option("--mixed-protocols", help="With --compare: show runs side by "
                               "side even when their eval.json protocols differ (samples, labels, sampler, CFG, "
                               "quantisation, reference, subset, evaluator); the differences are printed.")] = False,
) -> None:
    """Reconstruction (PSNR, SSIM, LPIPS, rFID) and generation (FID, sFID, IS, precision, recall, KID) metrics.

    For KL tokenizers also the KL of the raw (unscaled, unshifted) posterior to N(0, I), nats per image
    summed over the latent elements (the paper's Fig. 4(b)); absent for deterministic tokenizers.

    Inception (eval.inception_weights) and LPIPS (eval.lpips_weights) weights come from local files; a
    metric that cannot be computed is reported as unavailable with the reason. Prints a table and writes JSON.
    --compare other recipes' runs, e.g. recipes/s4d_vae.toml --compare recipes/cnn_vae.toml; runs evaluated
    under different protocols (eval.json "protocol") are refused unless --mixed-protocols.
    """
    def compare_with(cfg, rt, result) -> None:
        if compare and rt.is_main and make_ref is None:
            from ssr_cli.engine.progress import console
            from ssr_cli.stages.evaluate import check_protocols, print_comparison, run_evaluate

            results = compared_results(cfg, result, compare, device, lambda other: run_evaluate(other, rt, gfid=gfid))
            for line in check_protocols(results, allow_mixed=mixed_protocols):
                console.print(f"[yellow]protocols differ: {line}")
            print_comparison(results)

    options = {"make_ref": make_ref} if make_ref is not None else {"gfid": gfid, "samples": samples,
                                                                    "weights": weights, "out": out}
    run_command(current_run_recipe(recipe), set_, device, dry_run, "evaluate", after=compare_with, **options)
