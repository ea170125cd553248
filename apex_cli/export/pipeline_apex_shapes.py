"""A diffusers pipeline for apex's shapes text-to-image model: load an exported folder with stock diffusers.

This file is copied verbatim into every ``apex export --format diffusers`` folder of a shapes model, where
``model_index.json`` names it (``"_class_name": ["pipeline_apex_shapes", "ApexShapesPipeline"]``). It imports only
torch, numpy, PIL, diffusers and transformers (never apex), so the folder works where apex is not installed::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("exports/shapes-student", trust_remote_code=True)
    image = pipe("a photo of a red circle", generator=torch.Generator().manual_seed(0)).images[0]

Components: ``unet`` (diffusers ``UNet2DConditionModel``, pixel space), ``text_encoder`` (transformers ``BertModel``),
``tokenizer`` (a word-level ``PreTrainedTokenizerFast``) and ``scheduler`` (``ApexSampler`` from
``scheduler/scheduling_apex.py``, holding the sampler settings the model was distilled for: NFE, time grid, style,
stochastic ratio, guidance). ``load_lora_weights`` / ``fuse_lora`` come from diffusers'
``StableDiffusionLoraLoaderMixin``.

The network is the average velocity ``F(x_t, t, r, c)`` from time ``t`` to a target time ``r`` (``t = 1`` is noise).
The UNet sees ``1000 t`` as its timestep and ``1000 r`` as its class label, and its class embedding (the target-time
embedder) is scaled by ``t - r`` during each call, so that ``emb = Emb1(t) + (t - r) Emb2(r)``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

TIME_SCALE = 1000.0
"""The UNet's timestep and class-label embedders take times in ``[0, 1000]``."""
TARGET_TIME_FILE = "target_time_embedder.safetensors"
"""Beside the adapters of an apex LoRA export: the target-time embedder, which trains in full, not as an adapter."""


class ApexShapesPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Text-to-image with an apex shapes model and its own sampler (one step for a distilled student).

    Args:
        unet: The denoiser; ``class_embed_type="timestep"`` carries the target time.
        text_encoder: Frozen text encoder (``last_hidden_state`` is the condition).
        tokenizer: Word-level tokenizer; every prompt becomes ``<s> w_1 ... w_n [PAD] ...``.
        scheduler: The ``ApexSampler`` of the export.
    """

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: Any, text_encoder: Any, tokenizer: Any, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self._replaced_embedder: dict[str, torch.Tensor] | None = None

    def load_lora_weights(
        self, pretrained_model_name_or_path_or_dict: Any, adapter_name: str | None = None, **kwargs: Any
    ) -> None:
        """diffusers' ``load_lora_weights``, then the target-time embedder an apex LoRA export has beside the adapters.

        A diffusers LoRA file holds adapters only, and apex trains the target-time embedder (``unet.class_embedding``)
        in full, so it ships as ``target_time_embedder.safetensors`` and replaces the UNet's. ``unload_lora_weights``
        puts the previous one back, unless ``fuse_lora`` made the adapters (and it) part of the weights.
        """
        super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, (str, os.PathLike)) and os.path.isfile(os.path.join(source, TARGET_TIME_FILE)):
            embedder = self.unet.class_embedding
            if self._replaced_embedder is None:
                self._replaced_embedder = {k: v.clone() for k, v in embedder.state_dict().items()}
            embedder.load_state_dict(load_file(os.path.join(source, TARGET_TIME_FILE), device=str(self.unet.device)))

    def fuse_lora(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``fuse_lora``; a loaded target-time embedder stays after ``unload_lora_weights`` too."""
        super().fuse_lora(*args, **kwargs)
        self._replaced_embedder = None

    def unload_lora_weights(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``unload_lora_weights``, then the target-time embedder from before ``load_lora_weights``."""
        super().unload_lora_weights(*args, **kwargs)
        if self._replaced_embedder is not None:
            self.unet.class_embedding.load_state_dict(self._replaced_embedder)
            self._replaced_embedder = None

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds [B, L, D] float32, mask [B, L] long)``; each distinct prompt is encoded once."""
        vocabulary = set(self.tokenizer.get_vocab()) - set(self.tokenizer.all_special_tokens)
        for prompt in prompts:
            words = [w for w, _ in self.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(prompt)]
            unknown = sorted({w for w in words if w not in vocabulary})
            if unknown:
                raise ValueError(f"prompt {prompt!r} has words outside the model's vocabulary: {unknown}")
            if len(words) + 1 > self.tokenizer.model_max_length:
                raise ValueError(f"prompt {prompt!r} is longer than {self.tokenizer.model_max_length - 1} words")
        distinct = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(
            distinct, padding="max_length", max_length=self.tokenizer.model_max_length, return_tensors="pt"
        )
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        index = [distinct.index(p) for p in prompts]
        return hidden[index], mask[index]

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``F(x, t, r, c)``: the UNet with its target-time embedder scaled by ``t - r``."""
        timestep, class_labels = t * TIME_SCALE, r * TIME_SCALE
        gap = (timestep.float() - class_labels.float()) / TIME_SCALE

        def scale(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            return output * gap.to(device=output.device, dtype=output.dtype).reshape(-1, *([1] * (output.ndim - 1)))

        handle = self.unet.class_embedding.register_forward_hook(scale)
        try:
            return self.unet(
                x,
                timestep,
                encoder_hidden_states=embeds.to(self.unet.dtype),
                class_labels=class_labels,
                encoder_attention_mask=mask,
            ).sample
        finally:
            handle.remove()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images.

        Args:
            prompt: One prompt or a list.
            num_images_per_prompt: Images a prompt (consecutive in the output).
            num_inference_steps: Network evaluations; None = the exported sampler's NFE (1 for a one-step student).
            guidance_scale: ``g`` of ``F_c + g (F_c - F_u)``; None = the exported sampler's (0 for a student).
            height: Image height in pixels; None = the size the model was trained at.
            width: Image width in pixels; None = the size the model was trained at.
            generator: One generator, or one CPU generator per image (then image ``i`` depends on its own generator
                only: apex draws its samples this way, seeded by each image's seed).
            output_type: ``pil``; ``np`` or ``pt`` (floats in [0, 1]); ``latent`` (the raw samples in [-1, 1]).
            return_dict: Return an ``ImagePipelineOutput`` rather than a tuple.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        size = self.unet.config.sample_size
        height, width = height or size, width or size
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height} x {width}")
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ValueError(f"got {len(generator)} generators for {len(prompts)} images")
        guidance = self.scheduler.config.guidance if guidance_scale is None else guidance_scale
        device = self._execution_device

        embeds, mask = self.encode_prompt(prompts, device)
        if guidance:
            empty_embeds, empty_mask = self.encode_prompt([""], device)
            embeds = torch.cat([embeds, empty_embeds.expand_as(embeds)])
            mask = torch.cat([mask, empty_mask.expand_as(mask)])
        shape = (len(prompts), self.unet.config.in_channels, height, width)
        x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

        self.scheduler.set_timesteps(num_inference_steps)
        ones = torch.ones(len(prompts), device=device, dtype=x.dtype)
        for index in self.progress_bar(range(self.scheduler.num_inference_steps)):
            t = ones * self.scheduler.sigmas[index]
            r = ones * self.scheduler.target_time(index)
            if guidance:
                both = self.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([r, r]), embeds, mask)
                v_cond, v_uncond = both.chunk(2)
                velocity = v_cond + guidance * (v_cond - v_uncond)
            else:
                velocity = self.velocity(x, t, r, embeds, mask)
            x = self.scheduler.step(velocity, index, x, generator=generator)

        self.maybe_free_model_hooks()
        if output_type == "latent":
            images = x
        elif output_type in ("pt", "np"):
            images = (x.clamp(-1, 1) + 1) / 2
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type == "pil":
            # apex's own conversion, round((x + 1) 127.5), so that these PNGs equal `apex sample`'s
            pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            images = [PIL.Image.fromarray(np.ascontiguousarray(image)) for image in pixels]
        else:
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        return ImagePipelineOutput(images=images) if return_dict else (images,)
