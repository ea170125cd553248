"""Energy distance between point sets (the 2-D proof's metric)."""

from __future__ import annotations

import torch
from torch import Tensor


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` with unbiased (U-statistic) within-set terms.

    Args:
        x: Samples ``[n, d]``.
        y: Samples ``[m, d]``.

    Returns:
        A float; about 0 when ``x`` and ``y`` come from the same distribution.
    """
    x, y = x.double(), y.double()
    n, m = x.shape[0], y.shape[0]
    cross = torch.cdist(x, y).mean()
    within_x = torch.cdist(x, x).sum() / (n * (n - 1))
    within_y = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * cross - within_x - within_y)
