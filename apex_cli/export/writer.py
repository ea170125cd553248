"""`apex export`: a shapes checkpoint as files other tools load, each export verified by a round trip.

Formats (``out`` defaults to ``<checkpoint>/export-<format>``)::

    diffusers  a complete pipeline folder for DiffusionPipeline.from_pretrained(out, trust_remote_code=True):
               model_index.json, pipeline_apex_shapes.py (ApexShapesPipeline), unet/ (UNet2DConditionModel, adapters
               fused), text_encoder/, tokenizer/, scheduler/ (ApexSampler: scheduling_apex.py, scheduler_config.json)
    lora       the adapters of a LoRA checkpoint: pytorch_lora_weights.safetensors in the layout (and with the peft
               config metadata) diffusers' load_lora_weights reads, plus target_time_embedder.safetensors, the E4a
               embedder that trains in full beside them; applied to the base exported with --format diffusers
    merged     the full model with the adapters fused, as ShapesModel.save_pretrained writes it: unet/ (loads with
               diffusers' UNet2DConditionModel.from_pretrained), text_encoder/, tokenizer/, apex_model.json

Every export also holds ``apex_sampler.json`` (the sampler settings: NFE, time grid, style, stochastic ratio,
guidance) and, written last, ``apex_export.json`` (format, source checkpoint, round-trip result, size and SHA-256 of
every file). ComfyUI's LoRA layout is not offered: ComfyUI has no loader for the shapes UNet (a custom pixel-space
model with a target-time embedder and its own sampler), so such a file could not be applied or verified.

Round trip: before the export is published, the written files are loaded the way a user loads them (diffusers'
``DiffusionPipeline.from_pretrained``; for LoRA, the base pipeline plus ``load_lora_weights``; for merged,
``ShapesModel.from_pretrained``) and one fixed-seed sample of each of two prompts is compared with the checkpoint's
own. A difference above :data:`ROUND_TRIP_ATOL` is an error. Everything is written into a temporary sibling folder
that is renamed into place only after the round trip passed, so a failed or interrupted export leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apex_cli import __version__
from apex_cli.core.sampler import SamplerSettings, sample
from apex_cli.errors import ApexError, CheckpointError
from apex_cli.export.files import occupied, publish, staging_folder
from apex_cli.export.loading import (
    EXPORT_FILE,
    FORMATS,
    MODEL_NAME,
    SAMPLER_FILE,
    TARGET_TIME_FILE,
    check_text_to_image,
    default_output,
    load_base,
    quiet_libraries,
    read_json,
    resolve_source,
    sampler_record,
    settings_from_record,
)

ROUND_TRIP_PROMPTS = ("a photo of a red circle", "a photo of two squares left of a blue triangle")
ROUND_TRIP_SEEDS = (0, 1)
ROUND_TRIP_ATOL = 1e-4
"""Largest max-abs difference (float32 samples in [-1, 1]) between an export's samples and its checkpoint's.

