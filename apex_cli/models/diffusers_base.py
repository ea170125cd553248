"""``F(x_t, t, r, c)`` of a diffusers flow-matching text-to-image pipeline: the shared part of the five adapters.

A :class:`DiffusersGenerator` wraps a stock pipeline (``QwenImagePipeline``, ``SanaPipeline``,
``StableDiffusion3Pipeline``, ``FluxPipeline`` or ``ZImagePipeline``; one small subclass a family, in
``qwen_image.py``, ``sana.py``, ``sd3.py``, ``flux.py``, ``z_image.py``) and implements the model protocol of the
objective (``core/objective.py``):

- ``velocity(x_t, t, r, cond)``: ``x_t`` are VAE latents ``[B, C, h, w]`` in the model's normalised latent space,
  ``t, r: [B]`` in apex's convention (t = 1 noise, t = 0 data, velocity ``z - x``: the flow-matching teachers'
  own, sigma = t). The subclass packs the latents into the transformer's tokens and converts ``t`` into the
  transformer's timestep units in one method, ``_transformer_timestep`` (table below); nothing else converts time.
- ``text_projection``: the transformer's text-input projection whose output the condition shift acts on (E5):
  Qwen-Image ``txt_in``, SANA ``caption_projection``, SD3 / FLUX ``context_embedder``, Z-Image ``cap_embedder``
  (seen per sample: the transformer calls it on the batch's captions concatenated; see ``z_image.py``).
- the target-time embedder (E4a) ``Emb2``: a copy of the transformer's timestep MLP, held by this module (not by the
  diffusers class, which is not edited) and added by a forward hook on the timestep MLP:
  ``emb = Emb1(t) + (t - r) Emb2(r)``. At ``r = t`` the hook adds exactly zero, so the student is the teacher there,
  and a transformer called without :meth:`DiffusersGenerator.velocity` (a stock pipeline, say) is unchanged.
- ``encode_prompts`` / ``unconditional``: the pipeline's own ``encode_prompt``, padded to a fixed token count so
  conditions concatenate along the batch (cond + uncond in one forward, E7), cached in memory per prompt. The
  unconditional condition ``e`` is the family's own negative prompt (Qwen-Image ``" "``, the others ``""``).
- ``encode_images`` / ``decode_latents``: the VAE with the family's latent normalisation; images ``[B, 3, H, W]``
  in ``[-1, 1]``.
- LoRA (``add_lora``, peft through diffusers' ``add_adapter``): the transformer is frozen, the adapters and the
  target-time embedder train. ``save_lora_weights`` writes the adapters in the file diffusers'
  ``<Pipeline>.load_lora_weights`` reads, and the target-time embedder beside them.

Timestep units (``t`` in ``[0, 1]``; the value the transformer's ``timestep`` argument gets, and the value its
sinusoidal ``time_proj`` finally sees)::

    family       transformer(timestep=...)       time_proj sees
    qwen-image   t                               t (its Timesteps multiply by 1000 themselves)
    sana         1000 t * timestep_scale         1000 t * timestep_scale
    sd3          1000 t                          1000 t
    flux         t (the model multiplies by 1000) 1000 t
    z-image      1 - |t| (reversed: 0 is noise)   1000 (1 - |t|) (its t_scale)

Z-Image's transformer also predicts ``x - z`` (its pipeline negates it): the adapter returns the negative. Its time
embedder sees ``|t|``, as in the released APEX Z-Image code: only the condition shift marks the fake rows there.

Only the transformer and ``Emb2`` are registered submodules: ``state_dict()``, ``parameters()`` and ``train()``
cover them alone. The text encoders, tokenizers, VAE and the prompt cache sit in a holder that ``copy.deepcopy``
shares instead of copying, so an EMA copy of a generator costs one transformer, not a whole pipeline.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from apex_cli.core.objective import Condition
from apex_cli.errors import CheckpointError
from apex_cli.models.lora import AdapterState

TARGET_TIME_FILE = "target_time_embedder.safetensors"
"""The E4a embedder of a LoRA student, written beside ``pytorch_lora_weights.safetensors``."""
LORA_INITS = ("default", "gaussian")
"""peft ``init_lora_weights`` choices that keep ``B = 0`` (the student starts as the teacher)."""


class _FrozenParts:
    """Tokenizers, text encoders, VAE, the pipeline object and the prompt cache: shared by ``copy.deepcopy``."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.cache: dict[tuple[str, bool], dict[str, Tensor]] = {}
        self.disk: Any = None  # a data.cache.DiskCache, when attached
        self.forwards = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> _FrozenParts:
        return self


