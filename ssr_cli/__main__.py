from ssr_cli.cli import main

main()
