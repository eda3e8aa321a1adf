"""`ssr train-dit`: train a LightningDiT on cached latents."""

from __future__ import annotations

from ssr_cli.commands.common import DeviceOpt, DryRunOpt, RecipeArg, SetOpt, load_recipe, run_dry, start_run


def train_dit(recipe: RecipeArg, set_: SetOpt = None, dry_run: DryRunOpt = False, device: DeviceOpt = None) -> None:
    """Train the \\[dit] model (rectified flow, logit-normal t, AdamW, EMA) on the run's cached latents.

    Resumable: re-running the same command continues from the newest valid checkpoint in <run>/dit/.
    Writes <run>/dit/dit_ema.safetensors and dit_config.json at the end. Works under torchrun.
    """
    cfg = load_recipe(recipe, set_, device)
    if dry_run:
        run_dry(cfg, ("train-dit",))
        return
    from ssr_cli.generate import run_train_dit

    with start_run(cfg) as rt:
        run_train_dit(cfg, rt)
