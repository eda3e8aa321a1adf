"""The one training engine shared by ``finetune``, ``train-dit`` and the from-scratch trainers.

runtime: device, precision, torchrun/DDP, seeding.  ema: EMA of any module.  optim: parameter groups
and LR schedules.  checkpoint: atomic, resumable checkpoints.  progress: rich bar + metrics.jsonl.
loop: the training loop itself.  atomic: the atomic-write helper every writer of the package uses.
"""

from __future__ import annotations

import importlib

# Names resolve on first use (PEP 562) so that torch-free modules (recipe.py) can import ssr_cli.engine.atomic
# without this package loading torch.
_EXPORTS = {
    "EMA": "ema",
    "Checkpointer": "checkpoint",
    "Runtime": "runtime",
    "TrainSpec": "loop",
    "build_optimizer": "optim",
    "lr_lambda": "optim",
    "setup_runtime": "runtime",
    "step_seed": "runtime",
    "train": "loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
