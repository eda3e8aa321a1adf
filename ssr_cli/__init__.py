"""ssr: structured state-space regularization of image tokenizers."""

__version__ = "0.1.0"
