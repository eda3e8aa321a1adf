"""The ``ssr`` command line: one Typer app, one module per subcommand under ``commands/``."""

from __future__ import annotations

import typer

from ssr_cli import __version__
from ssr_cli.commands import (
    convert,
    denoise,
    derive_a,
    diffusability,
    encode_latents,
    evaluate,
    finetune,
    pipeline,
    probe_channels,
    sample,
    train_dit,
)

app = typer.Typer(
    name="ssr",
    help=(
        "Structured state-space regularization (SSR) of image tokenizers: derive the A matrix, fine-tune a "
        "tokenizer, cache its latents, train a LightningDiT, sample, evaluate and probe channels; train the "
        "S4D-VAE / CNN-VAE from scratch (finetune with tokenizer.family s4d-vae / cnn-vae) and a denoiser "
        "with and without SSR (denoise); score how generation-friendly a latent space is (diffusability). Every "
        "command reads one TOML recipe (see recipes/); override any value with --set section.key=value."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    # Plain Click help: rich help panels import typer.rich_utils (rich markdown, traceback, pygments), about
    # 0.15 s of CPU on every --help, against the 0.3 s start-up budget (issue 14; benchmarks/RESULTS.md).
    rich_markup_mode=None,
)

app.command("derive-a")(derive_a.derive_a)
app.command("finetune")(finetune.finetune)
app.command("encode-latents")(encode_latents.encode_latents)
app.command("train-dit")(train_dit.train_dit)
app.command("sample")(sample.sample)
app.command("evaluate")(evaluate.evaluate)
app.command("probe-channels")(probe_channels.probe_channels)
app.command("pipeline")(pipeline.pipeline)
app.command("denoise")(denoise.denoise)
app.command("diffusability")(diffusability.diffusability)
app.command("import-dit")(convert.import_dit)
app.command("export-dit")(convert.export_dit)
app.command("export-tokenizer")(convert.export_tokenizer)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ssr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Structured state-space regularization of image tokenizers."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
