"""Where `apex sample` and `apex export` find a model, and the sampler settings that travel with it.

A model is given as a run directory (its newest complete checkpoint), a checkpoint directory, ``shipped:<name>``,
or a folder written by ``apex export`` (recognised by its ``apex_export.json``). Every export stores its sampler
settings in ``apex_sampler.json`` next to the weights; a checkpoint's come from its recipe. Both become one record::

    {"style": "few", "nfe": 1, "gap": [0.001, 0.0], "kumaraswamy": [1.0, 1.0, 1.0], "stochastic_ratio": 1.0,
     "guidance": 0.0, "gap_by_nfe": {"1": [0.001, 0.0], "2": [0.001, 0.6], "4": [0.001, 0.5]},
     "time_grid": [0.999, 0.0]}

``gap_by_nfe`` holds the grid gap at the other documented step counts (method.md section 6), so that ``--nfe 4`` on
an export samples exactly as it does on its checkpoint; ``time_grid`` spells out the grid at ``nfe``. The record is
also the config of the exported diffusers scheduler (``ApexSampler``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from apex_cli.config import Recipe
from apex_cli.core.sampler import STYLES, SamplerSettings, time_grid
from apex_cli.errors import CheckpointError, DataError
from apex_cli.train.sampling import FEW_STEP_GAPS, checkpoint_sampler

EXPORT_FILE = "apex_export.json"
"""Written last into every export: its format, its source checkpoint and the size and SHA-256 of every file."""
SAMPLER_FILE = "apex_sampler.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
"""The adapters, in the layout (and under the name) diffusers' ``load_lora_weights`` reads."""
TARGET_TIME_FILE = "target_time_embedder.safetensors"
"""The E4a target-time embedder of a LoRA student: it trains in full, and a diffusers LoRA file holds adapters only."""
FORMATS = ("diffusers", "lora", "merged")
MODEL_NAME = "shapes-unet"
DEMO_RUN = Path("runs/demo")
"""Where `make demo` puts its run: the model `apex sample` uses when no --ckpt is given."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved ``--ckpt``: a checkpoint directory, or an export folder and its format."""

    path: Path
    export_format: str | None = None

    @property
    def is_export(self) -> bool:
        """Whether ``path`` was written by ``apex export``."""
        return self.export_format is not None


@dataclass
class LoadedModel:
    """A model ready to sample, with the sampler settings it ships with and the hashes of its weights."""

    model: nn.Module
    sampler: dict[str, Any]
    source: ModelSource
    weights_sha256: dict[str, str]
    """File name -> SHA-256 of every weights file the model was built from (a LoRA model's base included)."""


# ---------------------------------------------------------------------------------------------------------------
# Sampler settings


def sampler_record(recipe: Recipe, meta: dict[str, Any]) -> dict[str, Any]:
    """The sampler a checkpoint is used with (``train.sampling.checkpoint_sampler``), as a JSON-ready record."""
    default = checkpoint_sampler(recipe, meta, recipe.sampler.nfe)
    return {
        "style": default.style,
        "nfe": default.nfe,
        "gap": list(default.gap),
        "kumaraswamy": list(default.kumaraswamy),
        "stochastic_ratio": default.stochastic_ratio,
        "guidance": default.guidance,
        "gap_by_nfe": {str(n): list(checkpoint_sampler(recipe, meta, n).gap) for n in FEW_STEP_GAPS},
        "time_grid": time_grid(default.nfe, default.gap, default.kumaraswamy).tolist(),
    }


def settings_from_record(
    record: dict[str, Any],
    nfe: int | None = None,
    style: str | None = None,
    stochastic_ratio: float | None = None,
    guidance: float | None = None,
) -> SamplerSettings:
    """Sampler settings from a record, with optional overrides (another NFE takes its documented gap).

    Raises:
        DataError: ``style`` is not one of few, any, mul.
    """
    if style is not None and style not in STYLES:
        raise DataError(f"--style {style!r} is not a sampler style; expected one of {', '.join(STYLES)}")
    steps = nfe or record["nfe"]
    return SamplerSettings(
        style=style or record["style"],
        nfe=steps,
        gap=tuple(record["gap_by_nfe"].get(str(steps), record["gap"])),  # type: ignore[arg-type]
        kumaraswamy=tuple(record["kumaraswamy"]),  # type: ignore[arg-type]
        stochastic_ratio=record["stochastic_ratio"] if stochastic_ratio is None else stochastic_ratio,
        guidance=record["guidance"] if guidance is None else guidance,
    )