A full checkpoint reloads bit-exactly (0.0); fusing LoRA adapters into the weights reorders float sums, which moved
one-step samples of the tiny test student by 2e-6. 1e-4 is far below one PNG level (2 / 255 = 0.008).
"""
PIPELINE_FILE = "pipeline_apex_shapes.py"
SCHEDULER_FILE = "scheduling_apex.py"
_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ExportResult:
    """What `apex export` wrote and how well it matched its checkpoint."""

    out: Path
    format: str
    checkpoint: Path
    max_abs_diff: float
    files: list[str]
    base: str | None = None
    teacher: bool = False
    """A student of a diffusers teacher (its round trip compares velocities, not samples)."""


def export_checkpoint(
    ckpt: str | Path,
    export_format: str,
    out: str | Path | None = None,
    overwrite: bool = False,
    on_stage: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a shapes checkpoint, reload what was written, compare samples, then publish it atomically.

    Args:
        ckpt: A run directory (its newest complete checkpoint), a checkpoint directory or ``shipped:<name>``.
        export_format: ``diffusers``, ``lora`` or ``merged``.
        out: The folder to write (default ``<checkpoint>/export-<format>``, see ``default_output``).
        overwrite: Replace an earlier export at ``out``.
        on_stage: Called with a short description as each stage starts (for progress display).

    Returns:
        The published export.

    Raises:
        ApexError: Unknown format, unwritable or occupied ``out``, a checkpoint of another model (CheckpointError),
            ``lora`` of a full fine-tune, or a round trip that does not match.
    """
    directory, meta, teacher = _exportable_checkpoint(ckpt, export_format)
    out = Path(out) if out is not None else default_output(directory, f"export-{export_format}")
    staging = _staging_folder(out, overwrite)
    stage = on_stage or (lambda _text: None)
    try:
        with quiet_libraries():
            if teacher is None:
                difference = _write_and_verify(staging, directory, export_format, stage)
            else:
                difference = _write_and_verify_teacher(staging, directory, export_format, stage)
        what = "samples" if teacher is None else "velocities"
        if not difference <= ROUND_TRIP_ATOL:  # NaN fails too
            raise ApexError(
                f"round trip failed: the {export_format} export's {what} differ from the checkpoint's by "
                f"{difference:.3g} (max abs, tolerance {ROUND_TRIP_ATOL:g}); nothing was written to {out}",
                hint="this is a bug in apex export; please report it with the output of APEX_DEBUG=1",
            )
        if teacher is not None:
            base = (
                {"pipeline": teacher.path or teacher.name, "revision": teacher.revision}
                if meta.get("adapters")
                else None
            )
        elif export_format == "lora":
            base = {"checkpoint": meta["base"], "sha256": meta.get("base_sha256", "")}
        else:
            base = None
        model_name = MODEL_NAME if teacher is None else teacher.name
        _write_export_info(staging, export_format, directory, meta, difference, base, model_name)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    base_name = None if base is None else base.get("checkpoint") or base.get("pipeline")
    return ExportResult(out, export_format, directory, difference, files, base_name, teacher is not None)


def _exportable_checkpoint(ckpt: str | Path, export_format: str) -> tuple[Path, dict[str, Any], Any]:
    """The checkpoint directory and metadata behind ``--ckpt``, after every check that needs no weights, and the
    recipe's ``DiffusersModelConfig`` for a student of a diffusers teacher (None for a shapes model)."""
    from apex_cli.config import DiffusersModelConfig
    from apex_cli.export.teachers import check_teacher_format
    from apex_cli.train.checkpoint import read_checkpoint

    if export_format not in FORMATS:
        raise ApexError(
            f"unknown --format {export_format!r}; expected one of {', '.join(FORMATS)}",
            hint="ComfyUI's LoRA layout is not offered: ComfyUI cannot load the shapes model it would apply to",
        )
    source = resolve_source(ckpt)
    if source.is_export:
        raise CheckpointError(
            f"{source.path} is already an export ({source.export_format}); apex export reads checkpoints",
            hint=f"export from its checkpoint: {read_json(source.path / EXPORT_FILE)['source']['checkpoint']}",
        )
    directory, recipe, meta = read_checkpoint(source.path)
    if isinstance(recipe.model, DiffusersModelConfig):
        check_teacher_format(recipe, directory, meta, export_format)
        return directory, meta, recipe.model
    check_text_to_image(recipe, directory)
    if export_format == "lora" and not meta.get("adapters"):
        raise CheckpointError(
            f"{directory} is a full fine-tune (every weight trained), not LoRA adapters, so it has no --format lora",
            hint="use --format diffusers or --format merged for a full model; LoRA runs set model.lora in the recipe",
        )
    return directory, meta, None


def _write_and_verify_teacher(
    folder: Path, checkpoint: Path, export_format: str, stage: Callable[[str], None]
) -> float:
    """``teachers.write_and_verify`` with the checkpoint's sampler record; the round trip's max abs difference."""
    from apex_cli.export.teachers import write_and_verify
    from apex_cli.train.checkpoint import read_checkpoint

    _, recipe, meta = read_checkpoint(checkpoint)
    stage(f"writing the {export_format} export, then reloading it and comparing velocities")
    return write_and_verify(folder, checkpoint, export_format, sampler_record(recipe, meta))


