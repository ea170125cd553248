"""Per-GPU memory of a recipe, estimated without loading (or downloading) its weights: ``apex distill --dry-run``.

The formula, per process (``N`` processes; ``s = N`` under ``strategy: fsdp``, else ``s = 1``)::

    weights      = (W_base + W_train) / s                      the transformer (frozen base + what trains)
                 + W_ema / s     full fine-tuning with reference ema: a copy; LoRA: the adapters only
                 + W_frozen / s  full fine-tuning with reference frozen, or target_velocity teacher: one copy
                                 (LoRA: adapters off, no copy)
                 + W_fake + W_frozen   the DMD2 baseline (method.fake_score, one process): its fake score, a whole
                                 copy, and the frozen teacher of its real score (shared with a frozen reference;
                                 LoRA: adapters off, no copy)
                 + 2 W_block     fsdp: the gathered block in use and the one prefetched
                 + W_encoders    text encoders + VAE, only where they stay on the GPU (the shapes renderer);
                                 captioned data are cached on disk first, then the encoders leave the GPU
    gradients    = W_train / s                                 (in the trainable parameters' dtype; x 2 for DMD2)
    optimizer    = 2 W_train / s                               (AdamW's two moments, in the parameters' dtype; x 2
                                                               for DMD2: the fake score has its own AdamW)
    activations  = b (A_base + sum_l A_l)                      saved for backward, b = rows per process
                 = b (A_base + L A_in + max_l A_l)             with gradient checkpointing (block inputs only,
                                                               plus one block recomputed in the backward)
    transient    = max(b_nograd max_l A_l, opt_temp)           a no-grad forward's largest block (the E7 / E8 /
                                                               E12 forwards run with B/2 to B rows), or AdamW's
                                                               foreach temporaries (opt_temp = W_train / s)
    peak         = weights + optimizer + gradients + activations + transient

``cpu_offload`` moves the sharded weights, gradients and optimizer states to the CPU: the GPU keeps the gathered
blocks and the activations. The sum is an upper bound by construction: the gradients grow while the activations are
freed in the backward pass, and the largest transient does not always coincide with the largest saved set.

Where the numbers come from:

- Parameters of the transformer and of its LoRA adapters: **exact**. The stock diffusers class is built on the
  ``meta`` device (no memory, no weights) from the model's ``transformer/config.json`` (a local ``model.path``) or
  from the published configuration of a known hub id (:data:`KNOWN_MODELS`), and peft's adapters are injected into
  it with the recipe's targets and rank (they come out in float32 over a bf16 base, as in training).
- Activations: **measured** on the real diffusers blocks at a reduced width (two heads of the real head size, the
  real text width), by summing the tensors autograd saves for backward (parameters and shared storage excluded),
  at three token mixes and one and two blocks, then scaled linearly to the real width, token counts and batch.
- Text encoders and VAE: exact for tiny models and local folders (safetensors headers); for hub ids the published
  sizes in :data:`KNOWN_MODELS` (rounded).
- Not counted: the CUDA context and allocator fragmentation (add 1 to 3 GiB), the text-encoding pass before the
  first step (its own peak: the text encoder alone, reported separately).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apex_cli.config import DiffusersModelConfig, Recipe

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TRANSFORMER_CLASSES = {
    "qwen-image": "QwenImageTransformer2DModel",
    "sana": "SanaTransformer2DModel",
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
}
VAE_FACTOR = {"qwen-image": 8, "sana": 32, "sd3": 8, "flux": 8}
"""Pixels per latent cell of the real teachers' VAEs (the tiny ones: 4)."""


