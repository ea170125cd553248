"""Class-conditional 2-D Gaussian mixtures: the data of the 2-D proof (recipes toy2d-*)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from apex_cli.config import Toy2dDataConfig


class Toy2dMixture:
    """Modes on a ring, a square grid or a line, split into classes in contiguous blocks.

    Mode ``i`` of ``M`` belongs to class ``floor(i C / M)``: with a ring of 8 and 4 classes, each class is a
    pair of neighbouring modes, so the conditional distributions are bimodal and a one-step map must split
    its Gaussian input (the teacher at one step collapses each class to the midpoint of its pair).

    Args:
        config: The recipe's ``data`` section.
    """

    def __init__(self, config: Toy2dDataConfig) -> None:
        m, scale = config.num_modes, config.scale
        if config.layout == "ring":
            angle = 2 * math.pi * torch.arange(m, dtype=torch.float64) / m
            means = scale * torch.stack([angle.cos(), angle.sin()], dim=1)
        elif config.layout == "grid":
            side = math.isqrt(m)
            axis = torch.linspace(-scale, scale, side, dtype=torch.float64)
            means = torch.cartesian_prod(axis, axis)
        else:
            means = torch.stack([torch.linspace(-scale, scale, m, dtype=torch.float64), torch.zeros(m)], dim=1)
        weights = torch.tensor(config.weights or [1.0] * m, dtype=torch.float64)
        self.means = means
        self.weights = weights / weights.sum()
        self.std = config.mode_std
        self.num_classes = config.num_classes or m
        self.mode_class = torch.arange(m) * self.num_classes // m

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` points ``[n, 2]`` (float32) and their class labels ``[n]``."""
        modes = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        points = self.means[modes] + self.std * noise
        return points.float(), self.mode_class[modes]

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Class labels ``[n]`` with the mixture's class marginal (for generating a matched sample set)."""
        return self.sample(n, generator)[1]
