"""Which sampler a model is measured with: teachers by Euler steps, students by their recipe's sampler."""

from __future__ import annotations

from typing import Any

from apex_cli.config import Recipe, SamplerConfig
from apex_cli.core.sampler import SamplerSettings

TEACHER_MULTI_STEP = SamplerSettings(style="mul", nfe=50, gap=(0.0, 0.0))
TEACHER_ONE_STEP = SamplerSettings(style="mul", nfe=1, gap=(0.0, 0.0))
FEW_STEP_GAPS = {1: (0.001, 0.0), 2: (0.001, 0.6), 4: (0.001, 0.5)}  # method.md section 6


def sampler_settings(config: SamplerConfig, nfe: int | None = None) -> SamplerSettings:
    """Recipe sampler section -> core settings, optionally at another NFE (few style: the documented gaps)."""
    gap = config.gap if nfe is None or nfe == config.nfe else FEW_STEP_GAPS.get(nfe, config.gap)
    return SamplerSettings(
        style=config.style,
        nfe=nfe or config.nfe,
        gap=gap,
        kumaraswamy=config.kumaraswamy,
        stochastic_ratio=config.stochastic_ratio,
        guidance=config.guidance,
    )


def checkpoint_sampler(recipe: Recipe, meta: dict[str, Any], nfe: int) -> SamplerSettings:
    """Teachers sample with Euler (mul) steps; students with their recipe's sampler at ``nfe``."""
    if meta.get("kind") == "teacher":
        return SamplerSettings(
            style="mul", nfe=nfe, gap=(0.0, 0.0), stochastic_ratio=0.0, guidance=recipe.sampler.guidance
        )
    return sampler_settings(recipe.sampler, nfe)
