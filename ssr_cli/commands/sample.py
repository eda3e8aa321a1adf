"""`ssr sample`: draw images from the trained DiT and decode them with the tokenizer."""

from __future__ import annotations

from ssr_cli.commands.common import DeviceOpt, DryRunOpt, RecipeArg, SetOpt, run_command


def sample(recipe: RecipeArg, set_: SetOpt = None, dry_run: DryRunOpt = False, device: DeviceOpt = None) -> None:
    """Sample [sample].num_images images (Euler/Heun ODE, timestep shift, optional CFG with an interval).

    Each image has its own seed, so results do not depend on batch size or GPU count. Writes PNGs and an
    ADM-style samples.npz (arr_0: uint8 NHWC, arr_1: labels) to <run>/samples/; existing PNGs are kept.
    """
    run_command(recipe, set_, device, dry_run, "sample")
