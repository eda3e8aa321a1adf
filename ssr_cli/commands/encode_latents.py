"""`ssr encode-latents`: cache the (fine-tuned) tokenizer's latents of a data set."""

from __future__ import annotations

from ssr_cli.commands.common import DeviceOpt, DryRunOpt, RecipeArg, SetOpt, load_recipe, run_dry, start_run


def encode_latents(recipe: RecipeArg, set_: SetOpt = None, dry_run: DryRunOpt = False, device: DeviceOpt = None) -> None:
    """Encode \\[data] with the run's fine-tuned tokenizer (or \\[tokenizer].weights) into safetensors shards.

    Writes shards with latents, their horizontal-flip copies and labels, per-channel stats and a manifest
    (tokenizer, weights hash, recipe) to \\[latents].out_dir (default <run>/latents). Finished shards are kept
    when re-run; works under torchrun.
    """
    cfg = load_recipe(recipe, set_, device)
    if dry_run:
        run_dry(cfg, ("encode-latents",))
        return
    from ssr_cli.latents import encode_latents as run

    with start_run(cfg) as rt:
        run(cfg, rt)
