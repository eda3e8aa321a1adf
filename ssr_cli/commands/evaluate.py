"""`ssr evaluate`."""

from __future__ import annotations

from ssr_cli.commands.common import DeviceOpt, DryRunOpt, RecipeArg, SetOpt, load_recipe, not_implemented, print_recipe


def evaluate(recipe: RecipeArg, set_: SetOpt = None, dry_run: DryRunOpt = False, device: DeviceOpt = None) -> None:
    """Not implemented yet."""
    cfg = load_recipe(recipe, set_, device)
    if dry_run:
        print_recipe(cfg)
        return
    not_implemented("evaluate")
