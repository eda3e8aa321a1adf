"""Tokenizers and generators. This package never imports ``ssr_cli.engine``."""