@dataclass(frozen=True)
class KnownModel:
    """A published teacher: its transformer config and the sizes of its frozen parts (billions of parameters)."""

    family: str
    transformer: dict[str, Any]
    text_encoders: dict[str, float]
    vae: float
    source: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "Qwen/Qwen-Image": KnownModel(
        "qwen-image",
        {
            "patch_size": 2,
            "in_channels": 64,
            "out_channels": 16,
            "num_layers": 60,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 3584,
            "guidance_embeds": False,
            "axes_dims_rope": [16, 56, 56],
        },
        {"Qwen2.5-VL-7B": 8.29},
        0.127,
        "transformer/config.json of Qwen/Qwen-Image (20.43B); Qwen2.5-VL-7B-Instruct model card (8.29B)",
    ),
    "Efficient-Large-Model/Sana_600M_1024px_diffusers": KnownModel(
        "sana",
        {
            "attention_head_dim": 32,
            "caption_channels": 2304,
            "cross_attention_dim": 1152,
            "cross_attention_head_dim": 72,
            "in_channels": 32,
            "mlp_ratio": 2.5,
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "num_attention_heads": 36,
            "num_cross_attention_heads": 16,
            "num_layers": 28,
            "out_channels": 32,
            "patch_size": 1,
            "sample_size": 32,
        },
        {"Gemma-2-2B": 2.61},
        0.31,
        "transformer/config.json of Sana_600M_1024px_diffusers (0.59B); Gemma-2-2B (2.61B); DC-AE f32c32 (0.31B)",
    ),
    "stabilityai/stable-diffusion-3.5-medium": KnownModel(
        "sd3",
        {
            "attention_head_dim": 64,
            "caption_projection_dim": 1536,
            "dual_attention_layers": list(range(13)),
            "in_channels": 16,
            "joint_attention_dim": 4096,
            "num_attention_heads": 24,
            "num_layers": 24,
            "out_channels": 16,
            "patch_size": 2,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 384,
            "qk_norm": "rms_norm",
            "sample_size": 128,
        },
        {"CLIP-L": 0.124, "CLIP-bigG": 0.695, "T5-XXL encoder": 4.76},
        0.084,
        "transformer/config.json of stable-diffusion-3.5-medium (2.24B); CLIP-L 0.12B, OpenCLIP bigG 0.69B, T5-XXL "
        "encoder 4.76B; VAE 0.08B",
    ),
    "black-forest-labs/FLUX.1-dev": KnownModel(
        "flux",
        {
            "attention_head_dim": 128,
            "guidance_embeds": True,
            "in_channels": 64,
            "joint_attention_dim": 4096,
            "num_attention_heads": 24,
            "num_layers": 19,
            "num_single_layers": 38,
            "patch_size": 1,
            "pooled_projection_dim": 768,
            "axes_dims_rope": [16, 56, 56],
        },
        {"CLIP-L": 0.123, "T5-XXL encoder": 4.76},
        0.084,
        "transformer/config.json of FLUX.1-dev (11.90B); CLIP-L 0.12B, T5-XXL encoder 4.76B; VAE 0.08B",
    ),
}
KNOWN_MODELS["black-forest-labs/FLUX.1-schnell"] = KnownModel(
    "flux",
    {**KNOWN_MODELS["black-forest-labs/FLUX.1-dev"].transformer, "guidance_embeds": False},
    KNOWN_MODELS["black-forest-labs/FLUX.1-dev"].text_encoders,
    0.084,
    "transformer/config.json of FLUX.1-schnell (11.90B, no guidance embedder); CLIP-L, T5-XXL encoder; VAE",
)
FAMILY_REFERENCE = {
    "qwen-image": "Qwen/Qwen-Image",
    "sana": "Efficient-Large-Model/Sana_600M_1024px_diffusers",
    "sd3": "stabilityai/stable-diffusion-3.5-medium",
    "flux": "black-forest-labs/FLUX.1-dev",
}
"""The known model an unknown hub id of a family is estimated as (the estimate says so)."""


@dataclass
class MemoryEstimate:
    """Bytes per process, by term, and how they were found."""

    terms: dict[str, float]
    details: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        """The sum of the GPU terms (``peak`` in the module formula), bytes."""
        return sum(self.terms.values())

    def table(self) -> str:
        """Plain text: one line a term, with what it holds."""
        lines = [
            f"  {name:<12} {format_bytes(value)}  {self.details.get(name, '')}" for name, value in self.terms.items()
        ]
        lines.append(f"  {'peak':<12} {format_bytes(self.peak)}  per GPU (upper bound; add 1-3 GiB CUDA context)")
        return "\n".join([*lines, *(f"  note: {note}" for note in self.notes)])


def format_bytes(value: float) -> str:
    """``12.34 GiB`` from 1 GiB up, else ``567.8 MiB`` (right-aligned, 10 wide)."""
    if value >= GIB:
        return f"{value / GIB:>6.2f} GiB"
    return f"{value / 2**20:>6.1f} MiB"


