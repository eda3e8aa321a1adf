"""Optimizer parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ssr_cli.errors import UserValueError


@dataclass
class ParamGroup:
    """A set of parameters with its own LR multiplier and weight decay."""

    name: str
    params: list[nn.Parameter]
    lr_mult: float = 1.0
    weight_decay: float | None = None
    extra: dict = field(default_factory=dict)


def build_optimizer(
    groups: list[ParamGroup],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over named groups; each group's ``lr_mult`` is kept so schedules scale every group alike."""
    param_groups = []
    seen: set[int] = set()
    for g in groups:
        params = [p for p in g.params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if not params:
            continue
        param_groups.append(
            {
                "name": g.name,
                "params": params,
                "lr": lr * g.lr_mult,
                "lr_mult": g.lr_mult,
                "weight_decay": weight_decay if g.weight_decay is None else g.weight_decay,
            }
        )
    if not param_groups:
        raise UserValueError("no trainable parameters: everything is frozen")
    if fused is None:
        fused = all(p.is_cuda for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused or None)


def lr_lambda(
    *,
    schedule: str,
    total_steps: int,
    lr: float,
    lr_init: float = 0.0,
    lr_min: float = 0.0,
    warmup_frac: float = 0.0,
    cosine_frac: float = 0.0,
):
    """Multiplier of the base LR at a step (0-based, the step about to be taken).

    ``warmup_cosine`` (paper Table 2): linear warm-up from ``lr_init`` to ``lr`` over the first
    ``warmup_frac`` of the steps, hold at ``lr``, then a cosine from ``lr`` down to ``lr_min`` over the
    last ``cosine_frac`` of the steps. ``constant``: ``lr`` throughout.
    """
    if schedule == "constant":
        return lambda step: 1.0
    if schedule != "warmup_cosine":
        raise UserValueError(f"unknown schedule {schedule!r}; choose 'warmup_cosine' or 'constant'")
    warmup = int(round(warmup_frac * total_steps))
    decay = int(round(cosine_frac * total_steps))
    decay_start = total_steps - decay

    def factor(step: int) -> float:
        if step < warmup:
            value = lr_init + (lr - lr_init) * step / warmup
        elif step < decay_start or decay == 0:
            value = lr
        else:
            progress = min(1.0, (step - decay_start) / decay)
            value = lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))
        return value / lr

    return factor
