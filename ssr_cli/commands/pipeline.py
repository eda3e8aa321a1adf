"""`ssr pipeline`: every stage in one run folder."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ssr_cli.commands.common import DeviceOpt, DryRunOpt, RecipeArg, SetOpt, fail, run_command


def pipeline(
    recipe: RecipeArg,
    set_: SetOpt = None,
    dry_run: DryRunOpt = False,
    device: DeviceOpt = None,
    only: Annotated[
        Optional[list[str]],
        typer.Option("--only", help="Run only these stages (repeatable), e.g. --only finetune --only evaluate."),
    ] = None,
) -> None:
    """finetune → encode-latents → train-dit → sample → evaluate → probe-channels, skipping complete stages.

    Re-running resumes: finished stages whose inputs (tokenizer, latents, DiT weights by content hash, and
    their settings) are unchanged are skipped, others are redone, training stages continue from their newest
    checkpoint. Ends with a summary table (also <run>/summary.json).
    """
    from ssr_cli.stages.pipeline import STAGES

    stages = tuple(only) if only else STAGES
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        fail(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    run_command(recipe, set_, device, dry_run, "pipeline", dry_stages=stages, stages=stages)
