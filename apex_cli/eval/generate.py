"""Turn a text-to-image model and sampler settings into the ``generate_fn`` the GenEval protocol calls."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from apex_cli.core.sampler import SamplerSettings, sample
from apex_cli.models.shapes import tensor_to_images


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One Gaussian noise tensor per seed, ``[len(seeds), *shape]``: image ``k`` depends on its seed only."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[str], seeds: Sequence[int], settings: SamplerSettings) -> np.ndarray:
    """Images ``[B, H, W, 3]`` uint8 for ``prompts[i]`` from noise seeded by ``seeds[i]``.

    The few-style re-noising is seeded by the first seed, so a batch is reproducible.
    """
    device = next(model.parameters()).device
    size = model.image_size  # type: ignore[attr-defined]
    noise = seeded_noise(seeds, (3, size, size)).to(device)
    cond = model.encode_prompts(list(prompts))  # type: ignore[operator]
    uncond = model.unconditional(len(prompts), device) if settings.guidance else None  # type: ignore[operator]
    generator = torch.Generator(device=device).manual_seed(int(seeds[0]) + 1)
    return tensor_to_images(sample(model, noise, cond, settings, uncond=uncond, generator=generator))  # type: ignore[arg-type]


def generate_fn(model: nn.Module, settings: SamplerSettings) -> Callable[[str, list[int]], list[np.ndarray]]:
    """``(prompt, seeds) -> images`` for ``apex_cli.eval.geneval.generate_images``."""

    def run(prompt: str, seeds: list[int]) -> list[np.ndarray]:
        return list(generate(model, [prompt] * len(seeds), seeds, settings))

    return run
