"""`ssr finetune`: fine-tune a tokenizer with the SSR regularizer (or EQ-VAE / FT-SE / none)."""

from __future__ import annotations

from ssr_cli.commands.common import (
    DeviceOpt,
    DryRunOpt,
    RecipeArg,
    SetOpt,
    console,
    fail,
    load_recipe,
    print_recipe,
    run_command,
)


def finetune(recipe: RecipeArg, set_: SetOpt = None, dry_run: DryRunOpt = False, device: DeviceOpt = None) -> None:
    """Fine-tune the recipe's tokenizer with its [regularizer] on its [data]; resumable.

    For tokenizer.family "s4d-vae" / "cnn-vae" it trains that VAE from scratch instead (NELBO with the
    [vae] KL schedule and posterior-collapse alarm; <run>/vae/{checkpoints,images,metrics.jsonl}).

    Writes <run.out_dir>/<run.name>/: recipe.resolved.toml, finetune/{checkpoints,images,metrics.jsonl}
    and tokenizer.safetensors (the fine-tuned weights in the original key layout).
    """
    from ssr_cli.stages.common import is_vae_family

    if not dry_run:  # the vector VAEs (s4d-vae, cnn-vae) train from scratch in their own stage
        run_command(recipe, set_, device, False, lambda cfg: "vae" if is_vae_family(cfg) else "finetune")
        return
    from rich.table import Table

    from ssr_cli.errors import UserError
    from ssr_cli.models.registry import parameter_counts
    from ssr_cli.stages.common import build_tokenizer
    from ssr_cli.stages.pipeline import check_builds

    cfg = load_recipe(recipe, set_, device)
    print_recipe(cfg)
    try:
        check_builds(cfg, ("finetune",))  # the tokenizer and the regularizer that must fit it
        tok = build_tokenizer(cfg, weights=None)
        if not is_vae_family(cfg):  # the vector VAEs train from scratch: nothing frozen
            tok.frozen_blocks(cfg.tokenizer.frozen_encoder_blocks, cfg.tokenizer.frozen_decoder_blocks)
    except UserError as exc:  # as run_dry: a user error is one line, anything else keeps its traceback
        fail(str(exc))
    counts = parameter_counts(tok)
    table = Table(title=f"tokenizer {cfg.tokenizer.family}/{cfg.tokenizer.size}")
    table.add_column("parameters")
    table.add_column("count", justify="right")
    for key, value in counts.items():
        table.add_row(key, f"{value / 1e6:.2f}M ({value:,})")
    console.print(table)