def settings_record(settings: SamplerSettings) -> dict[str, Any]:
    """The settings actually sampled with, for manifests: every field and the time grid."""
    return {
        "style": settings.style,
        "nfe": settings.nfe,
        "gap": list(settings.gap),
        "kumaraswamy": list(settings.kumaraswamy),
        "stochastic_ratio": settings.stochastic_ratio,
        "guidance": settings.guidance,
        "time_grid": time_grid(settings.nfe, settings.gap, settings.kumaraswamy).tolist(),
    }


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file of an export.

    Raises:
        CheckpointError: The file is missing or is not a JSON object.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path.parent} is an incomplete export: {path.name} is missing",
            hint="export it again with apex export --ckpt CHECKPOINT --format FORMAT --overwrite",
        ) from None
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


# ---------------------------------------------------------------------------------------------------------------
# Finding and loading a model


def resolve_source(path: str | Path | None, on_skip: Callable[[Path, str], None] | None = None) -> ModelSource:
    """The checkpoint or export a ``--ckpt`` value names (None: the demo run, ``runs/demo``).

    A run directory resolves to its newest complete checkpoint (``final/`` included); damaged checkpoints are passed
    to ``on_skip(path, problem)`` and skipped.

    Raises:
        CheckpointError: Nothing usable is there, or no --ckpt was given and there is no demo run.
    """
    from apex_cli.train.checkpoint import FINAL, SHIPPED_PREFIX, latest_checkpoint, resolve_checkpoint

    if path is None:
        if not DEMO_RUN.is_dir():
            raise CheckpointError(
                f"no --ckpt given, and there is no demo run at {DEMO_RUN} to sample from",
                hint="train one with `make demo` (about 11 minutes on 2 CPU cores), or pass --ckpt with a run "
                "directory, a checkpoint directory or a folder written by `apex export`",
            )
        path = DEMO_RUN
    if str(path).startswith(SHIPPED_PREFIX):
        return ModelSource(resolve_checkpoint(path))
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist",
            hint="pass a run directory, a checkpoint directory (final/ or checkpoints/step_*), shipped:<name> or a "
            "folder written by `apex export`",
        )
    if (path / EXPORT_FILE).is_file():
        return ModelSource(path, str(read_json(path / EXPORT_FILE).get("format")))
    if (path / "checkpoints").is_dir() or (path / FINAL).is_dir():
        latest = latest_checkpoint(path, on_skip=on_skip)
        if latest is None:
            raise CheckpointError(
                f"run {path} has no complete checkpoint yet",
                hint=f"let the run save one (train.checkpoint_every), or resume it: apex distill --recipe "
                f"{path / 'config.yaml'} --resume",
            )
        return ModelSource(latest)
    return ModelSource(resolve_checkpoint(path))  # its own error names what a checkpoint folder holds


def default_output(source: Path, name: str) -> Path:
    """Where an output goes without --out: ``<source>/<name>``, as `apex eval` does; for a checkpoint shipped inside
    the package (never written to), ``<source name>-<name>`` in the working directory."""
    from apex_cli.train.checkpoint import SHIPPED_DIR

    if source.resolve().is_relative_to(SHIPPED_DIR.resolve()):
        return Path(f"{source.name}-{name}")
    return source / name


def check_text_to_image(recipe: Recipe, directory: Path) -> None:
    """Refuse a checkpoint of another model family with one line naming it.

    Raises:
        CheckpointError: The checkpoint is not a shapes text-to-image model.
    """
    if recipe.model.name != MODEL_NAME:
        raise CheckpointError(
            f"{directory} holds a {recipe.model.name} model ({recipe.name}); apex sample and apex export work on "
            f"{MODEL_NAME} text-to-image models",
            hint="pass a checkpoint of a shapes run, e.g. one trained by `apex distill --recipe shapes-apex-cpu`",
        )