# ----------------------------------------------------------------------------------------------------------------
# Parameters


def _transformer_config(config: DiffusersModelConfig) -> tuple[str, dict[str, Any], str]:
    """``(family, transformer config, source)`` without weights: tiny code, a local folder, or a known hub id."""
    family = config.family
    if config.path is None:
        from apex_cli.models.tiny import build_tiny_pipeline

        transformer = build_tiny_pipeline(family, config.seed).transformer
        return family, dict(transformer.config), f"tiny-{family} (built from code)"
    local = Path(config.path) / "transformer" / "config.json"
    if local.is_file():
        return family, json.loads(local.read_text()), str(local)
    known = KNOWN_MODELS.get(config.path) or KNOWN_MODELS[FAMILY_REFERENCE[family]]
    source = known.source if config.path in KNOWN_MODELS else f"{config.path} estimated as {FAMILY_REFERENCE[family]}"
    return family, dict(known.transformer), source


def _build_transformer(family: str, transformer_config: dict[str, Any], device: str = "meta") -> nn.Module:
    import diffusers

    cls = getattr(diffusers, TRANSFORMER_CLASSES[family])
    kwargs = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
    with torch.device(device):
        return cls.from_config(kwargs)  # type: ignore[no-any-return]


def _add_lora(transformer: nn.Module, lora: Any) -> None:
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, target_modules=list(lora.target_modules))
    transformer.add_adapter(config)  # type: ignore[operator]


def _bytes(params: Iterator[Tensor] | list[Tensor]) -> float:
    return float(sum(p.numel() * p.element_size() for p in params))


def _frozen_parts_bytes(config: DiffusersModelConfig, dtype_bytes: int) -> tuple[float, str]:
    """Bytes of the text encoders and the VAE (in the model's dtype), and where the count comes from."""
    if config.path is None:
        from apex_cli.models.tiny import build_tiny_pipeline

        pipeline = build_tiny_pipeline(config.family, config.seed)
        count = sum(
            sum(p.numel() for p in part.parameters())
            for name, part in pipeline.components.items()
            if isinstance(part, nn.Module) and name != "transformer"
        )
        return float(count * dtype_bytes), "exact (tiny pipeline)"
    folder = Path(config.path)
    if (folder / "model_index.json").is_file():
        count = sum(
            _safetensors_numel(part) for part in folder.iterdir() if part.is_dir() and part.name != "transformer"
        )
        return float(count * dtype_bytes), f"safetensors headers in {folder}"
    known = KNOWN_MODELS.get(config.path) or KNOWN_MODELS[FAMILY_REFERENCE[config.family]]
    billions = sum(known.text_encoders.values()) + known.vae
    names = ", ".join(f"{k} {v:g}B" for k, v in known.text_encoders.items())
    return billions * 1e9 * dtype_bytes, f"published sizes: {names}, VAE {known.vae:g}B"


