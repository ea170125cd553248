"""SANA (``SanaPipeline``) as an apex generator.

Latents: the deep-compression autoencoder's ``latent * scaling_factor``, fed unpacked (the transformer patchifies).
Text: Gemma-2's last hidden state with a token mask, ``[0] + the last L - 1`` tokens as the pipeline selects them;
prompts carry the pipeline's default complex human instruction, the unconditional prompt ``""`` does not (both as
``SanaPipeline.__call__`` does). Time: the transformer takes ``1000 t * timestep_scale`` (``timestep_scale`` from
its config). A learned-sigma output (twice the input channels) keeps its first half. Condition shift:
``caption_projection``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from apex_cli.config import DIFFUSERS_LORA_TARGETS
from apex_cli.errors import CheckpointError
from apex_cli.models.diffusers_base import DiffusersGenerator


class SanaGenerator(DiffusersGenerator):
    """``F(x_t, t, r, c)`` of a ``SanaPipeline``; ``x_t: [B, C, h, w]`` scaled DC-AE latents.

    Args:
        complex_human_instruction: Prefix prompts with the pipeline's default instruction (as the teacher samples).
    """

    FAMILY = "sana"
    PIPELINE_CLASS = "SanaPipeline"
    TEXT_PROJECTION = "caption_projection"
    TIME_EMBEDDER = "time_embed.emb.timestep_embedder"
    TIME_PROJ = "time_embed.emb.time_proj"
    DEFAULT_MAX_SEQUENCE_LENGTH = 300
    DEFAULT_LORA_TARGETS = DIFFUSERS_LORA_TARGETS["sana"]

    def __init__(
        self,
        pipeline: Any,
        max_sequence_length: int | None = None,
        unconditional_prompt: str | None = None,
        complex_human_instruction: bool = True,
    ) -> None:
        super().__init__(pipeline, max_sequence_length, unconditional_prompt)
        if self.transformer.config.guidance_embeds:
            raise CheckpointError("this SANA transformer embeds guidance (SANA-Sprint); apex distills SANA itself")
        default = inspect.signature(type(pipeline).__call__).parameters["complex_human_instruction"].default
        self.complex_human_instruction: list[str] | None = list(default) if complex_human_instruction else None

    def _encode(self, prompts: list[str], unconditional: bool) -> dict[str, Tensor]:
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=self._text_device(),
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=None if unconditional else self.complex_human_instruction,
        )
        return {"embeds": embeds, "mask": mask}

    def _transformer_timestep(self, t: Tensor) -> Tensor:
        return t * 1000 * self.transformer.config.timestep_scale

    def _time_proj_input(self, t: Tensor) -> Tensor:
        return self._transformer_timestep(t)

    def _forward(self, x_t: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
        out = self.transformer(
            x_t,
            encoder_hidden_states=cond["embeds"].to(x_t.dtype),
            encoder_attention_mask=cond["mask"],
            timestep=timestep,
            return_dict=False,
        )[0]
        if out.shape[1] == 2 * x_t.shape[1]:  # learned sigma: the velocity is the first half
            out = out[:, : x_t.shape[1]]
        return out

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> ``latent * scaling_factor``, ``[B, C, h, w]``."""
        latent = self.vae.encode(self._vae_input(images)).latent
        return (latent * self.vae.config.scaling_factor).to(device=images.device, dtype=images.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """``[B, C, h, w]`` -> images ``[B, 3, H, W]`` in ``[-1, 1]``: ``decode(x / scaling_factor)``."""
        z = self._vae_input(latents) / self.vae.config.scaling_factor
        return self.vae.decode(z, return_dict=False)[0].to(device=latents.device, dtype=latents.dtype)
