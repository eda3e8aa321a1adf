"""`ssr probe-channels`: channel unmasking figure, latent dynamics figure, frequency-ordering numbers."""

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


def probe_channels(
    recipe: RunRecipeArg = None,
    set_: SetOpt = None,
    dry_run: DryRunOpt = False,
    device: DeviceOpt = None,
    weights: Annotated[
        Optional[str],
        typer.Option("--weights", help="Probe this tokenizer weights file instead of the run's fine-tuned one "
                     "(e.g. the pretrained weights, to compare); the Ā scored stays the run's learned one when it has one."),
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default <run>/probe).")] = None,
    compare: CompareOpt = None,
) -> None:
    """Decode with the k lowest-frequency channels (k = 1..C), plot latent dynamics under blur, score the order.

    Writes unmasking.png (C+1 columns; masked channels set to probe.fill: dataset_mean, image_mean or zero),
    latent_dynamics.png (Fig. 5), psnr_vs_k.png, latent_norms.png (Fig. 4(a): per-position latent norm,
    sharp vs τ_max-blurred input, raw and centred), blur_ladder.png (Fig. 8: τ = 0…τ_max in 6 steps at
    data.image_size, images and decoded latents), basis_channels.png (Fig. 9: each basis function beside the
    channel that stands for it) and probe.json (PSNR vs k, two frequency-order scores, the Ā-prediction error
    under blur). The Ā scored is the one the run learned (<run>/finetune/ssr_dynamics.safetensors) when it
    exists, else the recipe's initial A and Δ; probe.json "dynamics" says which. With --compare, also
    compare_psnr_vs_k.png and compare_latent_norms.png (one row per run, one colour scale: e.g. a run trained
    with regularizer.mean_centering = false beside one with it, as in Fig. 4(a)).
    """
    def compare_with(cfg, rt, result) -> None:
        if compare and rt.is_main:
            from ssr_cli.stages.probe_channels import compare_probes, run_probe

            results = compared_results(cfg, result, compare, device, lambda other: run_probe(other, rt))
            compare_probes(results, Path(out) if out else cfg.run_dir() / "probe")

    run_command(current_run_recipe(recipe), set_, device, dry_run, "probe_channels", after=compare_with,
                weights=weights, out_dir=out)
