"""Recipes: YAML -> frozen, validated pydantic models; ``--set key.sub=value`` overrides; built-in lookup.

A recipe has the sections ``model``, ``data``, ``method``, ``sampler``, ``train``, ``monitor``, ``hardware``
and ``output``. YAML keys are the field names used in code and in logs. Every section forbids unknown keys,
so a typo is an error with its dotted path, and all errors are reported at once.
"""

from __future__ import annotations

import difflib
import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from apex_cli.core.shift import SHIFT_NAMES
from apex_cli.errors import RecipeError

SCHEMA_VERSION = 1
ShiftName = Literal["negate", "affine", "negative_time", "negate+negative_time"]
assert set(ShiftName.__args__) == set(SHIFT_NAMES)  # type: ignore[attr-defined]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Toy2dModelConfig(_Section):
    """A small MLP velocity model ``F(x_t, t, r, class)`` for the 2-D mixtures."""

    name: Literal["toy2d-mlp"]
    init: str | None = Field(None, description="checkpoint (run or checkpoint directory) to start from")
    init_recipe: str | None = Field(None, description="recipe that trains `init` first when it does not exist")
    hidden_dim: int = Field(256, ge=1)
    depth: int = Field(4, ge=1)
    embed_dim: int = Field(64, ge=1)
    target_time: Literal["embedder", "midpoint"] = Field(
        "embedder", description="E4a: a second time embedder for r (teacher at r = t); E4b: one input t - r/2"
    )


LORA_TARGET_MODULES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
"""Default LoRA targets of the shapes UNet: the module list of diffusers' LCM-LoRA distillation script.

Attention projections alone (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) are the usual choice for style fine-tuning,
but a one-step student must change what every block computes, and the first level of the shapes UNet has no
attention at all: so the transformer's ``proj_in`` / ``proj_out`` / feed-forward, every ResNet's convolutions and
its ``time_emb_proj`` (where the (t, r) embedding enters each block), and the down / up samplers get adapters too.
"""