def load_model(source: ModelSource) -> LoadedModel:
    """The model behind a resolved ``--ckpt``, in eval mode on the CPU, with its sampler record.

    Raises:
        CheckpointError: The checkpoint or export is unreadable, of another model, or a LoRA base is missing.
    """
    if source.is_export:
        with quiet_libraries():
            return _load_export(source)
    from apex_cli.train.checkpoint import read_checkpoint, weights_stem
    from apex_cli.train.tasks import load_checkpoint_model

    directory, recipe, meta = read_checkpoint(source.path)
    check_text_to_image(recipe, directory)
    with quiet_libraries():
        model, recipe, meta = load_checkpoint_model(directory)
    stem = weights_stem(directory)
    hashes = {f"{stem}.safetensors": _manifest_sha256(directory, f"{stem}.safetensors")}
    if meta.get("adapters"):
        hashes["base"] = meta.get("base_sha256", "")
    return LoadedModel(model, sampler_record(recipe, meta), source, hashes)


def load_base(base: str | Path) -> nn.Module:
    """The base model of LoRA adapters, exactly as ``apex export --ckpt BASE --format diffusers`` writes it.

    Raises:
        CheckpointError: The base checkpoint cannot be read.
    """
    from apex_cli.train.tasks import load_checkpoint_model

    model, _, meta = load_checkpoint_model(base)
    if meta.get("adapters"):
        model.merge_lora()  # type: ignore[operator]
    return model


def _load_export(source: ModelSource) -> LoadedModel:
    from safetensors.torch import load_file

    from apex_cli.models.shapes import ShapesModel

    info = read_json(source.path / EXPORT_FILE)
    if info.get("model") != MODEL_NAME or source.export_format not in FORMATS:
        raise CheckpointError(
            f"{source.path} is an export of a {info.get('model')!r} model in format {source.export_format!r}; this "
            f"apex samples {MODEL_NAME} exports in the formats {', '.join(FORMATS)}",
            hint="upgrade apex, or sample from the checkpoint the export was made from",
        )
    record = read_json(source.path / SAMPLER_FILE)
    files = info.get("files", {})
    hashes = {name: entry["sha256"] for name, entry in files.items() if name.endswith(".safetensors")}
    if source.export_format != "lora":
        return LoadedModel(ShapesModel.from_pretrained(source.path).eval(), record, source, hashes)
    from apex_cli.train.checkpoint import read_checkpoint, weights_sha256, weights_stem

    base = (info.get("base") or {}).get("checkpoint")
    if not base:
        raise CheckpointError(f"{source.path / EXPORT_FILE} names no base model for its LoRA adapters")
    try:
        base_dir, _, _ = read_checkpoint(base)
    except CheckpointError as err:
        raise CheckpointError(
            f"the LoRA export {source.path} needs its base model {base!r}, which cannot be read ({err})",
            hint="put the base checkpoint back at that path, or sample from a --format merged export",
        ) from None
    if weights_sha256(base_dir, weights_stem(base_dir)) != info["base"]["sha256"]:
        raise CheckpointError(
            f"the base model {base!r} of the LoRA export {source.path} has changed since the export",
            hint="restore the original base checkpoint, or sample from a --format merged export",
        )
    model = load_base(base_dir)
    model.unet.load_lora_adapter(str(source.path), weight_name=LORA_FILE, prefix="unet")  # type: ignore[union-attr,operator]
    model.unet.class_embedding.load_state_dict(load_file(str(source.path / TARGET_TIME_FILE)))  # type: ignore[union-attr,operator]
    hashes["base"] = info["base"].get("sha256", "")
    return LoadedModel(model.eval(), record, source, hashes)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """No diffusers / transformers log lines or progress bars (shard writing, load reports) inside the block.

    Their load report flags the text encoder's pooler as newly initialised: apex builds it without one and only
    reads ``last_hidden_state``, so that is expected.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [
        (lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)
    ]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def _manifest_sha256(directory: Path, name: str) -> str:
    """A checkpoint file's SHA-256 from its manifest (computed when the checkpoint has none)."""
    from apex_cli.train.checkpoint import MANIFEST, file_sha256

    manifest = directory / MANIFEST
    if manifest.is_file():
        entry = json.loads(manifest.read_text()).get("files", {}).get(name)
        if entry:
            return str(entry["sha256"])
    return file_sha256(directory / name)
