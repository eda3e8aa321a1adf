"""One module per command (see :mod:`ssr_cli.stages.common`)."""