class _TargetTimeHook:
    """Adds ``(t - r) Emb2(time_proj(r))`` to the output of the transformer's timestep MLP (E4a).

    ``times`` is set by :meth:`DiffusersGenerator.velocity` for the length of one forward; outside it the hook
    does nothing, so the transformer is the plain teacher.
    """

    def __init__(self, embedder: nn.Module, time_proj: nn.Module) -> None:
        self.embedder = embedder
        self.time_proj = time_proj
        self.times: tuple[Tensor, Tensor, Tensor] | None = None  # (t, r, r in time_proj units)

    def __call__(self, _module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
        if self.times is None:
            return output
        t, r, r_proj = self.times
        if output.shape[0] != t.shape[0]:
            raise RuntimeError(f"timestep embedding has {output.shape[0]} rows, the call has {t.shape[0]}")
        target = self.embedder(self.time_proj(r_proj).to(output.dtype))
        return output + (t - r).to(output.dtype)[:, None] * target


class DiffusersGenerator(AdapterState, nn.Module, metaclass=abc.ABCMeta):
    """``F(x_t, t, r, c)`` of a stock diffusers pipeline, with the E4a embedder and the E5 hook point.

    Subclasses set the class attributes and implement ``_encode``, ``_forward`` and the VAE pair. LoRA bookkeeping
    (``has_lora``, ``trainable_state_dict``, ``merge_lora``, ``adapters_disabled``) comes from
    :class:`~apex_cli.models.lora.AdapterState`.

    Args:
        pipeline: The loaded pipeline; its transformer becomes this module's ``transformer``.
        max_sequence_length: Text tokens of every condition (None: ``DEFAULT_MAX_SEQUENCE_LENGTH``).
        unconditional_prompt: The prompt of ``e`` (None: ``UNCONDITIONAL_PROMPT``, the family's own).
    """

    ADAPTED_MODULE = "transformer"
    FAMILY: ClassVar[str]
    PIPELINE_CLASS: ClassVar[str]
    TEXT_PROJECTION: ClassVar[str]
    TIME_EMBEDDER: ClassVar[str]
    """Path of the transformer's timestep MLP (a ``TimestepEmbedding``); ``Emb2`` is a copy of it."""
    TIME_PROJ: ClassVar[str]
    """Path of the sinusoidal ``Timesteps`` module that feeds it."""
    UNCONDITIONAL_PROMPT: ClassVar[str] = ""
    DEFAULT_MAX_SEQUENCE_LENGTH: ClassVar[int]
    DEFAULT_LORA_TARGETS: ClassVar[tuple[str, ...]]

    def __init__(
        self, pipeline: Any, max_sequence_length: int | None = None, unconditional_prompt: str | None = None
    ) -> None:
        super().__init__()
        if type(pipeline).__name__ != self.PIPELINE_CLASS:
            raise CheckpointError(
                f"a {self.FAMILY} generator needs a {self.PIPELINE_CLASS}, got {type(pipeline).__name__}"
            )
        self.transformer = pipeline.transformer
        self.max_sequence_length = max_sequence_length or self.DEFAULT_MAX_SEQUENCE_LENGTH
        self.unconditional_prompt = self.UNCONDITIONAL_PROMPT if unconditional_prompt is None else unconditional_prompt
        for name, component in pipeline.components.items():
            if isinstance(component, nn.Module) and name != "transformer":
                component.eval().requires_grad_(False)
        self._frozen = _FrozenParts(pipeline)
        self.target_time_embedder = copy.deepcopy(self.transformer.get_submodule(self.TIME_EMBEDDER))
        self._target_time = _TargetTimeHook(self.target_time_embedder, self.transformer.get_submodule(self.TIME_PROJ))
        self.transformer.get_submodule(self.TIME_EMBEDDER).register_forward_hook(self._target_time)

    # --- construction ---

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        **generator_kwargs: Any,
    ) -> DiffusersGenerator:
        """Load the pipeline from a local folder or a hub id (``<Pipeline>.from_pretrained``) and wrap it.

        Raises:
            CheckpointError: The folder or hub id cannot be loaded as this family's pipeline.
        """
        import diffusers

        pipeline_class = getattr(diffusers, cls.PIPELINE_CLASS)
        kwargs: dict[str, Any] = {"torch_dtype": torch_dtype, "revision": revision}
        if local_files_only is not None:
            kwargs["local_files_only"] = local_files_only
        try:
            pipeline = pipeline_class.from_pretrained(str(path_or_hub_id), **kwargs)
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"cannot load {path_or_hub_id!r} as a {cls.PIPELINE_CLASS}: {str(err).splitlines()[0]}",
                hint="model.path takes a local diffusers folder (with model_index.json) or a hub id such as "
                "Qwen/Qwen-Image; offline, the hub id must already be in the local cache",
            ) from None
        return cls(pipeline, **generator_kwargs)

    @classmethod
    def tiny(cls, seed: int = 0, torch_dtype: torch.dtype | None = None, **generator_kwargs: Any) -> DiffusersGenerator:
        """A generator over the tiny random pipeline of this family (``models/tiny.py``), built offline."""
        from apex_cli.models.tiny import TINY_MAX_SEQUENCE_LENGTH, build_tiny_pipeline

        if generator_kwargs.get("max_sequence_length") is None:
            generator_kwargs["max_sequence_length"] = TINY_MAX_SEQUENCE_LENGTH[cls.FAMILY]
        pipeline = build_tiny_pipeline(cls.FAMILY, seed)
        if torch_dtype not in (None, torch.float32):  # the tiny pipelines are built in float32
            pipeline.to(torch_dtype)
        return cls(pipeline, **generator_kwargs)

    @classmethod
    def bare(cls, transformer: nn.Module) -> DiffusersGenerator:
        """A generator over a bare transformer, without a pipeline, for measurements (``train/memory.py``): only the
        network call (``_transformer_timestep``, ``_forward``) works, exactly as in training."""
        generator = cls.__new__(cls)
        nn.Module.__init__(generator)
        generator.transformer = transformer
        return generator

    # --- properties ---

    @property
    def pipeline(self) -> Any:
        """The wrapped stock pipeline. Its ``transformer`` is the one the generator was built with (a deep copy, such
        as an EMA, shares the pipeline but has a transformer of its own), and it knows nothing of ``Emb2``."""
        return self._frozen.pipeline

    @property
    def text_projection(self) -> nn.Module:
        """The transformer's text-input projection; the condition shift hooks its output (E5)."""
        return self.transformer.get_submodule(self.TEXT_PROJECTION)

    @property
    def device(self) -> torch.device:
        """The transformer's device."""
        return next(self.transformer.parameters()).device

    @property
    def vae(self) -> Any:
        """The pipeline's VAE (frozen)."""
        return self.pipeline.vae

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each axis."""
        return int(self.pipeline.vae_scale_factor)

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent ``x`` that :meth:`velocity` takes."""
        return int(self.vae.config.latent_channels)

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be multiples of this: the transformer's patch size (FLUX: its 2x2 packing)."""
        return int(self.transformer.config.patch_size)

    @property
    def encoder_forwards(self) -> int:
        """Text-encoding calls made so far (the caches make repeated prompts free)."""
        return self._frozen.forwards

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latent of an image of ``height x width`` pixels.

        Raises:
            ValueError: A side is not a multiple of ``vae_scale_factor * latent_multiple``.
        """
        multiple = self.vae_scale_factor * self.latent_multiple
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(
                f"{self.FAMILY} image sides must be positive multiples of {multiple}, got {height}x{width}"
            )
        return self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    def move_frozen_parts(self, device: torch.device | str) -> None:
        """Move the text encoders and the VAE (not registered submodules, so ``.to`` leaves them) to ``device``."""
        for name, component in self.pipeline.components.items():
            if isinstance(component, nn.Module) and name != "transformer":
                component.to(device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train: all (full fine-tuning), or after :meth:`add_lora` the adapters and ``Emb2``."""
        return [p for p in self.parameters() if p.requires_grad]

    # --- conditions ---

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The condition of ``prompts`` on the transformer's device; each distinct prompt is encoded once (no grad).

        Returns:
            Named tensors with the batch on axis 0 (every family: ``embeds: [B, L, D]``; Qwen-Image, SANA and
            Z-Image add ``mask: [B, L]``, SD3 and FLUX ``pooled: [B, P]``), the same ``L`` for every prompt.
        """
        return self._conditions(list(prompts), unconditional=False)

    def unconditional(self, batch_size: int, device: torch.device | None = None) -> dict[str, Tensor]:
        """The unconditional condition ``e`` (the family's negative prompt) repeated ``batch_size`` times."""
        single = self._conditions([self.unconditional_prompt], unconditional=True)
        return {
            key: value.expand(batch_size, *value.shape[1:]).to(device or value.device) for key, value in single.items()
        }

    def clear_text_cache(self) -> None:
        """Forget every cached prompt encoding."""
        self._frozen.cache.clear()

    def use_disk_cache(self, cache: Any) -> None:
        """Read and write conditions through ``cache`` (a ``data.cache.DiskCache``) as well.

        With a disk cache, only the unconditional condition stays in memory: a dataset's conditions would not fit.
        """
        self._frozen.disk = cache

    def _conditions(self, prompts: list[str], unconditional: bool) -> dict[str, Tensor]:
        if not prompts:
            raise ValueError("a condition needs at least one prompt")
        memory, disk = self._frozen.cache, self._frozen.disk
        found: dict[str, dict[str, Tensor]] = {}
        for prompt in dict.fromkeys(prompts):
            row = memory.get((prompt, unconditional))
            if row is None and disk is not None:
                row = disk.get_text(prompt, unconditional)
            if row is not None:
                found[prompt] = row
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        if missing:
            with torch.no_grad():
                encoded = self._encode(missing, unconditional)
            self._frozen.forwards += 1
            for i, prompt in enumerate(missing):
                found[prompt] = {key: value[i].cpu() for key, value in encoded.items()}
                if disk is not None:
                    disk.put_text(prompt, unconditional, found[prompt])
        if disk is None or unconditional:
            memory.update({(prompt, unconditional): row for prompt, row in found.items()})
        rows = [found[p] for p in prompts]
        return {key: torch.stack([row[key] for row in rows]).to(self.device) for key in rows[0]}

    @abc.abstractmethod
    def _encode(self, prompts: list[str], unconditional: bool) -> dict[str, Tensor]:
        """Encode with the pipeline's own ``encode_prompt``; rows ``[n, ...]`` padded to ``max_sequence_length``."""

    def _text_device(self) -> torch.device:
        return next(self.pipeline.text_encoder.parameters()).device

    # --- the network ---

    def init_target_time_embedder(self) -> None:
        """``Emb2 := Emb1`` (E4a): copy the transformer's timestep MLP into ``target_time_embedder``."""
        if self.has_lora:
            raise ValueError("initialise the target-time embedder before adding LoRA adapters")
        self.target_time_embedder.load_state_dict(self.transformer.get_submodule(self.TIME_EMBEDDER).state_dict())

    def velocity(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Condition) -> Tensor:
        """Average velocity from ``t`` to ``r``.

        Args:
            x_t: Noisy latents ``[B, C, h, w]``.
            t: Current times ``[B]`` (negative on TwinFlow's fake rows).
            r: Target times ``[B]``; ``r = t`` gives the teacher's instantaneous velocity.
            cond: From :meth:`encode_prompts` / :meth:`unconditional`, batch ``B``.

        Returns:
            ``F(x_t, t, r, c)``, ``[B, C, h, w]``, in ``x_t``'s dtype.
        """
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).float().reshape(-1).expand(batch)
        r = torch.as_tensor(r, device=x_t.device).float().reshape(-1).expand(batch)
        dtype = self.transformer.dtype
        cond = {key: value.to(x_t.device) for key, value in cond.items()}
        self._target_time.times = (t, r, self._time_proj_input(r))
        try:
            out = self._forward(x_t.to(dtype), self._transformer_timestep(t), cond)
        finally:
            self._target_time.times = None
        return out.to(x_t.dtype)

    def forward(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Condition) -> Tensor:
        """Same as :meth:`velocity`."""
        return self.velocity(x_t, t, r, cond)

    @abc.abstractmethod
    def _transformer_timestep(self, t: Tensor) -> Tensor:
        """apex time ``t`` -> the transformer's ``timestep`` argument (the one place time units are converted)."""

    @abc.abstractmethod
    def _time_proj_input(self, t: Tensor) -> Tensor:
        """apex time ``t`` -> what the transformer's ``time_proj`` sees for it (so ``Emb2(r)`` matches ``Emb1(t)``)."""

    @abc.abstractmethod
    def _forward(self, x_t: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Pack ``x_t``, call the transformer, unpack: ``[B, C, h, w] -> [B, C, h, w]``."""

    # --- VAE ---

    @abc.abstractmethod
    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> normalised latents ``[B, C, h, w]`` (the VAE posterior's mean),
        computed where the VAE is and returned on the images' device and dtype."""

    @abc.abstractmethod
    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` in ``[-1, 1]`` (not clamped), on the
        latents' device and dtype."""

    def _vae_input(self, images: Tensor) -> Tensor:
        vae = self.vae
        return images.to(device=next(vae.parameters()).device, dtype=vae.dtype)

    # --- LoRA ---

    def add_lora(
        self,
        rank: int,
        alpha: float | None = None,
        target_modules: Sequence[str] = (),
        dropout: float = 0.0,
        init: str = "default",
    ) -> None:
        """Freeze the transformer and inject peft LoRA adapters; ``Emb2`` stays trainable.

        Each targeted layer ``W`` becomes ``W + (alpha / rank) B A`` with ``B = 0`` at first, so the output is
        unchanged until the adapters train.

        Args:
            rank: Rank of every adapter.
            alpha: LoRA alpha (None = ``rank``).
            target_modules: Module names or dotted suffixes (empty: ``DEFAULT_LORA_TARGETS``).
            dropout: Dropout on the adapters' input (training mode only).
            init: ``"default"`` (A Kaiming-uniform) or ``"gaussian"`` (A normal); B = 0 either way.

        Raises:
            ValueError: Adapters already present, an unknown ``init``, or a target that matches no module.
        """
        from peft import LoraConfig

        if self.has_lora:
            raise ValueError("the generator already has LoRA adapters")
        if init not in LORA_INITS:
            raise ValueError(f"unknown LoRA init {init!r}; expected one of {LORA_INITS}")
        targets = list(target_modules or self.DEFAULT_LORA_TARGETS)
        names = [name for name, _ in self.transformer.named_modules()]
        unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
        if unmatched:
            raise ValueError(
                f"LoRA targets {unmatched} match no module of the {self.FAMILY} transformer; "
                f"the defaults are {list(self.DEFAULT_LORA_TARGETS)}"
            )
        self.transformer.requires_grad_(False)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha or rank,
            target_modules=targets,
            lora_dropout=dropout,
            init_lora_weights=True if init == "default" else "gaussian",
        )
        self.transformer.add_adapter(config)  # diffusers -> peft inject_adapter_in_model; only adapters get grad
        self.target_time_embedder.requires_grad_(True)
        self._mark_trainable()

    def save_lora_weights(self, directory: str | Path) -> Path:
        """Write the adapters as diffusers' ``pytorch_lora_weights.safetensors`` (with their peft config, so rank and
        alpha survive) and ``Emb2`` as ``target_time_embedder.safetensors`` beside it.

        A stock ``<Pipeline>.load_lora_weights(directory)`` loads the adapters; the target-time embedder is needed
        only away from ``r = t`` (the one-step map ``F(z, 1, 0, c)``), which a stock pipeline never evaluates.

        Raises:
            ValueError: The generator has no adapters.
        """
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if not self.has_lora:
            raise ValueError("the generator has no LoRA adapters to save")
        directory = Path(directory)
        type(self.pipeline).save_lora_weights(
            directory,
            transformer_lora_layers=get_peft_model_state_dict(self.transformer),
            transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict(),
        )
        embedder = {k: v.detach().contiguous().cpu() for k, v in self.target_time_embedder.state_dict().items()}
        save_file(embedder, str(directory / TARGET_TIME_FILE))
        return directory


class ShiftedScaledLatents:
    """The VAE pair of SD3 and FLUX: the KL VAE's ``(z - shift_factor) * scaling_factor`` (posterior mean)."""

    vae: Any
    _vae_input: Any

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> ``(z - shift_factor) * scaling_factor``, ``[B, C, h, w]``."""
        z = self.vae.encode(self._vae_input(images)).latent_dist.mean
        return ((z - self.vae.config.shift_factor) * self.vae.config.scaling_factor).to(
            device=images.device, dtype=images.dtype
        )

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """``[B, C, h, w]`` -> images in ``[-1, 1]``: ``decode(x / scaling_factor + shift_factor)``."""
        z = self._vae_input(latents) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self.vae.decode(z, return_dict=False)[0].to(device=latents.device, dtype=latents.dtype)


def pack_2x2(latents: Tensor) -> Tensor:
    """``[B, C, h, w] -> [B, (h/2)(w/2), 4C]``: 2x2 latent patches as tokens (Qwen-Image and FLUX packing)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_2x2`: ``[B, (h/2)(w/2), 4C] -> [B, C, h, w]`` with ``h, w`` the latent sides."""
    b, _, channels = tokens.shape
    latents = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, height, width)


def pad_tokens(embeds: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad (or cut) ``embeds: [n, L, D]`` and ``mask: [n, L]`` to ``length`` tokens (padding: zeros, mask 0)."""
    n, current, dim = embeds.shape
    if current >= length:
        return embeds[:, :length], mask[:, :length]
    pad = length - current
    return (
        torch.cat([embeds, embeds.new_zeros(n, pad, dim)], dim=1),
        torch.cat([mask, mask.new_zeros(n, pad)], dim=1),
    )


GENERATOR_MODULES = {
    "qwen-image": ("apex_cli.models.qwen_image", "QwenImageGenerator"),
    "sana": ("apex_cli.models.sana", "SanaGenerator"),
    "sd3": ("apex_cli.models.sd3", "SD3Generator"),
    "flux": ("apex_cli.models.flux", "FluxGenerator"),
    "z-image": ("apex_cli.models.z_image", "ZImageGenerator"),
}
"""Family -> (module, class) of its generator adapter."""


def generator_class(family: str) -> type[DiffusersGenerator]:
    """The adapter class of ``family`` (``"qwen-image"``, ``"sana"``, ``"sd3"``, ``"flux"`` or ``"z-image"``).

    Raises:
        ValueError: Unknown family.
    """
    import importlib

    if family not in GENERATOR_MODULES:
        raise ValueError(f"unknown diffusers family {family!r}; expected one of {tuple(GENERATOR_MODULES)}")
    module, name = GENERATOR_MODULES[family]
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