def _safetensors_numel(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                total += int(torch.Size(handle.get_slice(key).get_shape()).numel())
    return total


# ----------------------------------------------------------------------------------------------------------------
# Activations


def _small_config(family: str, config: dict[str, Any], layers: tuple[int, int]) -> dict[str, Any]:
    """The transformer config at two heads (same head size, same text width) and ``layers`` blocks."""
    small = {k: v for k, v in config.items() if not k.startswith("_")}
    small["num_attention_heads"] = 2
    small["num_layers"] = layers[0]
    if family == "flux":
        small["num_single_layers"] = layers[1]
    if family == "sana":
        small["num_cross_attention_heads"] = 2
        small["cross_attention_head_dim"] = small["attention_head_dim"]
        small["cross_attention_dim"] = 2 * small["attention_head_dim"]
    if family == "sd3":
        small["caption_projection_dim"] = 2 * small["attention_head_dim"]
        small["dual_attention_layers"] = list(range(layers[0])) if config.get("dual_attention_layers") else []
        small["pos_embed_max_size"] = 16
        small["sample_size"] = 16
    return small


PACKED = ("qwen-image", "flux")
"""Families whose pipeline packs 2x2 latent patches into a token (the others' transformer patchifies)."""


def patch_size(family: str, config: dict[str, Any]) -> int:
    """Latent cells per token along each axis."""
    return 2 if family in PACKED else int(config["patch_size"])


def width(family: str, config: dict[str, Any]) -> int:
    """Hidden width of the transformer's blocks."""
    return int(config["num_attention_heads"] * config["attention_head_dim"])


def saved_activation_bytes(module: nn.Module, run: Any) -> int:
    """Bytes of the tensors autograd saves for backward while ``run()`` executes (parameters and repeated storage
    excluded): the activation memory a training forward holds until its backward."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def _probe(
    family: str,
    config: dict[str, Any],
    layers: tuple[int, int],
    tokens: tuple[int, int],
    dtype: torch.dtype,
    precision: str,
    lora: Any,
) -> int:
    """Saved bytes of one forward of the reduced transformer on one sample of ``tokens = (image, text)``."""
    from apex_cli.models.diffusers_base import generator_class

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = _build_transformer(family, _small_config(family, config, layers), "cpu").to(dtype)
    if lora is not None:
        _add_lora(transformer, lora)
    transformer.train()
    generator = generator_class(family).bare(transformer)
    patch = patch_size(family, config)
    side = round(tokens[0] ** 0.5) * patch
    channels = config["in_channels"] // (4 if family in PACKED else 1)
    x = torch.randn(1, channels, side, side)
    cond = _probe_condition(family, config, tokens[1])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def run() -> None:
        with autocast:
            generator._forward(x.to(dtype), generator._transformer_timestep(torch.tensor([0.5])), cond)

    return saved_activation_bytes(transformer, run)


def _probe_condition(family: str, config: dict[str, Any], text_tokens: int) -> dict[str, Tensor]:
    width_in = config.get("caption_channels") or config["joint_attention_dim"]
    cond = {"embeds": torch.randn(1, text_tokens, width_in)}
    if family in ("qwen-image", "sana"):
        cond["mask"] = torch.ones(1, text_tokens, dtype=torch.long)
    if family in ("sd3", "flux"):
        cond["pooled"] = torch.randn(1, config["pooled_projection_dim"])
    return cond


@dataclass(frozen=True)
class ActivationModel:
    """Saved-for-backward bytes of one sample: ``base + sum over block kinds of count * per_block``, each term
    ``a S_img + c S_txt + e`` (bytes at the real width)."""

    base: tuple[float, float, float]
    blocks: dict[str, tuple[int, tuple[float, float, float]]]

    def per_block(self, kind: str, image_tokens: int, text_tokens: int) -> float:
        """Bytes one block of ``kind`` saves for one sample."""
        a, c, e = self.blocks[kind][1]
        return a * image_tokens + c * text_tokens + e

    def total(self, image_tokens: int, text_tokens: int) -> float:
        """Bytes a whole forward saves for one sample."""
        a, c, e = self.base
        return (
            a * image_tokens
            + c * text_tokens
            + e
            + sum(count * self.per_block(kind, image_tokens, text_tokens) for kind, (count, _) in self.blocks.items())
        )

    def largest_block(self, image_tokens: int, text_tokens: int) -> float:
        """Bytes of the largest block for one sample."""
        return max(self.per_block(kind, image_tokens, text_tokens) for kind in self.blocks)


def activation_model(
    family: str, config: dict[str, Any], dtype: torch.dtype, precision: str, lora: Any
) -> ActivationModel:
    """Fit :class:`ActivationModel` from probes of the reduced transformer, scaled to the real width."""
    mixes = [(16, 16), (64, 16), (16, 48)]
    kinds = {"double": (1, 0), "single": (0, 1)} if family == "flux" else {"block": (1, 0)}
    start = (1, 1) if family == "flux" else (1, 0)
    base_rows = [_probe(family, config, start, mix, dtype, precision, lora) for mix in mixes]
    solve = torch.tensor([[img, txt, 1.0] for img, txt in mixes], dtype=torch.float64)
    scale = width(family, config) / width(family, _small_config(family, config, start))
    blocks: dict[str, tuple[int, tuple[float, float, float]]] = {}
    per_block_total = torch.zeros(3, dtype=torch.float64)
    for kind, extra in kinds.items():
        layers = (start[0] + extra[0], start[1] + extra[1])
        rows = [_probe(family, config, layers, mix, dtype, precision, lora) for mix in mixes]
        diff = torch.tensor([r - b for r, b in zip(rows, base_rows, strict=True)], dtype=torch.float64)
        coef = torch.linalg.solve(solve, diff).clamp_min(0)
        per_block_total += coef * start[0 if kind != "single" else 1]
        count = config["num_layers"] if kind != "single" else config["num_single_layers"]
        blocks[kind] = (count, tuple(float(v) * scale for v in coef))  # type: ignore[assignment]
    base = (torch.linalg.solve(solve, torch.tensor(base_rows, dtype=torch.float64)) - per_block_total).clamp_min(0)
    return ActivationModel(tuple(float(v) * scale for v in base), blocks)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# The estimate


def tokens(recipe: Recipe, transformer_config: dict[str, Any]) -> tuple[int, int]:
    """``(image tokens, text tokens)`` of one sample of the recipe."""
    from apex_cli.models.tiny import TINY_MAX_SEQUENCE_LENGTH

    config = recipe.model
    assert isinstance(config, DiffusersModelConfig)
    family, tiny = config.family, config.path is None
    factor = 4 if tiny else VAE_FACTOR[family]
    side = recipe.data.image_size // factor // patch_size(family, transformer_config)  # type: ignore[union-attr]
    image = side * side
    defaults = {"qwen-image": 512, "sana": 300, "sd3": 256, "flux": 512}
    text = config.max_sequence_length or (TINY_MAX_SEQUENCE_LENGTH[family] if tiny else defaults[family])
    if family == "sd3":
        text += 77  # the CLIP tokens beside T5's
    return image, text


def estimate_memory(recipe: Recipe) -> MemoryEstimate:
    """The per-process memory of a diffusers recipe (the formula of the module docstring); builds nothing real.

    Raises:
        ValueError: The recipe's model is not a diffusers teacher.
    """
    config = recipe.model
    if not isinstance(config, DiffusersModelConfig):
        raise ValueError("the memory estimate covers diffusers teachers (model.name qwen-image, sana, sd3, flux)")
    hardware, method = recipe.hardware, recipe.method
    family, transformer_config, source = _transformer_config(config)
    dtype = getattr(torch, config.dtype)
    transformer = _build_transformer(family, transformer_config)
    embedder = next(m for n, m in transformer.named_modules() if n.endswith("timestep_embedder"))
    if config.lora is not None:
        with torch.device("meta"):
            _add_lora(transformer, config.lora)
    transformer.to(dtype)  # the adapters too: diffusers' add_adapter gives them the base layers' dtype
    params = list(transformer.parameters())
    train = [p for p in params if p.requires_grad] + list(embedder.parameters())  # Emb2: a copy of the embedder
    buffers = _bytes(transformer.buffers())  # e.g. SD3's positional table
    w_train, w_all = _bytes(train), _bytes(params) + _bytes(embedder.parameters()) + buffers
    w_base = w_all - w_train
    from apex_cli.train.parallel import transformer_blocks

    holder = nn.Module()
    holder.transformer = transformer
    holder.ADAPTED_MODULE = "transformer"  # type: ignore[assignment]
    w_block = max(_bytes(block.parameters()) for block in transformer_blocks(holder))
    shards = hardware.world_size if hardware.strategy == "fsdp" else 1
    lora = config.lora is not None

    weights = (w_base + w_train) / shards
    what = "transformer + adapters + Emb2" if config.lora is not None else "transformer + Emb2"
    details = [f"{what} {w_all / GIB:.2f} GiB ({sum(p.numel() for p in params) / 1e9:.2f}B, {config.dtype})"]
    if method.reference == "ema":
        weights += w_train / shards
        details.append("EMA of the adapters" if lora else "EMA copy")
    if method.reference == "frozen" and not lora:
        weights += w_all / shards
        details.append("frozen copy")
    elif method.reference == "frozen":
        details.append("frozen reference = adapters off (no copy)")
    teacher_copy = method.reference != "frozen" and not lora  # a frozen teacher is not held yet
    if method.target_velocity == "teacher" and teacher_copy:
        weights += w_all / shards
        details.append("frozen teacher (target_velocity)")
        teacher_copy = False
    fake_score = method.fake_score is not None  # the DMD2 baseline: one process, so no shards
    if fake_score:
        weights += w_all
        details.append("DMD2 fake score (a copy)")
        if teacher_copy:
            weights += w_all
            details.append("frozen teacher (real score)")
    if shards > 1:
        weights += 2 * w_block
        details.append(f"/{shards} shards + 2 gathered blocks ({w_block / GIB:.2f} GiB each)")
    encoders, encoders_source = _frozen_parts_bytes(config, DTYPE_BYTES[config.dtype])
    notes = [f"transformer config: {source}"]
    if recipe.data.name == "shapes":
        weights += encoders
        details.append(f"text encoders + VAE {encoders / GIB:.2f} GiB")
    else:
        notes.append(
            f"text encoders + VAE ({encoders / GIB:.2f} GiB, {encoders_source}) run once before the first step to "
            f"fill the disk cache, then leave the GPU"
        )
    offload = hardware.cpu_offload
    if offload:
        weights = 2 * w_block
        details = [f"cpu_offload: only the 2 gathered blocks ({w_block / GIB:.2f} GiB each) on the GPU"]
    gradients = 0.0 if offload else w_train / shards * (2 if fake_score else 1)
    optimizer = 0.0 if offload else 2 * w_train / shards * (2 if fake_score else 1)

    image_tokens, text_tokens = tokens(recipe, transformer_config)
    rows = recipe.train.batch_size // hardware.world_size
    precision = "fp32" if hardware.precision == "fp32" else "bf16"  # auto: a GPU with bf16
    model = activation_model(family, transformer_config, dtype, precision, config.lora)
    largest = model.largest_block(image_tokens, text_tokens)
    if hardware.gradient_checkpointing:
        act_bytes = 2 if dtype != torch.float32 or precision == "bf16" else 4
        width_ = width(family, transformer_config)
        inputs = (image_tokens + text_tokens) * width_ * act_bytes
        layers = sum(count for count, _ in model.blocks.values())
        base = model.total(image_tokens, text_tokens) - sum(
            count * model.per_block(kind, image_tokens, text_tokens) for kind, (count, _) in model.blocks.items()
        )
        per_sample = base + layers * inputs + largest
        act_detail = f"checkpointed: {layers} block inputs + 1 block recomputed"
    else:
        per_sample = model.total(image_tokens, text_tokens)
        act_detail = "saved for backward"
    activations = rows * per_sample
    no_grad_rows = rows  # the E7 guidance forward: cond + uncond of the mul and any rows (B/2 each at 1:1:1:1)
    transient = max(no_grad_rows * largest, 0.0 if offload else w_train / shards)
    terms = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations}
    terms["transient"] = transient
    return MemoryEstimate(
        terms,
        {
            "weights": "; ".join(details),
            "gradients": f"{sum(p.numel() for p in train) / 1e6:.1f}M trainable ({train[0].dtype})".replace(
                "torch.", ""
            )
            + (" x 2 (student, fake score)" if fake_score else ""),
            "optimizer": "AdamW: 2 moments" + (" x 2 (student, fake score)" if fake_score else ""),
            "activations": f"{rows} rows x ({image_tokens} image + {text_tokens} text tokens), {act_detail}",
            "transient": "largest of: one block of a no-grad forward, AdamW's foreach temporaries",
        },
        notes,
    )


@dataclass
class PreparedStep:
    """One training step of a recipe, built as ``run_distillation`` builds it, callable again and again.

    ``step()`` takes the next batch and runs the DMD2 baseline's fake-score updates (``method.fake_score``), the
    loss, the backward pass, the gradient clip, the optimizer step and the EMA update. ``networks`` names every
    network a step evaluates (the student, its EMA copy, the frozen teacher, the fake score): what a forward counter
    hooks; ``tracked`` what a memory tracker follows (modules and optimizers).
    """

    step: Any
    networks: dict[str, nn.Module]
    tracked: list[Any]


def prepare_step(recipe: Recipe, device: str | torch.device = "cpu") -> PreparedStep:
    """Build the run of ``recipe`` (task, model, adapters, references, fake score, optimizers, data) without its
    ``model.init`` weights (the step's cost does not depend on their values), single process.
    """
    from apex_cli.core.objective import apex_loss
    from apex_cli.core.shift import ConditionShift
    from apex_cli.train.fake_score import FakeScore
    from apex_cli.train.loop import _arrange, objective_settings, real_score
    from apex_cli.train.parallel import Layout
    from apex_cli.train.tasks import build_task

    device = torch.device(device)
    torch.manual_seed(recipe.train.seed)
    task = build_task(recipe)
    model = task.build_model().to(device)
    lora = getattr(recipe.model, "lora", None)
    if lora is not None:
        kwargs = {"init": lora.init} if isinstance(recipe.model, DiffusersModelConfig) else {}
        model.add_lora(lora.rank, lora.alpha, lora.target_modules, lora.dropout, **kwargs)  # type: ignore[operator]
    if recipe.hardware.gradient_checkpointing:
        getattr(model, model.ADAPTED_MODULE).enable_gradient_checkpointing()  # type: ignore[operator]
    online, ema, models = _arrange(recipe, model, None, Layout())
    real = real_score(recipe, model, None, models, online)
    critic = FakeScore(recipe, model, real) if real is not None else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    train = recipe.train
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    prepare = getattr(task, "prepare", None)
    if prepare is not None:
        prepare(model, device)
    batches = task.batches(online, train.batch_size, train.seed, device)  # type: ignore[arg-type]
    settings, shift = objective_settings(recipe), ConditionShift(recipe.method.shift, seed=recipe.method.shift_seed)

    def step() -> None:
        x_data, cond = next(batches)
        if critic is not None:
            critic.update(online, cond, x_data.shape)
        uncond = model.unconditional(x_data.shape[0], device)  # type: ignore[operator]
        if critic is None:
            out = apex_loss(models, x_data, cond, uncond, settings, shift)
        else:
            out = critic.loss(models, x_data, cond, uncond, settings)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, train.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        optimizer.zero_grad(set_to_none=True)

    networks: dict[str, nn.Module] = {"student": model}
    if isinstance(getattr(ema, "model", None), nn.Module):
        networks["ema"] = ema.model  # type: ignore[union-attr]
    for name, network in (("reference", models.reference), ("teacher", real), ("teacher", models.teacher)):
        if isinstance(network, nn.Module) and all(network is not n for n in networks.values()):
            networks[name] = network
    if critic is not None:
        networks["fake_score"] = critic.network
    tracked: list[Any] = [*networks.values(), optimizer, *([critic.optimizer] if critic is not None else [])]
    return PreparedStep(step, networks, tracked)


def measure_step_memory(recipe: Recipe) -> dict[str, float]:
    """The peak memory of one training step of ``recipe``, measured (tensors live at the peak, by category).

    Builds the run with :func:`prepare_step`, takes one untracked step (so the optimizer states exist), then tracks
    the second step, from the batch to the optimizer step and the EMA update, with torch's ``MemTracker``
    (``torch.distributed._tools.mem_tracker``: every tensor storage made or held, device by device). Single process,
    on the CPU; the DMD2 baseline's fake score, its optimizer and its updates are part of the step.

    Returns:
        ``{"parameters", "gradients", "optimizer", "activations", "temporaries", "peak"}`` in bytes, at the peak.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    prepared = prepare_step(recipe)

    class StepTracker(MemTracker):  # storages only: its per-module hooks refuse frozen parameters and repeated calls
        def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
            pass

        def _post_fw_hook(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
            pass

        def _pre_bw_hook(self, module: nn.Module, args: Any) -> None:
            pass

        def _post_bw_hook(self, module: nn.Module, args: Any) -> None:
            pass

    prepared.step()
    tracker = StepTracker()
    tracker.track_external(*prepared.tracked)
    with tracker:
        prepared.step()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    by_name = {str(key.value) if hasattr(key, "value") else str(key): float(value) for key, value in peak.items()}
    return {
        "parameters": by_name.get("Parameter", 0.0) + by_name.get("Buffer", 0.0),
        "gradients": by_name.get("Gradient", 0.0),
        "optimizer": by_name.get("Optstate", 0.0),
        "activations": by_name.get("Activation", 0.0),
        "temporaries": by_name.get("Temp", 0.0) + by_name.get("Other", 0.0),
        "peak": by_name["Total"],
    }
