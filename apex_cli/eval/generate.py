"""Turn a text-to-image model and sampler settings into the ``generate_fn`` the GenEval protocol calls."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from apex_cli.core.sampler import SamplerSettings, sample
from apex_cli.models.shapes import tensor_to_images


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[str], seeds: Sequence[int], settings: SamplerSettings) -> np.ndarray:
    """Images ``[B, H, W, 3]`` uint8 for ``prompts[i]`` from noise seeded by ``seeds[i]``.

    Image ``i`` depends on its prompt and seed only, never on the batch: its starting noise is the first draw of a
    generator seeded by ``seeds[i]``, and the few-style re-noising continues drawing from that same generator.
    """
    device = next(model.parameters()).device
    size = model.image_size  # type: ignore[attr-defined]
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn((3, size, size), generator=g) for g in generators]).to(device)
    cond = model.encode_prompts(list(prompts))  # type: ignore[operator]
    uncond = model.unconditional(len(prompts), device) if settings.guidance else None  # type: ignore[operator]
    return tensor_to_images(sample(model, noise, cond, settings, uncond=uncond, generator=generators))  # type: ignore[arg-type]


def generate_fn(model: nn.Module, settings: SamplerSettings) -> Callable[[list[str], list[int]], np.ndarray]:
    """``(prompts, seeds) -> images`` for ``apex_cli.eval.geneval.generate_images``."""

    def run(prompts: list[str], seeds: list[int]) -> np.ndarray:
        return generate(model, prompts, seeds, settings)

    return run