DIFFUSERS_FAMILIES = ("qwen-image", "sana", "sd3", "flux", "z-image")
"""The diffusers pipelines apex distills: QwenImagePipeline, SanaPipeline, StableDiffusion3Pipeline, FluxPipeline,
ZImagePipeline."""
_DUAL_STREAM_ATTENTION = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
DIFFUSERS_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    # The released APEX Qwen-Image LoRA configs: attention and MLP projections of both streams.
    "qwen-image": (
        *_DUAL_STREAM_ATTENTION,
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    ),
    # Linear self-attention, cross-attention and the 1x1 convolutions of the GLUMBConv feed-forward.
    "sana": (
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "ff.conv_inverted",
        "ff.conv_point",
    ),
    # diffusers' SD3 / FLUX DreamBooth-LoRA lists (both streams' attention and MLPs); FLUX adds the MLP of its
    # single-stream blocks (proj_mlp; their proj_out is left out, the name also matches the final output layer).
    "sd3": (*_DUAL_STREAM_ATTENTION, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    "flux": (
        *_DUAL_STREAM_ATTENTION,
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
    ),
    # Z-Image's single-stream blocks (the noise and context refiners and the main layers): attention and the
    # SwiGLU feed-forward.
    "z-image": (
        "attention.to_q",
        "attention.to_k",
        "attention.to_v",
        "attention.to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    ),
}
"""Default LoRA targets (module-name suffixes of the transformer) of each diffusers family."""


class LoraConfig(_Section):
    """Low-rank adapters (peft LoRA) on the frozen ``model.init``; the E4a target-time embedder trains in full."""

    rank: int = Field(8, ge=1, description="rank of every adapter (the update is (alpha / rank) B A)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; null = rank (update scale 1)")
    target_modules: tuple[str, ...] = Field(
        LORA_TARGET_MODULES,
        min_length=1,
        description="module names (or dotted suffixes) of the UNet that get adapters; default: attention, "
        "feed-forward, ResNet convolutions and time projections, samplers (the LCM-LoRA list)",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")


class ShapesModelConfig(_Section):
    """The built-in text-to-image model of the shapes world: a small pixel-space UNet with cross-attention."""

    name: Literal["shapes-unet"]
    init: str | None = Field(None, description="checkpoint (run or checkpoint directory) to start from")
    init_recipe: str | None = Field(None, description="recipe that trains `init` first when it does not exist")
    block_out_channels: tuple[int, ...] = Field((64, 128, 128), min_length=2)
    layers_per_block: int = Field(1, ge=1)
    attention_heads: int = Field(4, ge=1)
    cross_attention_dim: int = Field(128, ge=1)
    norm_num_groups: int = Field(16, ge=1)
    text_seed: int = Field(0, description="seed of the frozen random text encoder")
    target_time: Literal["embedder"] = Field("embedder", description="E4a: a second time embedder for r")
    lora: LoraConfig | None = Field(
        None, description="train LoRA adapters on the frozen model.init instead of all weights; null = full"
    )

    @field_validator("lora")
    @classmethod
    def _lora_needs_init(cls, lora: LoraConfig | None, info: ValidationInfo) -> LoraConfig | None:
        if lora is not None and info.data.get("init") is None:
            raise ValueError(
                "LoRA adapts a trained base model, so it needs model.init; set model.init to a teacher "
                "(a run or checkpoint directory, or shipped:<name>) or remove model.lora for full training"
            )
        return lora


class DiffusersLoraConfig(_Section):
    """peft LoRA on the frozen transformer of a diffusers teacher; the E4a target-time embedder trains in full."""

    rank: int = Field(64, ge=1, description="rank of every adapter (64: the released APEX Qwen-Image LoRA configs)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; null = rank (update scale 1)")
    target_modules: tuple[str, ...] = Field(
        min_length=1,
        description="module names (or dotted suffixes) of the transformer that get adapters; when left out, the "
        "family's default: attention and MLP projections of both streams (DIFFUSERS_LORA_TARGETS)",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    init: Literal["default", "gaussian"] = Field(
        "default", description="peft init_lora_weights of A (Kaiming-uniform or normal); B = 0 either way"
    )


TINY_DIFFUSERS_MODELS = tuple(f"tiny-{family}" for family in DIFFUSERS_FAMILIES)
DIFFUSERS_MODEL_NAMES = (*DIFFUSERS_FAMILIES, *TINY_DIFFUSERS_MODELS)


class DiffusersModelConfig(_Section):
    """A diffusers flow-matching teacher: Qwen-Image, SANA, SD3, FLUX or Z-Image from ``path`` (a local folder or a
    hub id), or ``tiny-<family>``, the family's tiny random pipeline built offline (for tests and smoke runs)."""

    name: Literal[
        "qwen-image",
        "sana",
        "sd3",
        "flux",
        "z-image",
        "tiny-qwen-image",
        "tiny-sana",
        "tiny-sd3",
        "tiny-flux",
        "tiny-z-image",
    ]
    path: str | None = Field(
        None,
        validate_default=True,
        description="local diffusers folder (with model_index.json) or hub id, e.g. Qwen/Qwen-Image",
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of path")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the weights load in")
    seed: int = Field(0, description="tiny-* models: seed of the random weights")
    max_sequence_length: int | None = Field(
        None, ge=1, description="text tokens of every condition; null = the family's default (tiny: 48 / 64)"
    )
    unconditional_prompt: str | None = Field(
        None, description="prompt of the unconditional condition e (E7); null = the family's own (Qwen ' ', else '')"
    )
    target_time: Literal["embedder"] = Field("embedder", description="E4a: a second time embedder for r")
    lora: DiffusersLoraConfig | None = Field(
        None, description="train LoRA adapters on the frozen teacher instead of all transformer weights; null = full"
    )

    @property
    def family(self) -> str:
        """``qwen-image``, ``sana``, ``sd3``, ``flux`` or ``z-image``."""
        return self.name.removeprefix("tiny-")

    @model_validator(mode="before")
    @classmethod
    def _default_lora_targets(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("lora"), dict) and "target_modules" not in data["lora"]:
            family = str(data.get("name", "")).removeprefix("tiny-")
            if family in DIFFUSERS_LORA_TARGETS:
                data = {**data, "lora": {**data["lora"], "target_modules": DIFFUSERS_LORA_TARGETS[family]}}
        return data

    @field_validator("path", "revision")
    @classmethod
    def _path_fits_the_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        name = info.data.get("name")
        if name is None:  # the name itself is invalid: that error is reported
            return value
        if name.startswith("tiny-") and value is not None:
            raise ValueError(f"model {name!r} is built from code, it has no {info.field_name}; remove it")
        if not name.startswith("tiny-") and info.field_name == "path" and value is None:
            raise ValueError(f"model {name!r} needs a local diffusers folder or a hub id, e.g. Qwen/Qwen-Image")
        return value


class ShapesDataConfig(_Section):
    """The built-in shapes world: (prompt, image) pairs from the renderer, GenEval's six task templates."""

    name: Literal["shapes"]
    image_size: Literal[32, 64] = 32


class _CaptionedData(_Section):
    """Shared fields of the data sources of the diffusers teachers."""

    path: str = Field(description="the folder or manifest file (relative paths: from the working directory)")
    image_size: int = Field(
        ge=8,
        description="square side in pixels the images are resized (shorter side) and centre-cropped to; a multiple "
        "of the teacher's VAE factor times its patch size (Qwen-Image, SD3, FLUX: 16; SANA: 32)",
    )
    cache_dir: str | None = Field(
        None,
        description="folder of the on-disk text-embedding and latent cache, keyed by model and prompt / image, so it "
        "can be shared by runs; null = <output.dir>/cache",
    )


class FolderDataConfig(_CaptionedData):
    """Image-caption pairs from a folder (searched recursively): every ``img.png`` (or .jpg, .jpeg, .webp) with its
    caption in ``img.txt`` beside it."""

    name: Literal["folder"]
    caption_extension: str = Field(".txt", pattern=r"^\.\w+$", description="extension of the caption files")


class ManifestDataConfig(_CaptionedData):
    """Image-caption pairs listed in a ``.jsonl`` or ``.parquet`` manifest: one row a pair, the image path relative
    to the manifest's folder (or absolute)."""

    name: Literal["manifest"]
    image_column: str = "image"
    caption_column: str = "caption"

    @field_validator("path")
    @classmethod
    def _manifest_kind(cls, path: str) -> str:
        if not path.endswith((".jsonl", ".parquet")):
            raise ValueError(f"a manifest is a .jsonl or .parquet file, got {path!r}")
        return path


class PromptsDataConfig(_CaptionedData):
    """Image-free distillation: prompts only (a ``.txt`` file, one prompt a line, or the caption column of a
    ``.jsonl`` / ``.parquet`` manifest). The data of every row are the online model's own one-step samples
    ``sg(G(z, c))``, as in the released code's ``use_image_free``: at step 0 these are the teacher's."""

    name: Literal["prompts"]
    caption_column: str = "caption"

    @field_validator("path")
    @classmethod
    def _prompts_kind(cls, path: str) -> str:
        if not path.endswith((".txt", ".jsonl", ".parquet")):
            raise ValueError(f"prompts come from a .txt, .jsonl or .parquet file, got {path!r}")
        return path


CAPTIONED_DATA = ("folder", "manifest", "prompts")


class Toy2dDataConfig(_Section):
    """Class-conditional 2-D Gaussian mixture; mode ``i`` of ``M`` belongs to class ``floor(i num_classes / M)``."""

    name: Literal["toy2d"]
    layout: Literal["ring", "grid", "line"] = "ring"
    num_modes: int = Field(8, ge=1)
    weights: list[float] | None = Field(None, description="per-mode weights (normalised); null = equal")
    mode_std: float = Field(0.1, gt=0)
    scale: float = Field(2.0, gt=0, description="ring radius, grid / line half-width")
    num_classes: int | None = Field(None, ge=1, description="null = one class per mode")

    @model_validator(mode="after")
    def _check(self) -> Toy2dDataConfig:
        if self.weights is not None:
            if len(self.weights) != self.num_modes:
                raise ValueError(f"weights has {len(self.weights)} entries but num_modes is {self.num_modes}")
            if any(w <= 0 for w in self.weights):
                raise ValueError("weights must all be > 0")
        if self.layout == "grid" and math.isqrt(self.num_modes) ** 2 != self.num_modes:
            raise ValueError(f"layout 'grid' needs a square num_modes (4, 9, 16, ...), got {self.num_modes}")
        if self.num_classes is not None and self.num_classes > self.num_modes:
            raise ValueError(f"num_classes ({self.num_classes}) cannot exceed num_modes ({self.num_modes})")
        return self


class RoleFractions(_Section):
    """Relative share of each role in a batch (section 5); a role with 0 gets no rows."""

    e2e: float = Field(1.0, ge=0)
    mul: float = Field(1.0, ge=0)
    any: float = Field(1.0, ge=0)
    adv: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> RoleFractions:
        if self.e2e + self.mul + self.any + self.adv <= 0:
            raise ValueError("at least one role fraction must be > 0")
        return self

    def as_tuple(self) -> tuple[float, float, float, float]:
        """``(e2e, mul, any, adv)``."""
        return (self.e2e, self.mul, self.any, self.adv)


class FakeScoreConfig(_Section):
    """The DMD2 baseline's separate fake-score network (Yin et al. 2024, arXiv 2405.14867; apex_cli/core/dmd.py).

    A trainable copy of the teacher, trained by flow matching (r = t) on the student's detached one-step samples with
    its own AdamW; the generator follows ``v_fake - v_real`` with the frozen teacher as the real score (E12's form).
    """

    updates: int = Field(
        5, ge=1, description="fake-score updates per generator update (DMD2's two-time-scale rule; 5 in the paper)"
    )
    lr: float | None = Field(None, gt=0, description="learning rate of the fake score (constant); null = train.lr")
    real_guidance: float = Field(
        0.0,
        ge=0,
        description="classifier-free guidance g of the real score F_c + g (F_c - F_u) of the frozen teacher "
        "(DMD2's real guidance scale; the teacher's own sampler.guidance reproduces the distribution it samples)",
    )


class MethodConfig(_Section):
    """The APEX objective (method.md E4-E14). Plain flow matching: only ``mul`` rows, k = 0, N = 0.

    Baselines in the same framework: consistency distillation = APEX without adv rows and ``dist_match_coef: 0``;
    TwinFlow = ``shift: negative_time``; DMD2 = ``fake_score`` set (a separate fake-score network, no adv rows).
    """

    roles: RoleFractions = RoleFractions()
    time_dist: tuple[float, float, float] = Field((1.0, 1.0, 1.0), description="t ~ Beta(a, b) * s")
    consistency_ratio: float = Field(1.0, ge=0, le=1, description="k in r = t - u k t")
    enhanced_ratio: float = Field(0.0, ge=0, description="lambda of the guidance-enhanced target (E7)")
    estimate_order: int = Field(2, ge=0, description="N of the recursive-consistency target (E8); 0 = off")
    delta: float = Field(0.01, gt=0, lt=1, description="finite-difference step of E8")
    loss: Literal["barron", "l2"] = "barron"
    barron_c: float = Field(1e-3, gt=0)
    dist_match_coef: float = Field(0.5, ge=0, description="lambda_dm of the self-adversarial term (E12, E14)")
    dist_match_warmup: int = Field(
        0,
        ge=0,
        description="steps over which lambda_dm ramps linearly from 0 to dist_match_coef while the fake branch, "
        "which starts as the teacher under S(c), learns the generator's velocity; 0 = full from step 1",
    )
    adversarial_weighting: Literal["uniform", "kl"] = "uniform"
    dist_match_loss: Literal["barron", "l2"] | None = Field(
        None,
        description="rho of the self-adversarial term (E12); null = the same as loss. barron gives the push a unit "
        "size per sample whatever |v_fake - v_real| is; l2 scales it with the gap",
    )
    fake_weight: float = Field(
        1.0,
        gt=0,
        description="weight of the adv rows (the fake branch's flow matching) in L_main (E10, E11); 1 = the "
        "released code. Larger lets the fake branch follow a fast-moving generator more closely",
    )
    e2e_weight: float = Field(
        1.0,
        ge=0,
        description="extra weight of the e2e rows' consistency target (E8) in L_main (E10, E11); 1 = the released "
        "code. 0 leaves the one-step map to the self-adversarial term alone (E12), as DMD2 trains its generator",
    )
    target_velocity: Literal["data", "teacher"] = Field(
        "data",
        description="v of the e2e/mul/any rows: data = z - x (E6) plus E7's guidance from the reference, the "
        "released code (consistency training); teacher = the frozen teacher's guided velocity F_T(c) + lambda "
        "(F_T(c) - F_T(e)) (consistency distillation of its guided ODE; guidance 1 + lambda, any reference; a full "
        "fine-tune keeps one frozen copy of the teacher, LoRA turns its adapters off). Needs model.init",
    )
    regression_pairs: int = Field(
        0,
        ge=0,
        description="[ours] teacher ODE pairs for the e2e rows: before the first step the teacher integrates this "
        "many seeded noises to images with its own sampler (regression_nfe Euler steps, regression_guidance), and "
        "the e2e rows regress onto the paired velocity z - x instead of E8's estimate from independent noise (DMD's "
        "regression loss, arXiv 2311.18828). 0 = off, the released code. Needs model.init and e2e rows",
    )
    regression_nfe: int = Field(50, ge=1, description="Euler steps of the teacher's ODE for regression_pairs")
    regression_guidance: float = Field(
        0.0, ge=0, description="classifier-free guidance g of the teacher for regression_pairs: F_c + g (F_c - F_u)"
    )
    shift: ShiftName = "negate"
    shift_seed: int = 0
    reference: Literal["online", "ema", "frozen"] = Field("ema", description="F_ref of E7 (and E8 rollout)")
    ema_decay: float = Field(0.99, gt=0, lt=1)
    cond_dropout: float = Field(0.0, ge=0, lt=1, description="share of rows trained unconditionally (CFG)")
    fake_score: FakeScoreConfig | None = Field(
        None,
        description="null = APEX: the student under the shifted condition is its own fake score (E5, E12); a "
        "section = the DMD2 baseline: a separate fake-score network trained alongside the student",
    )

    @model_validator(mode="after")
    def _check(self) -> MethodConfig:
        a, b, s = self.time_dist
        if a <= 0 or b <= 0 or not 0 < s <= 1:
            raise ValueError(f"time_dist [a, b, s] needs a > 0, b > 0, 0 < s <= 1, got {list(self.time_dist)}")
        if self.reference != "frozen" and self.target_velocity == "data" and self.enhanced_ratio >= 1:
            raise ValueError(
                f"enhanced_ratio must be < 1 with reference {self.reference!r} (guidance compounds to "
                f"1 / (1 - lambda)); got {self.enhanced_ratio}. Use reference: frozen or target_velocity: teacher for "
                "lambda >= 1"
            )
        if self.fake_score is not None:
            if self.roles.adv > 0:
                raise ValueError(
                    "fake_score: the DMD2 baseline's fake score is a separate network, so it has no adv rows; set "
                    "roles.adv: 0"
                )
            if self.dist_match_coef == 0 or self.roles.e2e == 0:
                raise ValueError(
                    "fake_score: the DMD2 baseline trains the generator by distribution matching on the e2e rows; "
                    "set dist_match_coef > 0 and roles.e2e > 0"
                )
        if self.regression_pairs and self.fake_score is not None:
            raise ValueError("regression_pairs: the DMD2 baseline (fake_score) trains without pairs; set it to 0")
        if self.regression_pairs and self.roles.e2e == 0:
            raise ValueError("regression_pairs: the teacher's pairs train the e2e rows; set roles.e2e > 0")
        if self.fake_score is None and self.dist_match_coef > 0 and (self.roles.adv == 0 or self.roles.e2e == 0):
            raise ValueError("dist_match_coef > 0 needs roles.adv > 0 and roles.e2e > 0 (set it to 0 to disable)")
        return self


class SamplerConfig(_Section):
    """How the trained model samples (method.md section 6); stored with exports."""

    style: Literal["few", "any", "mul"] = "few"
    nfe: int = Field(1, ge=1)
    gap: tuple[float, float] = (0.001, 0.0)
    kumaraswamy: tuple[float, float, float] = (1.0, 1.0, 1.0)
    stochastic_ratio: float = Field(1.0, ge=0, le=1)
    guidance: float = Field(0.0, ge=0, description="F_c + g (F_c - F_u); 0 for distilled students")

    @model_validator(mode="after")
    def _check(self) -> SamplerConfig:
        g0, g1 = self.gap
        if not 0 <= g0 < 1 - g1 <= 1:
            raise ValueError(f"gap [g0, g1] needs 0 <= g0 < 1 - g1 <= 1, got {list(self.gap)}")
        if any(k <= 0 for k in self.kumaraswamy):
            raise ValueError(f"kumaraswamy [a, b, c] must be > 0, got {list(self.kumaraswamy)}")
        return self


class TrainConfig(_Section):
    """The optimisation loop: AdamW, grad-norm clip, seeded."""

    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warm-up: constant, or cosine decay to final_lr_ratio x lr at the last step"
    )
    final_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine schedule: lr at the last step, as a share of lr")
    seed: int = 0
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="wall-clock budget of the training steps: the run stops when one more step (as long as the "
        "last) would pass it, and writes final/ (resumable: --resume continues it); null = run all train.steps",
    )
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only the final one")
    keep_last: int = Field(
        0, ge=0, description="periodic checkpoints kept, the newest complete ones (final/ is always kept); 0 = all"
    )
    max_nonfinite_steps: int = Field(
        5,
        ge=1,
        description="a step with a non-finite loss or gradient is skipped (no update); this many in a row stop the run",
    )


class MonitorConfig(_Section):
    """The collapse monitor of a distillation: one-step samples of the student from fresh noise, on the batch's
    conditions, measured every ``every`` steps and logged with the losses; a warning when they look collapsed."""

    every: int = Field(
        10, ge=0, description="steps between measurements: a collapse is reported within this many steps; 0 = off"
    )
    min_diversity: float = Field(
        0.1,
        ge=0,
        description="warn below this diversity: the samples' spread across the batch over the real data's spread "
        "(1 = as varied as the data, 0 = all alike)",
    )
    max_constant_fraction: float = Field(
        0.5, ge=0, le=1, description="warn when more than this share of the images are near-constant (one flat colour)"
    )
    constant_std: float = Field(
        0.05,
        gt=0,
        description="an image is near-constant when its pixel std is below this times the real images' mean pixel std",
    )


class HardwareConfig(_Section):
    """Where and how the run executes: device, precision, and the process layout that ``apex distill`` launches."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32",
        description="bf16 = autocast around the forward passes; auto = bf16 where the device computes it natively"
        " (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else fp32",
    )
    num_threads: int | None = Field(None, ge=1, description="CPU threads; null = torch's default")
    processes: int = Field(
        1, ge=1, description="processes per node, one per GPU; more than one in all relaunches apex through torchrun"
    )
    nodes: int = Field(1, ge=1, description="machines; each runs the same command (torchrun's c10d rendezvous)")
    rdzv_endpoint: str | None = Field(
        None, description="host:port of the rendezvous (node 0) when nodes > 1, e.g. node0.cluster:29500"
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole model (DistributedDataParallel); fsdp: parameters, gradients,"
        " optimizer states and the EMA are sharded over the processes (torch FSDP2 fully_shard, one unit a block)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute each transformer block in the backward pass instead of storing its activations"
    )
    cpu_offload: bool = Field(
        False, description="fsdp only: sharded parameters, gradients and optimizer states live on the CPU"
    )
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="memory of one GPU in GiB (80 for an A100 80GB); --dry-run warns when the estimate exceeds it",
    )

    @property
    def world_size(self) -> int:
        """Processes in all: ``processes * nodes``."""
        return self.processes * self.nodes


class OutputConfig(_Section):
    """Where results go."""

    dir: str = Field(description="run directory (relative paths are relative to the working directory)")
    evaluate: bool = Field(True, description="measure the run at its end (2-D: energy distance; shapes: GenEval)")
    eval_samples: int = Field(4000, ge=100, description="2-D runs: points per sample set of the evaluation")


MODEL_DATA: dict[str, tuple[str, ...]] = {
    "toy2d-mlp": ("toy2d",),
    "shapes-unet": ("shapes",),
    **dict.fromkeys(DIFFUSERS_MODEL_NAMES, ("shapes", *CAPTIONED_DATA)),
}
"""The data each model name trains on (diffusers teachers: the shapes renderer, image folders, manifests, prompts)."""
UNION_TAGS = {"model": set(MODEL_DATA), "data": {name for names in MODEL_DATA.values() for name in names}}
IMAGE_MULTIPLE = {"qwen-image": 16, "sana": 32, "sd3": 16, "flux": 16, "z-image": 16}
"""Image sides of the real teachers must be multiples of this: VAE factor (8; SANA's DC-AE 32) x patch (2; SANA 1)."""
DataConfig = Annotated[
    Toy2dDataConfig | ShapesDataConfig | FolderDataConfig | ManifestDataConfig | PromptsDataConfig,
    Field(discriminator="name"),
]


class Recipe(_Section):
    """A whole recipe: ``apex distill --recipe NAME_OR_PATH``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    description: str = ""
    model: Annotated[Toy2dModelConfig | ShapesModelConfig | DiffusersModelConfig, Field(discriminator="name")]
    data: DataConfig
    method: MethodConfig = MethodConfig()
    sampler: SamplerConfig = SamplerConfig()
    train: TrainConfig
    monitor: MonitorConfig = MonitorConfig()
    hardware: HardwareConfig = HardwareConfig()
    output: OutputConfig

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        expected = MODEL_DATA[self.model.name]
        if self.data.name not in expected:
            raise ValueError(
                f"data.name: model {self.model.name!r} trains on data {' or '.join(map(repr, expected))}, "
                f"not {self.data.name!r}"
            )
        if isinstance(self.data, _CaptionedData) and isinstance(self.model, DiffusersModelConfig):
            multiple = 8 if self.model.name.startswith("tiny-") else IMAGE_MULTIPLE[self.model.family]
            if self.data.image_size % multiple:
                raise ValueError(
                    f"data.image_size: {self.model.name} needs a multiple of {multiple} pixels, got "
                    f"{self.data.image_size}; e.g. {max(multiple, self.data.image_size // multiple * multiple)}"
                )
        hardware = self.hardware
        if hardware.strategy == "fsdp" and hardware.world_size == 1:
            raise ValueError(
                "hardware.strategy: fsdp shards over processes, but processes * nodes = 1; set hardware.processes "
                "to the number of GPUs, or strategy: ddp for one process"
            )
        if hardware.cpu_offload and hardware.strategy != "fsdp":
            raise ValueError("hardware.cpu_offload: offloads FSDP shards; set hardware.strategy: fsdp or remove it")
        if hardware.gradient_checkpointing and self.model.name == "toy2d-mlp":
            raise ValueError("hardware.gradient_checkpointing: the 2-D MLP has no blocks to checkpoint; remove it")
        if hardware.nodes > 1 and hardware.rdzv_endpoint is None:
            raise ValueError("hardware.rdzv_endpoint: nodes > 1 needs the host:port of node 0, e.g. node0:29500")
        world = hardware.world_size
        if self.train.batch_size % world:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of the {world} processes "
                "(hardware.processes * hardware.nodes): each process takes an equal share"
            )
        if isinstance(self.model, DiffusersModelConfig) and self.output.evaluate:
            raise ValueError(
                f"output.evaluate: the end-of-run report is not available for diffusers models ({self.model.name!r}) "
                "yet; set output.evaluate: false"
            )
        active = sum(f > 0 for f in self.method.roles.as_tuple())
        if self.train.batch_size // world < active:
            per_process = "" if world == 1 else f" per process ({self.train.batch_size} over {world} processes)"
            raise ValueError(
                f"train.batch_size ({self.train.batch_size // world}{per_process}) is smaller than the {active} "
                "active method.roles"
            )
        if self.method.fake_score is not None:
            if world > 1:
                raise ValueError(
                    "method.fake_score: the DMD2 baseline runs in one process; set hardware.processes and "
                    "hardware.nodes to 1"
                )
            if getattr(self.model, "init", None) is None and not isinstance(self.model, DiffusersModelConfig):
                raise ValueError(
                    "method.fake_score: the DMD2 baseline distils a teacher (its real score); set model.init to one"
                )
        if (
            self.method.regression_pairs
            and getattr(self.model, "init", None) is None
            and not isinstance(self.model, DiffusersModelConfig)
        ):
            raise ValueError(
                "method.regression_pairs: the pairs come from the teacher's sampler; set model.init to a teacher, or "
                "regression_pairs: 0"
            )
        if (
            self.method.target_velocity == "teacher"
            and getattr(self.model, "init", None) is None
            and not isinstance(self.model, DiffusersModelConfig)
        ):
            raise ValueError(
                "method.target_velocity: teacher distils the teacher's velocity; set model.init to a teacher, or "
                "target_velocity: data"
            )
        if self.hardware.strategy == "fsdp" and not isinstance(self.model, DiffusersModelConfig):
            raise ValueError(
                f"hardware.strategy: fsdp shards the blocks of a diffusers transformer; {self.model.name!r} is small "
                "enough for ddp"
            )
        return self


# ----------------------------------------------------------------------------------------------------------
# Loading


def builtin_recipes() -> dict[str, str]:
    """Built-in recipe names -> YAML text (they ship inside the package as ``apex_cli.recipes``)."""
    folder = resources.files("apex_cli.recipes")
    return {
        entry.name.removesuffix(".yaml"): entry.read_text()
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yaml")
    }


def find_recipe(name_or_path: str) -> tuple[str, str]:
    """Return ``(source, yaml_text)`` of a recipe given as a file path or a built-in name.

    Raises:
        RecipeError: If it is neither an existing file nor a built-in recipe.
    """
    path = Path(name_or_path)
    if path.is_file():
        try:
            return str(path), path.read_text()
        except OSError as err:
            raise RecipeError(f"cannot read recipe file {path}: {err.strerror}") from None
    builtins = builtin_recipes()
    name = name_or_path.removesuffix(".yaml").removesuffix(".yml")
    if name in builtins:
        return f"built-in recipe {name}", builtins[name]
    close = difflib.get_close_matches(name, list(builtins), n=1)
    suggestion = f" Did you mean {close[0]!r}?" if close else ""
    raise RecipeError(
        f"recipe {name_or_path!r} not found: no such file and no built-in recipe of that name.{suggestion}",
        hint="`apex recipes list` shows the built-in recipes; pass a path to use your own YAML file.",
    )


def parse_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw recipe dict, returning a new dict."""
    result = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} is not of the form key.sub=value", hint="e.g. --set train.lr=1e-4")
        *parents, leaf = key.strip().split(".")
        node = result
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError:
            node[leaf] = value
    return result


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Find, parse, override and validate a recipe.

    Raises:
        RecipeError: With every problem and its dotted path, on one line.
    """
    source, text = find_recipe(name_or_path)
    return validate_recipe(parse_yaml(source, text), source, overrides or [])


def parse_yaml(source: str, text: str) -> dict[str, Any]:
    """YAML text -> dict, with a one-line error naming the line on malformed YAML."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{source} is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{source} must be a YAML mapping with sections model, data, method, ...")
    return raw


