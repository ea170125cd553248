"""The built-in text-to-image model of the shapes world: pixel-space ``F(x_t, t, r, c)`` built from library classes.

Three parts, each saved and loaded with its library's ``save_pretrained`` / ``from_pretrained``::

    <folder>/unet/            diffusers UNet2DConditionModel, the denoiser (the only trained part)
    <folder>/text_encoder/    transformers BertModel, small, random, frozen
    <folder>/tokenizer/       transformers PreTrainedTokenizerFast over a tokenizers WordLevel model
    <folder>/apex_model.json  {"model": "shapes-unet", "image_size", "max_length", "versions"}

Images are ``[B, 3, S, S]`` in ``[-1, 1]`` (``S = 32`` by default, 64 works too). Time follows method.md: ``t = 1``
is noise, ``t = 0`` data, and the network output is the average velocity from ``t`` to ``r``.

Text: every prompt is tokenized word by word as ``<s> w_1 ... w_n [PAD] ...`` (``max_length = 16`` tokens), so the
empty prompt ``""`` (the unconditional condition ``e``) is the lone ``<s>``. The frozen encoder maps the tokens to
``embeds: [B, 16, 64]`` once per distinct prompt (an in-memory cache); the UNet's ``encoder_hid_proj`` (a Linear
64 -> ``cross_attention_dim``) is the text projection whose output the condition shift ``S`` acts on (E5), and the
UNet cross-attends to it with the token mask.

Target time (E4a) without editing a diffusers class: the UNet is built with ``class_embed_type="timestep"``, so its
time embedding is ``emb = Emb1(1000 t) + class_embedding(time_proj(class_labels))``. We pass
``class_labels = 1000 r`` and a forward hook multiplies ``class_embedding``'s output by ``(t - r)`` (read from the
UNet call by a forward pre-hook), giving ``emb = Emb1(t) + (t - r) Emb2(r)``. At ``r = t`` the second term is
exactly zero, so a teacher trained with ``r = t`` never sees it, and ``init_target_time_embedder`` copies
``time_embedding`` into ``class_embedding`` (``Emb2 := Emb1``) for the student.

LoRA (``add_lora``): peft adapters are injected into the UNet with diffusers' ``add_adapter``; the base weights are
frozen and only the adapters and the target-time embedder ``class_embedding`` train (method.md section 3, [ours]).
peft zero-initialises every ``lora_B``, so a freshly wrapped student is still exactly the teacher at ``r = t``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from apex_cli.core.objective import Condition
from apex_cli.errors import CheckpointError, DataError
from apex_cli.models.lora import AdapterState

MODEL_KIND = "shapes-unet"
MAX_LENGTH = 16
TIME_SCALE = 1000.0
"""Diffusers timestep embedders expect timesteps in ``[0, 1000]``: the UNet sees ``1000 t`` and ``1000 r``."""
PAD_TOKEN = "[PAD]"
BOS_TOKEN = "<s>"
META_FILE = "apex_model.json"


# ----------------------------------------------------------------------------------------------------------------
# Images


def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 images ``[B, H, W, 3]`` (or one ``[H, W, 3]``) to float ``[B, 3, H, W]`` in ``[-1, 1]``: ``x / 127.5 - 1``.

    Raises:
        DataError: The array is not uint8 RGB.
    """
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise DataError(f"expected uint8 RGB images [B, H, W, 3], got {array.dtype} {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: Tensor) -> np.ndarray:
    """Float ``[B, 3, H, W]`` in ``[-1, 1]`` (clamped) to uint8 ``[B, H, W, 3]``: ``round((x + 1) 127.5)``."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(x.shape)}")
    scaled = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and text encoder


def build_tokenizer(words: Sequence[str] | None = None, max_length: int = MAX_LENGTH) -> Any:
    """A word-level ``PreTrainedTokenizerFast``: vocabulary ``[PAD], <s>, *words``, ``<s>`` prefixed to every prompt.

    Args:
        words: The words (default ``shapes.vocabulary()``).
        max_length: ``model_max_length`` of the tokenizer.

    Returns:
        The tokenizer (pads on the right with ``[PAD]`` = id 0; ``<s>`` is id 1).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from apex_cli.data import shapes

    words = shapes.vocabulary() if words is None else list(words)
    vocab = {word: i for i, word in enumerate([PAD_TOKEN, BOS_TOKEN, *words])}
    if len(vocab) != len(words) + 2:
        raise ValueError("tokenizer words must be distinct and must not be [PAD] or <s>")
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        model_max_length=max_length,
        padding_side="right",
    )


