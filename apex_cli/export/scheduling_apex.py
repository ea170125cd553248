"""The APEX few / any / mul sampler as a diffusers scheduler, for exported pipeline folders.

This file is copied verbatim into ``<export>/scheduler/scheduling_apex.py`` and loaded by diffusers' own
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``, so it imports only torch and diffusers (never
apex). It mirrors ``apex_cli.core.sampler`` operation for operation, so that an exported pipeline reproduces the
checkpoint's samples; ``tests/unit/export`` holds the two side by side.

Time runs from ``t = 1`` (noise) to ``t = 0`` (data). Grid: ``n`` points ``linspace(g0, 1 - g1)`` (when ``g1 = 0``:
``n + 1`` points, the last dropped), warped by ``k(t; a, b, c) = (1 - (1 - t^a)^b)^c``, mapped ``t -> 1 - t``, then 0
appended. Each step evaluates the network's average velocity ``F(x, t_cur, t_target, c)`` and moves to

    x_hat  = x - t_cur F                 z_hat = x + (1 - t_cur) F
    x_next = (1 - t_next) x_hat + t_next (sqrt(1 - s) z_hat + sqrt(s) eps)

    few  t_target = 0       s = stochastic_ratio   (jump to data, re-noise)
    any  t_target = t_next  s = 0
    mul  t_target = t_cur   s = 0                  (Euler steps: a flow-matching teacher)

Guidance ``g`` combines ``F_c + g (F_c - F_u)``; distilled students use ``g = 0``.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

STYLES = ("few", "any", "mul")


def make_time_grid(nfe: int, gap: tuple[float, float], kumaraswamy: tuple[float, float, float]) -> list[float]:
    """The ``nfe + 1`` times from (about) 1 down to 0 (computed in float64)."""
    if nfe < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {nfe}")
    g0, g1 = gap
    if not 0 <= g0 < 1 - g1 <= 1:
        raise ValueError(f"gap must satisfy 0 <= g0 < 1 - g1 <= 1, got {gap}")
    if g1 == 0:
        points = torch.linspace(g0, 1.0, nfe + 1, dtype=torch.float64)[:-1]
    else:
        points = torch.linspace(g0, 1.0 - g1, nfe, dtype=torch.float64)
    a, b, c = kumaraswamy
    warped = (1 - (1 - points.pow(a)).pow(b)).pow(c)
    return torch.cat([1 - warped, torch.zeros(1, dtype=torch.float64)]).tolist()


class ApexSampler(SchedulerMixin, ConfigMixin):
    """Sampler of an APEX one-step student (or of its flow-matching teacher: style ``mul``).

    Args:
        style: ``few``, ``any`` or ``mul``.
        nfe: Network evaluations by default (``num_inference_steps=None``).
        gap: ``[g0, g1]`` of the time grid at ``nfe``.
        kumaraswamy: ``[a, b, c]`` of the grid warp.
        stochastic_ratio: ``s`` of the few style's re-noising.
        guidance: ``g`` of ``F_c + g (F_c - F_u)``; 0 for distilled students.
        gap_by_nfe: The gap to use at another NFE, keyed by the NFE as a string (e.g. ``{"2": [0.001, 0.6]}``);
            an NFE not listed uses ``gap``.
        time_grid: The grid at ``nfe``, for people reading the config; checked against the other settings.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        style: str = "few",
        nfe: int = 1,
        gap: tuple[float, float] = (0.001, 0.0),
        kumaraswamy: tuple[float, float, float] = (1.0, 1.0, 1.0),
        stochastic_ratio: float = 1.0,
        guidance: float = 0.0,
        gap_by_nfe: dict[str, list[float]] | None = None,
        time_grid: list[float] | None = None,
    ) -> None:
        if style not in STYLES:
            raise ValueError(f"unknown sampler style {style!r}; expected one of {STYLES}")
        self.sigmas: list[float] = []
        self.set_timesteps(nfe)
        if time_grid is not None and (
            len(time_grid) != len(self.sigmas)
            or any(abs(a - b) > 1e-9 for a, b in zip(time_grid, self.sigmas, strict=True))
        ):
            raise ValueError(f"time_grid {time_grid} does not match nfe, gap and kumaraswamy (they give {self.sigmas})")

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """Build the time grid for ``num_inference_steps`` network evaluations (default: the configured ``nfe``)."""
        nfe = num_inference_steps or self.config.nfe
        gap = (self.config.gap_by_nfe or {}).get(str(nfe), self.config.gap)
        self.sigmas = make_time_grid(nfe, tuple(gap), tuple(self.config.kumaraswamy))
        self.timesteps = torch.tensor(self.sigmas[:-1], dtype=torch.float64)
        self.num_inference_steps = nfe

    def target_time(self, index: int) -> float:
        """``t_target`` of step ``index``: 0 (few), the next time (any) or the current one (mul)."""
        t_cur, t_next = self.sigmas[index], self.sigmas[index + 1]
        return {"few": 0.0, "any": t_next, "mul": t_cur}[self.config.style]

    def step(
        self,
        model_output: torch.Tensor,
        index: int,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Move ``sample`` from time ``sigmas[index]`` to ``sigmas[index + 1]`` along the velocity ``model_output``."""
        t_cur, t_next = self.sigmas[index], self.sigmas[index + 1]
        t = torch.ones(sample.shape[0], device=sample.device, dtype=sample.dtype) * t_cur
        t = t.view(-1, *([1] * (sample.ndim - 1)))
        x_hat = sample - t * model_output
        z_hat = sample + (1 - t) * model_output
        s = self.config.stochastic_ratio if self.config.style == "few" else 0.0
        renoise = z_hat
        if s > 0 and t_next > 0:
            eps = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            renoise = math.sqrt(1 - s) * z_hat + math.sqrt(s) * eps
        return (1 - t_next) * x_hat + t_next * renoise