def validate_recipe(raw: dict[str, Any], source: str, overrides: list[str]) -> Recipe:
    """Validate a raw dict (after overrides) against the schema."""
    raw = parse_overrides(raw, overrides)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        problems = [_describe(error) for error in err.errors()]
        raise RecipeError(
            f"{source} is invalid: " + "; ".join(problems),
            hint="fix the file or override a value with --set key.sub=value; `apex recipes show NAME` shows examples.",
        ) from None


def _describe(error: Any) -> str:
    loc = [str(part) for part in error["loc"]]
    if len(loc) > 1 and loc[1] in UNION_TAGS.get(loc[0], ()):  # pydantic puts the union member's tag in the path
        loc = [loc[0], *loc[2:]]
    path = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _fields_at(loc[:-1], error["loc"])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        suggestion = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(allowed)}"
        return f"{path}: unknown key{suggestion}"
    if error["type"] == "union_tag_invalid":
        ctx = error.get("ctx", {})
        return f"{path}.name: unknown name {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"].startswith("value_error") or error["type"] == "assertion_error":
        return f"{path}: {message}" if loc else message  # a whole-recipe check names its fields itself
    return f"{path}: {message} (got {error.get('input')!r})"


def _fields_at(loc: list[str], raw_loc: tuple[Any, ...]) -> list[str]:
    model: Any = Recipe
    for i, part in enumerate(loc):
        field = model.model_fields.get(part)
        if field is None:
            return []
        members = [a for a in getattr(field.annotation, "__args__", (field.annotation,)) if isinstance(a, type)]
        members = [m for m in members if issubclass(m, BaseModel)]
        if len(members) > 1 and i == 0 and len(raw_loc) > 1:  # a union section: the member named in the path
            members = [m for m in members if raw_loc[1] in m.model_fields["name"].annotation.__args__]
        if not members:
            return []
        model = members[0]
    return list(model.model_fields)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (plain text, every field spelled out)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=120)
