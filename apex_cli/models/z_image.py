"""Z-Image (``ZImagePipeline``) as an apex generator.

Latents: the KL VAE's ``(z - shift_factor) * scaling_factor``, fed unpacked as one frame each (the transformer
patchifies 2x2 itself, ``patch_size = 2`` as the pipeline calls it). Text: the second-to-last hidden state of Qwen3
under the tokenizer's chat template (``enable_thinking=True``), the valid tokens of each prompt kept in front of a
token mask (the transformer takes one caption of its own length per sample); the unconditional prompt is ``""``.
Time: reversed, the transformer takes ``1 - t`` (the pipeline passes ``(1000 - sigma 1000) / 1000``) and multiplies
it by ``t_scale`` (1000) itself; as in the released APEX Z-Image code the time embedder sees ``|t|``, so only the
condition shift marks the fake branch. Output: the transformer predicts ``x - z``, the negative of apex's velocity.

Condition shift: ``cap_embedder``. The transformer calls it on the captions of the whole batch concatenated
(``[sum L_i, D]``), which has no sample axis; so :attr:`ZImageGenerator.text_projection` is a parameter-free
identity module that sees that output split per sample (``[B, L, D]``, zero-padded), and a hook of this module on
``cap_embedder`` routes it through there during :meth:`~DiffusersGenerator.velocity`. The shift hook and any other
hook on ``text_projection`` act on the per-sample rows of ``cap_embedder``'s output.

The E4a target-time embedder is a copy of ``t_embedder.mlp``; ``t_embedder``'s sinusoid is a static method, so the
hook gets it as :class:`_Sinusoid`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from apex_cli.config import DIFFUSERS_LORA_TARGETS
from apex_cli.models.diffusers_base import DiffusersGenerator, ShiftedScaledLatents, pad_tokens

PATCH_SIZE = 2
"""The spatial patch size ``ZImagePipeline`` calls the transformer with (its ``forward`` default)."""


class _Sinusoid(nn.Module):
    """``TimestepEmbedder.timestep_embedding`` as a module: the ``time_proj`` of Z-Image's ``t_embedder``."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.frequencies = int(embedder.frequency_embedding_size)
        self._embedding = embedder.timestep_embedding

    def forward(self, t: Tensor) -> Tensor:
        return self._embedding(t, self.frequencies)  # type: ignore[no-any-return]


class _CaptionRows:
    """Forward hook on ``cap_embedder``: while ``lengths`` is set, pass its flat output ``[sum L_i, D]`` through
    ``view`` as ``[B, max L_i, D]`` (zero-padded) and flatten the result back. ``L_i`` is a caption's length as the
    transformer projects it: rounded up to a multiple of ``SEQ_MULTI_OF`` with copies of its last token."""

    def __init__(self, view: nn.Module) -> None:
        self.view = view
        self.lengths: list[int] | None = None

    def __call__(self, _module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
        if self.lengths is None:
            return output
        rows = list(output.split(self.lengths, dim=0))
        padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0.0)
        padded = self.view(padded)
        return torch.cat([padded[i, :length] for i, length in enumerate(self.lengths)], dim=0)


class ZImageGenerator(ShiftedScaledLatents, DiffusersGenerator):
    """``F(x_t, t, r, c)`` of a ``ZImagePipeline``; ``x_t: [B, C, h, w]`` shifted and scaled VAE latents."""

    FAMILY = "z-image"
    PIPELINE_CLASS = "ZImagePipeline"
    TEXT_PROJECTION = "cap_embedder"
    TIME_EMBEDDER = "t_embedder.mlp"
    TIME_PROJ = "t_embedder"  # replaced by its sinusoid (_Sinusoid) in __init__: the module has no other
    DEFAULT_MAX_SEQUENCE_LENGTH = 512
    DEFAULT_LORA_TARGETS = DIFFUSERS_LORA_TARGETS["z-image"]

    def __init__(
        self, pipeline: Any, max_sequence_length: int | None = None, unconditional_prompt: str | None = None
    ) -> None:
        super().__init__(pipeline, max_sequence_length, unconditional_prompt)
        self._target_time.time_proj = _Sinusoid(self.transformer.t_embedder)
        self.caption_rows = nn.Identity()  # no parameters: the per-sample view of cap_embedder's output
        self._caption_hook = _CaptionRows(self.caption_rows)
        self.transformer.get_submodule(self.TEXT_PROJECTION).register_forward_hook(self._caption_hook)

    @property
    def text_projection(self) -> nn.Module:
        """``cap_embedder``'s output, one row a sample (``[B, L, D]``); the condition shift hooks it (E5)."""
        return self.caption_rows

    @property
    def latent_multiple(self) -> int:
        """The transformer's 2x2 patches."""
        return PATCH_SIZE

    def _encode(self, prompts: list[str], unconditional: bool) -> dict[str, Tensor]:
        rows = self.pipeline.encode_prompt(
            list(prompts),  # the pipeline writes the templated prompts into the list it gets
            device=self._text_device(),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )[0]
        embeds = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0.0)
        lengths = torch.tensor([len(row) for row in rows], device=embeds.device)
        mask = (torch.arange(embeds.shape[1], device=embeds.device)[None] < lengths[:, None]).long()
        embeds, mask = pad_tokens(embeds, mask, self.max_sequence_length)
        return {"embeds": embeds, "mask": mask}

    def _transformer_timestep(self, t: Tensor) -> Tensor:
        return (1000 - t.abs() * 1000) / 1000  # 1 - |t| in the pipeline's own arithmetic (bit for bit)

    def _time_proj_input(self, t: Tensor) -> Tensor:
        return self._transformer_timestep(t) * self.transformer.t_scale

    def _forward(self, x_t: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
        mask = cond["mask"].bool()
        captions = [embeds[row] for embeds, row in zip(cond["embeds"].to(x_t.dtype), mask, strict=True)]
        from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

        # the transformer pads each caption to a multiple of SEQ_MULTI_OF (repeating its last token) before the
        # projection, and puts its pad token in place of those rows after it
        hook = self.__dict__.get("_caption_hook")  # absent on a bare() generator (memory probes): no view
        if hook is not None:
            hook.lengths = [len(caption) + (-len(caption)) % SEQ_MULTI_OF for caption in captions]
        try:
            out = self.transformer(
                list(x_t.unsqueeze(2).unbind(dim=0)),
                timestep,
                captions,
                patch_size=PATCH_SIZE,
                return_dict=False,
            )[0]
        finally:
            if hook is not None:
                hook.lengths = None
        return -torch.stack(out, dim=0).squeeze(2)  # the transformer predicts x - z
