"""One module per subcommand. Only these modules and ``ssr_cli.cli`` import Typer."""
