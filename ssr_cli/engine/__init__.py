"""The one training engine shared by ``finetune``, ``train-dit`` and the from-scratch trainers.

runtime: device, precision, torchrun/DDP, seeding.  ema: EMA of any module.  optim: parameter groups
and LR schedules.  checkpoint: atomic, resumable checkpoints.  progress: rich bar + metrics.jsonl.
loop: the training loop itself.
"""

from ssr_cli.engine.checkpoint import Checkpointer
from ssr_cli.engine.ema import EMA
from ssr_cli.engine.loop import TrainSpec, train
from ssr_cli.engine.optim import build_optimizer, lr_lambda
from ssr_cli.engine.runtime import Runtime, setup_runtime, step_seed

__all__ = [
    "EMA",
    "Checkpointer",
    "Runtime",
    "TrainSpec",
    "build_optimizer",
    "lr_lambda",
    "setup_runtime",
    "step_seed",
    "train",
]
