"""Qwen-Image (``QwenImagePipeline``) as an apex generator.

Latents: the video VAE's ``z`` (one frame), normalised per channel ``(z - latents_mean) / latents_std``, packed in
2x2 patches into tokens of ``4 z_dim`` channels (``img_shapes = [(1, h / 2, w / 2)]``). Text: the last hidden state
of Qwen2.5-VL under the pipeline's prompt template, its 34-token head dropped, with a token mask; the unconditional
prompt is ``" "`` (the negative prompt of diffusers' Qwen-Image examples). Time: the transformer takes ``t`` itself
(the pipeline passes ``sigma * 1000 / 1000``) and its ``Timesteps`` multiply by 1000. Condition shift: ``txt_in``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from apex_cli.config import DIFFUSERS_LORA_TARGETS
from apex_cli.errors import CheckpointError
from apex_cli.models.diffusers_base import DiffusersGenerator, pack_2x2, pad_tokens, unpack_2x2


class QwenImageGenerator(DiffusersGenerator):
    """``F(x_t, t, r, c)`` of a ``QwenImagePipeline``; ``x_t: [B, z_dim, h, w]`` normalised latents."""

    FAMILY = "qwen-image"
    PIPELINE_CLASS = "QwenImagePipeline"
    TEXT_PROJECTION = "txt_in"
    TIME_EMBEDDER = "time_text_embed.timestep_embedder"
    TIME_PROJ = "time_text_embed.time_proj"
    UNCONDITIONAL_PROMPT = " "
    DEFAULT_MAX_SEQUENCE_LENGTH = 512
    DEFAULT_LORA_TARGETS = DIFFUSERS_LORA_TARGETS["qwen-image"]

    def __init__(
        self, pipeline: Any, max_sequence_length: int | None = None, unconditional_prompt: str | None = None
    ) -> None:
        super().__init__(pipeline, max_sequence_length, unconditional_prompt)
        config = self.transformer.config
        if (
            config.guidance_embeds
            or getattr(config, "zero_cond_t", False)
            or getattr(config, "use_additional_t_cond", False)
        ):
            raise CheckpointError(
                "this Qwen-Image transformer uses guidance embeddings, zero_cond_t or additional_t_cond "
                "(an edit or distilled variant); apex distills the text-to-image Qwen-Image"
            )

    @property
    def latent_channels(self) -> int:
        """``z_dim`` of the video VAE."""
        return int(self.vae.config.z_dim)

    def _encode(self, prompts: list[str], unconditional: bool) -> dict[str, Tensor]:
        embeds, mask = self.pipeline.encode_prompt(
            prompts, device=self._text_device(), max_sequence_length=self.max_sequence_length
        )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        embeds, mask = pad_tokens(embeds, mask, self.max_sequence_length)
        return {"embeds": embeds, "mask": mask}

    def _transformer_timestep(self, t: Tensor) -> Tensor:
        return t

    def _time_proj_input(self, t: Tensor) -> Tensor:
        return t

    def _forward(self, x_t: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
        batch, _, height, width = x_t.shape
        out = self.transformer(
            hidden_states=pack_2x2(x_t),
            timestep=timestep,
            encoder_hidden_states=cond["embeds"].to(x_t.dtype),
            encoder_hidden_states_mask=cond["mask"],
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]
        return unpack_2x2(out, height, width)

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> ``(z - latents_mean) / latents_std``, ``[B, z_dim, h, w]``."""
        z = self.vae.encode(self._vae_input(images)[:, :, None]).latent_dist.mean[:, :, 0]
        mean, std = self._latent_stats(z)
        return ((z - mean) / std).to(device=images.device, dtype=images.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """``[B, z_dim, h, w]`` -> images ``[B, 3, H, W]`` in ``[-1, 1]``: ``decode(x latents_std + latents_mean)``."""
        z = self._vae_input(latents)
        mean, std = self._latent_stats(z)
        return self.vae.decode((z * std + mean)[:, :, None], return_dict=False)[0][:, :, 0].to(
            device=latents.device, dtype=latents.dtype
        )
