"""`ssr encode-latents`: cache the (fine-tuned) tokenizer's latents of a data set."""

from __future__ import annotations

from ssr_cli.commands.common import DeviceOpt, DryRunOpt, RecipeArg, SetOpt, run_command


def encode_latents(recipe: RecipeArg, set_: SetOpt = None, dry_run: DryRunOpt = False, device: DeviceOpt = None) -> None:
    """Encode [data] with the run's fine-tuned tokenizer (or [tokenizer].weights) into safetensors shards.

    Writes shards with latents, their horizontal-flip copies and labels, per-channel stats and a manifest
    (tokenizer, weights hash, recipe) to [latents].out_dir (default <run>/latents). Finished shards are kept
    when re-run; works under torchrun.
    """
    run_command(recipe, set_, device, dry_run, "encode_latents")
