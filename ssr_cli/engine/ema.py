"""Exponential moving average of any module's parameters (buffers are copied)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``shadow``, a frozen copy of ``module`` updated as shadow ← d·shadow + (1−d)·param every step."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval()
        self.shadow.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        src = dict(module.named_parameters())
        shadow_params = []
        live_params = []
        for name, p in self.shadow.named_parameters():
            shadow_params.append(p)
            live_params.append(src[name].detach().to(p.dtype))
        if shadow_params:
            torch._foreach_lerp_(shadow_params, live_params, 1.0 - self.decay)
        live_buffers = dict(module.named_buffers())
        for name, b in self.shadow.named_buffers():
            b.copy_(live_buffers[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow.load_state_dict(state)