def _write_and_verify(folder: Path, checkpoint: Path, export_format: str, stage: Callable[[str], None]) -> float:
    """Write the export of ``checkpoint`` into ``folder``; return the round trip's max abs sample difference."""
    from apex_cli.train.tasks import load_checkpoint_model

    stage("loading the checkpoint")
    model, recipe, meta = load_checkpoint_model(checkpoint)
    record = sampler_record(recipe, meta)
    expected = checkpoint_samples(model, ROUND_TRIP_PROMPTS, ROUND_TRIP_SEEDS, settings_from_record(record))
    stage(f"writing the {export_format} export")
    if export_format == "lora":
        write_lora(folder, model, record)
    else:
        if model.has_lora:  # type: ignore[union-attr]
            model.merge_lora()  # type: ignore[operator]
        (write_diffusers if export_format == "diffusers" else write_merged)(folder, model, record)
    stage("round trip: reloading the export and comparing samples")
    actual = _reload_samples(folder, export_format, record, meta)
    return (actual - expected).abs().max().item()


@torch.no_grad()
def checkpoint_samples(
    model: nn.Module, prompts: Sequence[str], seeds: Sequence[int], settings: SamplerSettings
) -> Tensor:
    """Float samples ``[B, 3, H, W]`` (unclamped, ``[-1, 1]`` for images) of ``prompts[i]`` from seed ``seeds[i]``.

    The noise protocol of ``apex_cli.eval.generate.generate`` (``apex sample``'s images are these, rounded): image
    ``i`` starts from the first draw of a CPU generator seeded by ``seeds[i]`` and re-noises from the same generator.
    """
    device = next(model.parameters()).device
    size = model.image_size  # type: ignore[attr-defined]
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn((3, size, size), generator=g) for g in generators]).to(device)
    cond = model.encode_prompts(list(prompts))  # type: ignore[operator]
    uncond = model.unconditional(len(prompts), device) if settings.guidance else None  # type: ignore[operator]
    return sample(model, noise, cond, settings, uncond=uncond, generator=generators)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# The formats


def write_merged(folder: Path, model: nn.Module, record: dict[str, Any]) -> None:
    """The full model (no adapters) as ``ShapesModel.save_pretrained`` writes it, plus the sampler settings."""
    model.save_pretrained(folder)  # type: ignore[operator]
    _write_json(folder / SAMPLER_FILE, record)


def write_diffusers(folder: Path, model: nn.Module, record: dict[str, Any]) -> None:
    """A pipeline folder that stock diffusers loads: the merged model plus ``model_index.json``, the pipeline class
    file and the ``ApexSampler`` scheduler (its config is the sampler record)."""
    import diffusers

    from apex_cli.export.scheduling_apex import ApexSampler

    write_merged(folder, model, record)
    ApexSampler(**record).save_pretrained(folder / "scheduler")
    shutil.copyfile(_HERE / SCHEDULER_FILE, folder / "scheduler" / SCHEDULER_FILE)
    shutil.copyfile(_HERE / PIPELINE_FILE, folder / PIPELINE_FILE)
    index = {
        "_class_name": [PIPELINE_FILE.removesuffix(".py"), "ApexShapesPipeline"],
        "_diffusers_version": diffusers.__version__,
        "scheduler": [SCHEDULER_FILE.removesuffix(".py"), "ApexSampler"],
        "text_encoder": ["transformers", type(model.text_encoder).__name__],  # type: ignore[union-attr]
        "tokenizer": ["transformers", type(model.tokenizer).__name__],  # type: ignore[union-attr]
        "unet": ["diffusers", type(model.unet).__name__],  # type: ignore[union-attr]
    }
    _write_json(folder / "model_index.json", index)


