"""Tokenizers and generators. This package never imports ``ssr_cli.engine`` (the training engine), except its
torch-free atomic-write helper ``ssr_cli.engine.atomic``."""