def build_text_encoder(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 2, seed: int = 0) -> Any:
    """A small random ``BertModel`` (no pooler), frozen: ``eval()`` and ``requires_grad = False``.

    The weights are a function of ``seed`` only; the global RNG is left untouched.
    """
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=2 * MAX_LENGTH,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = BertModel(config, add_pooling_layer=False)
    return _freeze(encoder)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


class _TextStack:
    """Tokenizer + frozen encoder + cache, kept out of ``nn.Module`` registration (not in the state dict)."""

    def __init__(self, tokenizer: Any, encoder: nn.Module, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.max_length = max_length
        self.vocab = set(tokenizer.get_vocab()) - {PAD_TOKEN, BOS_TOKEN}
        self.cache: dict[str, tuple[Tensor, Tensor]] = {}
        self.forwards = 0

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, both ``[B, max_length]`` long, after checking every word."""
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise DataError(f"a prompt must be a string, got {type(prompt).__name__}")
            words = [w for w, _ in self.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(prompt)]
            unknown = sorted({w for w in words if w not in self.vocab})
            if unknown:
                raise DataError(
                    f"prompt {prompt!r} has words outside the shapes vocabulary: {', '.join(map(repr, unknown))}; "
                    f"the vocabulary is: {', '.join(sorted(self.vocab))}",
                    hint="shapes prompts follow GenEval's templates, e.g. 'a photo of a red circle'",
                )
            if len(words) + 1 > self.max_length:
                raise DataError(
                    f"prompt {prompt!r} has {len(words)} words; the shapes model takes at most "
                    f"{self.max_length - 1} (max length {self.max_length} tokens with <s>)"
                )
        out = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=False, return_tensors="pt"
        )
        return out["input_ids"], out["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], device: torch.device) -> dict[str, Tensor]:
        """``{"embeds": [B, L, D] float32, "mask": [B, L] long}`` on ``device``; one encoder forward per new prompt."""
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if missing:
            ids, mask = self.tokenize(missing)
            encoder_device = next(self.encoder.parameters()).device
            if encoder_device != device:
                self.encoder.to(device)
            hidden = self.encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            self.forwards += 1
            for i, prompt in enumerate(missing):
                self.cache[prompt] = (hidden[i].float().cpu(), mask[i].cpu())
        if not prompts:
            dim = self.encoder.config.hidden_size
            return {
                "embeds": torch.zeros(0, self.max_length, dim, device=device),
                "mask": torch.zeros(0, self.max_length, dtype=torch.long, device=device),
            }
        embeds = torch.stack([self.cache[p][0] for p in prompts]).to(device)
        masks = torch.stack([self.cache[p][1] for p in prompts]).to(device)
        return {"embeds": embeds, "mask": masks}


# ----------------------------------------------------------------------------------------------------------------
# Denoiser


def build_unet(
    image_size: int = 32,
    block_out_channels: Sequence[int] = (64, 128, 128),
    layers_per_block: int = 1,
    norm_num_groups: int = 16,
    attention_heads: int = 4,
    cross_attention_dim: int = 128,
    text_dim: int = 64,
    seed: int = 0,
) -> Any:
    """A small pixel-space ``UNet2DConditionModel`` with text cross-attention and a target-time class embedder.

    Down blocks: ``DownBlock2D`` then ``CrossAttnDownBlock2D`` for every further level (mirrored on the way up),
    a cross-attention mid block, ``encoder_hid_proj = Linear(text_dim, cross_attention_dim)`` and
    ``class_embed_type="timestep"``. The weights are a function of ``seed`` only.
    """
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    if levels < 2:
        raise ValueError("the shapes UNet needs at least two levels")
    if image_size % 2 ** (levels - 1):
        raise ValueError(f"image size {image_size} must be a multiple of {2 ** (levels - 1)} for {levels} levels")
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=image_size,
            in_channels=3,
            out_channels=3,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            # diffusers' historical naming: ``attention_head_dim`` is the number of heads of each block.
            attention_head_dim=attention_heads,
            cross_attention_dim=cross_attention_dim,
            encoder_hid_dim=text_dim,
            encoder_hid_dim_type="text_proj",
            class_embed_type="timestep",
        )
    return unet


class _TargetTimeHooks:
    """The E4a hooks on a UNet: ``class_embedding(.)`` is scaled by ``(t - r)`` read from the UNet's own call.

    The hooks object is stored on the UNet (``_apex_target_time``), so a UNet carries its hooks through
    ``copy.deepcopy`` and is never hooked twice.
    """

    ATTRIBUTE = "_apex_target_time"

    def __init__(self) -> None:
        self.gap: Tensor | None = None

    @classmethod
    def install(cls, unet: nn.Module) -> _TargetTimeHooks:
        """Hook ``unet`` unless it already carries these hooks; return its hooks object."""
        existing = getattr(unet, cls.ATTRIBUTE, None)
        if isinstance(existing, cls):
            return existing
        hooks = cls()
        unet.register_forward_pre_hook(hooks._capture, with_kwargs=True)
        unet.class_embedding.register_forward_hook(hooks._scale)
        object.__setattr__(unet, cls.ATTRIBUTE, hooks)
        return hooks

    def _capture(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        labels = args[3] if len(args) > 3 else kwargs.get("class_labels")
        if timestep is None or labels is None:
            self.gap = None
            return
        self.gap = (torch.as_tensor(timestep).float() - torch.as_tensor(labels).float()) / TIME_SCALE

    def _scale(self, _module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
        if self.gap is None:
            raise RuntimeError("the shapes UNet needs timestep and class_labels (the target time r) in its call")
        gap = self.gap.to(device=output.device, dtype=output.dtype)
        return output * gap.reshape(-1, *([1] * (output.ndim - 1)))


# ----------------------------------------------------------------------------------------------------------------
# The model


class ShapesModel(AdapterState, nn.Module):
    """``F(x_t, t, r, c)`` for shapes images: tokenizer, frozen text encoder and a UNet denoiser.

    Only the UNet is a registered submodule, so ``state_dict()``, ``parameters()`` and ``train()`` cover the
    denoiser alone; the tokenizer and the frozen text encoder live beside it (``text_encoder``, ``tokenizer``)
    and are moved to the UNet's device on first use.

    LoRA bookkeeping (``has_lora``, ``trainable_state_dict``, ``merge_lora``, ``adapters_disabled``) comes from
    :class:`~apex_cli.models.lora.AdapterState`.

    Args:
        unet: A ``UNet2DConditionModel`` with ``class_embed_type="timestep"`` and a ``text_proj`` hid projection.
        text_encoder: The frozen transformers encoder (``last_hidden_state`` of width ``unet``'s ``encoder_hid_dim``).
        tokenizer: The word-level tokenizer.
        max_length: Tokens a prompt (with ``<s>``).
    """

    ADAPTED_MODULE = "unet"

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, tokenizer: Any, max_length: int = MAX_LENGTH) -> None:
        super().__init__()
        config = unet.config
        if config.class_embed_type != "timestep" or config.encoder_hid_dim_type != "text_proj":
            raise CheckpointError(
                "the shapes UNet needs class_embed_type='timestep' and encoder_hid_dim_type='text_proj', got "
                f"{config.class_embed_type!r} and {config.encoder_hid_dim_type!r}"
            )
        if config.encoder_hid_dim != text_encoder.config.hidden_size:
            raise CheckpointError(
                f"UNet expects text width {config.encoder_hid_dim}, the text encoder gives "
                f"{text_encoder.config.hidden_size}"
            )
        self.unet = unet
        self._text = _TextStack(tokenizer, _freeze(text_encoder), max_length)
        _TargetTimeHooks.install(unet)

    # --- construction and files ---

    @classmethod
    def build(
        cls,
        image_size: int = 32,
        block_out_channels: Sequence[int] = (64, 128, 128),
        layers_per_block: int = 1,
        norm_num_groups: int = 16,
        attention_heads: int = 4,
        cross_attention_dim: int = 128,
        text_hidden_size: int = 64,
        text_layers: int = 2,
        text_heads: int = 2,
        max_length: int = MAX_LENGTH,
        seed: int = 0,
    ) -> ShapesModel:
        """A fresh random model (text encoder from ``seed``, UNet from ``seed + 1``); the global RNG is untouched.

        The target-time embedder is initialised as a copy of the time embedder, so a fresh model is ready both as
        a teacher (which only ever sees ``r = t``) and as a student.
        """
        tokenizer = build_tokenizer(max_length=max_length)
        encoder = build_text_encoder(len(tokenizer.get_vocab()), text_hidden_size, text_layers, text_heads, seed)
        unet = build_unet(
            image_size=image_size,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            attention_heads=attention_heads,
            cross_attention_dim=cross_attention_dim,
            text_dim=text_hidden_size,
            seed=seed + 1,
        )
        model = cls(unet, encoder, tokenizer, max_length)
        model.init_target_time_embedder()
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``unet/``, ``text_encoder/``, ``tokenizer/`` and ``apex_model.json`` under ``directory``."""
        import diffusers
        import tokenizers
        import transformers

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(directory / "unet")
        self.text_encoder.save_pretrained(directory / "text_encoder")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        meta = {
            "model": MODEL_KIND,
            "image_size": self.image_size,
            "max_length": self.max_length,
            "versions": {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
            },
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ShapesModel:
        """Load a folder written by :meth:`save_pretrained` (local files only).

        Raises:
            CheckpointError: The folder is missing, is not a shapes model, or a part cannot be read.
        """
        from diffusers import UNet2DConditionModel
        from transformers import BertModel, PreTrainedTokenizerFast

        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise CheckpointError(
                f"{directory} is not a shapes model folder (no {META_FILE})",
                hint="pass the folder written by ShapesModel.save_pretrained / a shapes teacher run",
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise CheckpointError(f"{meta_path} is not valid JSON ({err})") from None
        if meta.get("model") != MODEL_KIND:
            raise CheckpointError(f"{directory} holds a {meta.get('model')!r} model, not {MODEL_KIND!r}")
        for part in ("unet", "text_encoder", "tokenizer"):
            if not (directory / part).is_dir():
                raise CheckpointError(f"{directory} has no {part}/ folder")
        try:
            unet = UNet2DConditionModel.from_pretrained(directory / "unet", local_files_only=True)
            encoder = BertModel.from_pretrained(directory / "text_encoder", local_files_only=True)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(directory / "tokenizer", local_files_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot load the shapes model in {directory}: {err}") from None
        return cls(unet, encoder, tokenizer, int(meta.get("max_length", MAX_LENGTH)))

    # --- properties ---

    @property
    def text_encoder(self) -> nn.Module:
        """The frozen text encoder (not a registered submodule)."""
        return self._text.encoder

    @property
    def tokenizer(self) -> Any:
        """The word-level tokenizer."""
        return self._text.tokenizer

    @property
    def text_projection(self) -> nn.Module:
        """``unet.encoder_hid_proj``: its output ``h: [B, L, cross_attention_dim]`` is what the shift acts on (E5)."""
        return self.unet.encoder_hid_proj

    @property
    def image_size(self) -> int:
        """Default image side (the UNet's ``sample_size``); any multiple of ``2^(levels - 1)`` works."""
        return int(self.unet.config.sample_size)

    @property
    def max_length(self) -> int:
        """Tokens a prompt, ``<s>`` included."""
        return self._text.max_length

    @property
    def encoder_forwards(self) -> int:
        """How many text-encoder forwards ``encode_prompts`` has run (the cache makes repeats free)."""
        return self._text.forwards

    @property
    def device(self) -> torch.device:
        """The UNet's device."""
        return next(self.unet.parameters()).device

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The denoiser's parameters that train: all of them, or after :meth:`add_lora` the adapters and embedder."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    # --- LoRA ---

    def add_lora(
        self, rank: int, alpha: float | None = None, target_modules: Sequence[str] = (), dropout: float = 0.0
    ) -> None:
        """Freeze the UNet and inject peft LoRA adapters into ``target_modules``; ``class_embedding`` stays trainable.

        Call it after the base weights are loaded and :meth:`init_target_time_embedder` has run. Each targeted layer
        ``W`` becomes ``W + (alpha / rank) B A`` with ``B = 0`` at first, so the output is unchanged.

        Args:
            rank: Rank of every adapter.
            alpha: LoRA alpha (None = ``rank``).
            target_modules: Module names or dotted suffixes, e.g. ``"to_q"`` or ``"downsamplers.0.conv"``.
            dropout: Dropout on the adapters' input (training mode only).

        Raises:
            ValueError: The model already has adapters, or a target matches no module of the UNet.
        """
        from peft import LoraConfig

        if self.has_lora:
            raise ValueError("the model already has LoRA adapters")
        names = [name for name, _ in self.unet.named_modules()]
        unmatched = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
        if unmatched or not target_modules:
            raise ValueError(
                f"LoRA targets {unmatched or list(target_modules)} match no module of the shapes UNet; "
                "use names such as to_q, to_k, to_v, to_out.0, conv1, conv2, time_emb_proj"
            )
        self.unet.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules), lora_dropout=dropout)
        self.unet.add_adapter(config)  # peft: inject_adapter_in_model, only the adapters require grad
        self.unet.class_embedding.requires_grad_(True)
        self._mark_trainable()

    # --- conditions ---

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, ``[B, max_length]`` each.

        Raises:
            DataError: A word is outside the vocabulary (the message lists it), or a prompt is too long.
        """
        return self._text.tokenize(prompts)

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The condition of ``prompts``: ``{"embeds": [B, L, D] float32, "mask": [B, L] long}`` on the UNet's device.

        Each distinct prompt is encoded once (no grad) and cached in memory; later calls reuse the cache.

        Raises:
            DataError: A prompt has an unknown word or is too long.
        """
        return self._text.encode(prompts, self.device)

    def unconditional(self, batch_size: int, device: torch.device | None = None) -> dict[str, Tensor]:
        """The condition ``e`` (the empty prompt, i.e. ``<s>`` alone) repeated ``batch_size`` times."""
        empty = self.encode_prompts([""])
        return {
            key: value.repeat(batch_size, *([1] * (value.ndim - 1))).to(device or value.device)
            for key, value in empty.items()
        }

    def clear_text_cache(self) -> None:
        """Forget every cached prompt encoding."""
        self._text.cache.clear()

    # --- the network ---

    def init_target_time_embedder(self) -> None:
        """``Emb2 := Emb1`` (E4a): copy ``unet.time_embedding`` into ``unet.class_embedding``."""
        self.unet.class_embedding.load_state_dict(self.unet.time_embedding.state_dict())

    def velocity(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Condition) -> Tensor:
        """Average velocity from ``t`` to ``r``.

        Args:
            x_t: Noisy images ``[B, 3, H, W]``.
            t: Current times ``[B]`` (negative on TwinFlow's fake rows).
            r: Target times ``[B]``; ``r = t`` gives the instantaneous velocity.
            cond: ``{"embeds": [B, L, D], "mask": [B, L]}`` from :meth:`encode_prompts`.

        Returns:
            ``F(x_t, t, r, c)``, ``[B, 3, H, W]``.
        """
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).float().reshape(-1).expand(batch)
        r = torch.as_tensor(r, device=x_t.device).float().reshape(-1).expand(batch)
        embeds = cond["embeds"].to(device=x_t.device, dtype=self.unet.dtype)
        return self.unet(
            x_t,
            t * TIME_SCALE,
            encoder_hidden_states=embeds,
            class_labels=r * TIME_SCALE,
            encoder_attention_mask=cond["mask"].to(x_t.device),
        ).sample

    def forward(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Condition) -> Tensor:
        """Same as :meth:`velocity`."""
        return self.velocity(x_t, t, r, cond)


def parameter_count(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
