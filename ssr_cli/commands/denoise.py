"""`ssr denoise`: train a small denoiser with and without SSR on its bottleneck (blog 000) and evaluate it."""

from __future__ import annotations

from ssr_cli.commands.common import DeviceOpt, DryRunOpt, RecipeArg, SetOpt, run_command


def denoise(recipe: RecipeArg, set_: SetOpt = None, dry_run: DryRunOpt = False, device: DeviceOpt = None) -> None:
    """Train a compact U-Net denoiser on synthetic Gaussian noise over crops of [data]; resumable.

    [regularizer] kind "ssr" adds the SSR term on the bottleneck features (denoise.bottleneck_channels =
    W·H of regularizer.grid), "none" is the baseline; denoise.compare = true trains both from the same seed.
    Evaluates PSNR/SSIM on held-out images with synthetic noise and, with denoise.eval_pairs, on real
    noisy/clean pairs (e.g. ../shared/data/sidd_pairs), the noisy input's scores beside.

    Writes <run.out_dir>/<run.name>/{baseline,ssr}/: checkpoints, metrics.jsonl, images, denoiser.safetensors,
    denoise_eval.json; and comparison.json when comparing.
    """
    run_command(recipe, set_, device, dry_run, "denoise")
