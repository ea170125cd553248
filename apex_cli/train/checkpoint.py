"""Checkpoints: model weights (safetensors), the resolved recipe and metadata, written atomically.

Layout of a checkpoint directory::

    model.safetensors   the online weights
    ema.safetensors     the EMA weights (when the recipe uses an EMA reference)
    recipe.yaml         the resolved recipe that produced it
    training_state.pt   optimizer, LR scheduler, EMA warm-up and RNG states (to resume exactly)
    meta.json           {"step", "kind": "teacher" | "student", "apex_version", "schema_version"}

A run directory holds ``config.yaml``, ``checkpoints/step_XXXXXXX/`` and ``final/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from apex_cli import __version__
from apex_cli.config import SCHEMA_VERSION, Recipe, parse_yaml, validate_recipe
from apex_cli.errors import CheckpointError

FINAL = "final"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    directory: Path,
    recipe_yaml: str,
    weights: dict[str, dict[str, Tensor]],
    meta: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint into a temporary sibling folder, fsync it, then rename it to ``directory``.

    Args:
        directory: Final checkpoint path (replaced if it exists).
        recipe_yaml: The resolved recipe.
        weights: File stem -> state dict, e.g. ``{"model": ..., "ema": ...}``.
        meta: Extra metadata (step, kind).
        training_state: What resuming needs besides the weights (saved with ``torch.save``).

    Returns:
        ``directory``.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        for stem, state in weights.items():
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in state.items()}, str(staging / f"{stem}.safetensors")
            )
        if training_state is not None:
            torch.save(training_state, staging / "training_state.pt")
        (staging / "recipe.yaml").write_text(recipe_yaml)
        full_meta = {**meta, "apex_version": __version__, "schema_version": SCHEMA_VERSION}
        (staging / "meta.json").write_text(json.dumps(full_meta, indent=2))
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint path or a run directory (its ``final/`` checkpoint).

    Raises:
        CheckpointError: If neither holds a complete checkpoint.
    """
    path = Path(path)
    for candidate in (path, path / FINAL):
        if (candidate / "meta.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raise CheckpointError(
        f"{path} is not a checkpoint: expected model.safetensors and meta.json in it or in {path / FINAL}",
        hint="pass a run directory (its final checkpoint is used) or one of its checkpoints/step_* folders",
    )


def read_checkpoint(path: str | Path) -> tuple[Path, Recipe, dict[str, Any]]:
    """``(checkpoint_dir, recipe, meta)`` of a checkpoint, validated."""
    directory = resolve_checkpoint(path)
    meta = json.loads((directory / "meta.json").read_text())
    if meta.get("schema_version", 0) > SCHEMA_VERSION:
        raise CheckpointError(
            f"{directory} was written with recipe schema {meta['schema_version']}, this apex reads {SCHEMA_VERSION}",
            hint="upgrade apex",
        )
    source = str(directory / "recipe.yaml")
    recipe = validate_recipe(parse_yaml(source, (directory / "recipe.yaml").read_text()), source, [])
    return directory, recipe, meta


def load_weights(model: nn.Module, directory: Path, stem: str = "model") -> None:
    """Load ``<stem>.safetensors`` from a checkpoint into ``model`` (all keys must match)."""
    try:
        model.load_state_dict(load_file(str(directory / f"{stem}.safetensors")))
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise CheckpointError(f"{directory} does not fit this model: {first}") from None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of ``run_dir`` with the highest step (``final/`` included), or None."""
    candidates = [p for p in (run_dir / "checkpoints").glob("step_*") if (p / "meta.json").is_file()]
    if (run_dir / FINAL / "meta.json").is_file():
        candidates.append(run_dir / FINAL)
    if not candidates:
        return None
    return max(candidates, key=lambda p: json.loads((p / "meta.json").read_text())["step"])


def load_training_state(directory: Path) -> dict[str, Any]:
    """The optimizer / scheduler / RNG state of a checkpoint written by a run (not by an export)."""
    path = directory / "training_state.pt"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no training_state.pt, so it cannot be resumed")
    return torch.load(path, map_location="cpu", weights_only=True)
