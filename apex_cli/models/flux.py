"""FLUX.1 (``FluxPipeline``) as an apex generator.

Latents: the KL VAE's ``(z - shift_factor) * scaling_factor``, packed in 2x2 patches into tokens of ``4 C``
channels, with the pipeline's image position ids. Text: T5's last hidden state (``max_sequence_length`` tokens,
position ids all zero) and CLIP's pooled output ``pooled: [B, P]``; the unconditional prompt is ``""``. Time: the
transformer takes ``t`` and multiplies it by 1000 itself. A guidance-distilled transformer (FLUX.1-dev) gets the
fixed ``embedded_guidance`` the pipeline would pass as ``guidance_scale``. Condition shift: ``context_embedder``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from apex_cli.config import DIFFUSERS_LORA_TARGETS
from apex_cli.models.diffusers_base import DiffusersGenerator, ShiftedScaledLatents, pack_2x2, unpack_2x2


class FluxGenerator(ShiftedScaledLatents, DiffusersGenerator):
    """``F(x_t, t, r, c)`` of a ``FluxPipeline``; ``x_t: [B, C, h, w]`` shifted and scaled VAE latents.

    Args:
        embedded_guidance: The guidance value a guidance-distilled transformer is conditioned on (the pipeline's
            default ``guidance_scale``); unused by transformers without guidance embeddings.
    """

    FAMILY = "flux"
    PIPELINE_CLASS = "FluxPipeline"
    TEXT_PROJECTION = "context_embedder"
    TIME_EMBEDDER = "time_text_embed.timestep_embedder"
    TIME_PROJ = "time_text_embed.time_proj"
    DEFAULT_MAX_SEQUENCE_LENGTH = 512
    DEFAULT_LORA_TARGETS = DIFFUSERS_LORA_TARGETS["flux"]
    embedded_guidance = 3.5  # the pipeline's default guidance_scale (an instance may set its own)

    def __init__(
        self,
        pipeline: Any,
        max_sequence_length: int | None = None,
        unconditional_prompt: str | None = None,
        embedded_guidance: float = 3.5,
    ) -> None:
        super().__init__(pipeline, max_sequence_length, unconditional_prompt)
        self.embedded_guidance = embedded_guidance

    @property
    def latent_multiple(self) -> int:
        """2: the pipeline packs 2x2 latent patches into one token (the transformer's own patch size is 1)."""
        return 2

    def _encode(self, prompts: list[str], unconditional: bool) -> dict[str, Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self._text_device(), max_sequence_length=self.max_sequence_length
        )
        return {"embeds": embeds, "pooled": pooled}

    def _transformer_timestep(self, t: Tensor) -> Tensor:
        return t

    def _time_proj_input(self, t: Tensor) -> Tensor:
        return t * 1000

    def _forward(self, x_t: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
        from diffusers import FluxPipeline

        batch, _, height, width = x_t.shape
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.embedded_guidance, device=x_t.device, dtype=torch.float32)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x_t.device, x_t.dtype)
        text_ids = torch.zeros(cond["embeds"].shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        out = self.transformer(
            hidden_states=pack_2x2(x_t),
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond["pooled"].to(x_t.dtype),
            encoder_hidden_states=cond["embeds"].to(x_t.dtype),
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return unpack_2x2(out, height, width)
