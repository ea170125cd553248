"""Exponential moving average of a model's weights, with the warm-up of method.md section 5 (E7)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy whose weights track the online model.

    The decay warms up as ``mu_{k+1} = mu_k + (1 - mu_k)(ema - mu_k) / 2`` from ``mu_0 = 0`` toward ``ema``,
    so early updates follow the online weights closely.

    Args:
        model: The online model (copied once).
        decay: The target decay ``ema`` in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.current_decay = 0.0
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step toward the online weights (no host-device sync)."""
        mu = self.current_decay
        self.current_decay = mu + (1 - mu) * (self.decay - mu) / 2
        ema_params = list(self.model.parameters())
        online_params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, online_params, 1 - self.current_decay)