def write_lora(folder: Path, model: nn.Module, record: dict[str, Any]) -> None:
    """The adapters as diffusers' ``pytorch_lora_weights.safetensors`` (keys ``unet.<module>.lora_A/B.weight``, the
    peft config in its metadata), the fully trained target-time embedder beside them, and the sampler settings.

    Raises:
        CheckpointError: An adapter sits inside the target-time embedder (its two files would overlap).
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from apex_cli.export.pipeline_apex_shapes import ApexShapesPipeline

    unet = model.unet  # type: ignore[union-attr]
    adapters = get_peft_model_state_dict(unet)
    if any(key.startswith("class_embedding.") for key in adapters):
        raise CheckpointError("the LoRA adapters target the target-time embedder (class_embedding); cannot export")
    config = unet.peft_config["default"].to_dict()
    ApexShapesPipeline.save_lora_weights(folder, unet_lora_layers=adapters, unet_lora_adapter_metadata=config)
    embedder = {k: v.detach().contiguous().cpu() for k, v in unet.class_embedding.state_dict().items()}
    save_file(embedder, str(folder / TARGET_TIME_FILE))
    _write_json(folder / SAMPLER_FILE, record)


# ---------------------------------------------------------------------------------------------------------------
# Round trip


def _reload_samples(folder: Path, export_format: str, record: dict[str, Any], meta: dict[str, Any]) -> Tensor:
    """The round-trip samples of a written export, loaded as its users load it."""
    if export_format == "merged":
        from apex_cli.models.shapes import ShapesModel

        loaded = ShapesModel.from_pretrained(folder).eval()
        return checkpoint_samples(loaded, ROUND_TRIP_PROMPTS, ROUND_TRIP_SEEDS, settings_from_record(record))
    if export_format == "diffusers":
        return _pipeline_samples(folder)
    base_folder = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.base.", suffix=".tmp"))
    try:
        write_diffusers(base_folder, load_base(meta["base"]), record)
        return _pipeline_samples(base_folder, lora=folder)
    finally:
        shutil.rmtree(base_folder, ignore_errors=True)


def _pipeline_samples(folder: Path, lora: Path | None = None) -> Tensor:
    """Samples of the pipeline folder loaded by stock diffusers (with LoRA adapters and their sampler, if given)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
        pipe.scheduler = pipe.scheduler.from_config(read_json(lora / SAMPLER_FILE))
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in ROUND_TRIP_SEEDS]
    return pipe(list(ROUND_TRIP_PROMPTS), generator=generators, output_type="latent").images


# ---------------------------------------------------------------------------------------------------------------
# Files


def _staging_folder(out: Path, overwrite: bool) -> Path:
    """A temporary sibling of ``out`` to write into, after checking that ``out`` may be (re)placed.

    Raises:
        ApexError: ``out`` holds something that is not an earlier export, or an export without ``overwrite``, or its
            parent folder cannot be written.
    """
    if occupied(out):
        if not (out / EXPORT_FILE).is_file():
            raise ApexError(
                f"--out {out} already exists and is not an apex export; refusing to replace it",
                hint="choose another --out (a new or empty folder)",
            )
        if not overwrite:
            raise ApexError(f"--out {out} already holds an export", hint="pass --overwrite to replace it")
    return staging_folder(out, "the export")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_export_info(
    folder: Path,
    export_format: str,
    checkpoint: Path,
    meta: dict[str, Any],
    difference: float,
    base: dict[str, Any] | None,
    model_name: str = MODEL_NAME,
) -> None:
    """``apex_export.json``, last: what this is, where it came from, the round trip, and every file's hash."""
    from apex_cli.train.checkpoint import file_sha256

    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    info: dict[str, Any] = {
        "format": export_format,
        "model": model_name,
        "apex_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": str(checkpoint), "kind": meta.get("kind"), "step": meta.get("step")},
        "round_trip": {
            "prompts": list(ROUND_TRIP_PROMPTS),
            "seeds": list(ROUND_TRIP_SEEDS),
            "max_abs_diff": difference,
            "atol": ROUND_TRIP_ATOL,
        },
        "files": files,
    }
    if model_name != MODEL_NAME:
        from apex_cli.export.teachers import ROUND_TRIP_TIMES

        info["round_trip"]["compared"] = (
            f"velocities F(z, t, t) at t = {list(ROUND_TRIP_TIMES)} and the one-step map F(z, 1, 0) of fixed-seed "
            "latents (seeds as above)"
        )
    if base is not None and "checkpoint" in base:
        info["base"] = {**base, "export": f"apex export --ckpt {base['checkpoint']} --format diffusers"}
    elif base is not None:
        info["base"] = base
    _write_json(folder / EXPORT_FILE, info)
