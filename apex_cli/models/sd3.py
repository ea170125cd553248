"""Stable Diffusion 3 (``StableDiffusion3Pipeline``) as an apex generator.

Latents: the KL VAE's ``(z - shift_factor) * scaling_factor``, fed unpacked (the transformer patchifies). Text: the
two CLIP encoders' penultimate states (77 tokens) beside T5's (``max_sequence_length`` tokens), and their pooled
outputs ``pooled: [B, P]``; no mask (as in the pipeline); the unconditional prompt is ``""``. Time: the transformer
takes ``1000 t``. Condition shift: ``context_embedder`` (the token stream only; the pooled vector is untouched).
"""

from __future__ import annotations

from torch import Tensor

from apex_cli.config import DIFFUSERS_LORA_TARGETS
from apex_cli.models.diffusers_base import DiffusersGenerator, ShiftedScaledLatents


class SD3Generator(ShiftedScaledLatents, DiffusersGenerator):
    """``F(x_t, t, r, c)`` of a ``StableDiffusion3Pipeline``; ``x_t: [B, C, h, w]`` shifted and scaled VAE latents."""

    FAMILY = "sd3"
    PIPELINE_CLASS = "StableDiffusion3Pipeline"
    TEXT_PROJECTION = "context_embedder"
    TIME_EMBEDDER = "time_text_embed.timestep_embedder"
    TIME_PROJ = "time_text_embed.time_proj"
    DEFAULT_MAX_SEQUENCE_LENGTH = 256
    DEFAULT_LORA_TARGETS = DIFFUSERS_LORA_TARGETS["sd3"]

    def _encode(self, prompts: list[str], unconditional: bool) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self._text_device(),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"embeds": embeds, "pooled": pooled}

    def _transformer_timestep(self, t: Tensor) -> Tensor:
        return t * 1000

    def _time_proj_input(self, t: Tensor) -> Tensor:
        return t * 1000

    def _forward(self, x_t: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.transformer(
            hidden_states=x_t,
            timestep=timestep,
            encoder_hidden_states=cond["embeds"].to(x_t.dtype),
            pooled_projections=cond["pooled"].to(x_t.dtype),
            return_dict=False,
        )[0]
