"""`ssr train-dit`: train a LightningDiT on cached latents."""

from __future__ import annotations

from ssr_cli.commands.common import DeviceOpt, DryRunOpt, RecipeArg, SetOpt, run_command


def train_dit(recipe: RecipeArg, set_: SetOpt = None, dry_run: DryRunOpt = False, device: DeviceOpt = None) -> None:
    """Train the [dit] model (rectified flow, logit-normal t, AdamW, EMA) on the run's cached latents.

    Resumable: re-running the same command continues from the newest valid checkpoint in <run>/dit/.
    Writes <run>/dit/dit_ema.safetensors and dit_config.json at the end. Works under torchrun.
    """
    run_command(recipe, set_, device, dry_run, "train_dit")
