"""The few / any / mul sampler of APEX students and flow-matching teachers (method.md section 6).

Time grid: ``n`` points ``linspace(g0, 1 - g1)`` (when ``g1 = 0``: ``n + 1`` points, the last dropped),
warped with the Kumaraswamy map ``k(t; a, b, c) = (1 - (1 - t^a)^b)^c``, mapped ``t -> 1 - t``, then 0
appended. Each step predicts ``(x_hat, z_hat)`` from ``F(x_cur, t_cur, t_tgt, c)`` (E2) and moves to

    x_next = (1 - t_next) x_hat + t_next (sqrt(1 - s) z_hat + sqrt(s) eps)

    few  t_tgt = 0       s = stochastic_ratio   jump to data, re-noise (NFE = n)
    any  t_tgt = t_next  s = 0                  average-velocity steps
    mul  t_tgt = t_cur   s = 0                  Euler ODE: the teacher's multi-step sampler

Guidance at inference: ``F = F_c + g (F_c - F_u)`` (``g = 0`` for distilled students, whose guidance was
distilled in by E7; the effective classifier-free scale is ``1 + g``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from apex_cli.core.objective import Condition, VelocityModel, cat_conditions
from apex_cli.core.transport import predict_data, predict_noise

STYLES = ("few", "any", "mul")


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler knobs (the recipe's ``sampler`` section)."""

    style: str = "few"
    nfe: int = 1
    gap: tuple[float, float] = (0.001, 0.0)
    kumaraswamy: tuple[float, float, float] = (1.0, 1.0, 1.0)
    stochastic_ratio: float = 1.0
    guidance: float = 0.0


def time_grid(nfe: int, gap: tuple[float, float], kumaraswamy: tuple[float, float, float] = (1, 1, 1)) -> Tensor:
    """The ``nfe + 1`` times from (about) 1 down to 0, float64.

    Examples (no warp): 1 NFE, gap (0.001, 0) -> [0.999, 0]; 2 NFE, gap (0.001, 0.6) -> [0.999, 0.6, 0];
    4 NFE, gap (0.001, 0.5) -> [0.999, 0.833, 0.667, 0.5, 0].

    Raises:
        ValueError: If ``nfe < 1`` or the gap leaves no interval.
    """
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    g0, g1 = gap
    if not 0 <= g0 < 1 - g1 <= 1:
        raise ValueError(f"gap must satisfy 0 <= g0 < 1 - g1 <= 1, got {gap}")
    if g1 == 0:
        points = torch.linspace(g0, 1.0, nfe + 1, dtype=torch.float64)[:-1]
    else:
        points = torch.linspace(g0, 1.0 - g1, nfe, dtype=torch.float64)
    a, b, c = kumaraswamy
    warped = (1 - (1 - points.pow(a)).pow(b)).pow(c)
    return torch.cat([1 - warped, torch.zeros(1, dtype=torch.float64)])


def guided_velocity(
    model: VelocityModel,
    x: Tensor,
    t: Tensor,
    r: Tensor,
    cond: Condition,
    uncond: Condition | None,
    guidance: float,
) -> Tensor:
    """``F_c + g (F_c - F_u)``, cond and uncond in one batched forward; plain ``F_c`` when ``g = 0``."""
    if guidance == 0:
        return model.velocity(x, t, r, cond)
    if uncond is None:
        raise ValueError("guidance != 0 needs an unconditional condition")
    both = model.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([r, r]), cat_conditions(cond, uncond))
    v_cond, v_uncond = both.chunk(2)
    return v_cond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def sample(
    model: VelocityModel,
    noise: Tensor,
    cond: Condition,
    settings: SamplerSettings,
    uncond: Condition | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Integrate from ``noise`` (t = 1) to data (t = 0) in ``settings.nfe`` network evaluations.

    Args:
        model: The network ``F``.
        noise: Starting noise ``[B, ...]``.
        cond: Conditions, batch ``B``.
        settings: Style, NFE, grid and guidance.
        uncond: Unconditional condition, batch ``B`` (needed when ``guidance != 0``).
        generator: Seeds the re-noising ``eps`` of the ``few`` style: one generator for the batch, or one (CPU)
            generator per sample, so that a sample does not depend on the batch it was drawn in.

    Returns:
        Samples ``[B, ...]``.
    """
    if settings.style not in STYLES:
        raise ValueError(f"unknown sampler style {settings.style!r}; expected one of {STYLES}")
    grid = time_grid(settings.nfe, settings.gap, settings.kumaraswamy).tolist()
    x = noise
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    for t_cur, t_next in itertools.pairwise(grid):
        t_target = {"few": 0.0, "any": t_next, "mul": t_cur}[settings.style]
        s = settings.stochastic_ratio if settings.style == "few" else 0.0
        velocity = guided_velocity(model, x, ones * t_cur, ones * t_target, cond, uncond, settings.guidance)
        x_hat = predict_data(x, velocity, ones * t_cur)
        z_hat = predict_noise(x, velocity, ones * t_cur)
        renoise = z_hat
        if s > 0 and t_next > 0:
            eps = _noise_like(x, generator)
            renoise = math.sqrt(1 - s) * z_hat + math.sqrt(s) * eps
        x = (1 - t_next) * x_hat + t_next * renoise
    return x


def _noise_like(x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator]).to(x)
