"""Checkpoints: model weights (safetensors), the resolved recipe and metadata, written atomically.

Layout of a checkpoint directory::

    model.safetensors   the online weights
    ema.safetensors     the EMA weights (when the recipe uses an EMA reference)
    recipe.yaml         the resolved recipe that produced it
    training_state.pt   optimizer, LR scheduler, EMA warm-up and RNG states (to resume exactly)
    meta.json           {"step", "kind": "teacher" | "student", "apex_version", "schema_version"}

A run directory holds ``config.yaml``, ``checkpoints/step_XXXXXXX/`` and ``final/``.

A LoRA run (``model.lora``) writes adapter checkpoints: the weight files hold only the trained tensors (the LoRA
``A`` / ``B`` matrices and the target-time embedder ``class_embedding``), and ``meta.json`` adds
``"adapters": true``, ``"base"`` (the recipe's ``model.init``) and ``"base_sha256"`` (of the base weights file).
:func:`load_checkpoint_weights` rebuilds such a model from its base.
"""

from __future__ import annotations

import hashlib
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
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "weights"
"""Checkpoints shipped inside the package (``apex_cli/weights/<name>/``), addressed by ``shipped:<name>``."""
SHIPPED_PREFIX = "shipped:"


def shipped_checkpoints() -> list[str]:
    """Names of the checkpoints shipped with apex, e.g. ``["shapes-teacher"]``."""
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "meta.json").is_file()) if SHIPPED_DIR.is_dir() else []


def _expand_shipped(path: str | Path) -> Path:
    """``shipped:<name>`` -> the packaged folder; any other path unchanged."""
    text = str(path)
    if not text.startswith(SHIPPED_PREFIX):
        return Path(path)
    name = text[len(SHIPPED_PREFIX) :]
    if name not in shipped_checkpoints():
        raise CheckpointError(
            f"no shipped checkpoint named {name!r}",
            hint=f"shipped checkpoints: {', '.join(shipped_checkpoints()) or 'none in this build'}; or train one, e.g."
            " `apex distill --recipe shapes-teacher-cpu`, and point at it: --set model.init=runs/shapes-teacher-cpu",
        )
    return SHIPPED_DIR / name


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
    """A checkpoint directory from a checkpoint path, a run directory (its ``final/`` checkpoint) or ``shipped:<name>``.

    Raises:
        CheckpointError: If neither holds a complete checkpoint.
    """
    path = _expand_shipped(path)
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


def weights_stem(directory: Path) -> str:
    """The weights a checkpoint is used with: ``"ema"`` when it has EMA weights, else ``"model"``."""
    return "ema" if (directory / "ema.safetensors").is_file() else "model"


def weights_sha256(directory: Path, stem: str) -> str:
    """SHA-256 of ``<stem>.safetensors``: how an adapter checkpoint recognises its base."""
    return hashlib.sha256((directory / f"{stem}.safetensors").read_bytes()).hexdigest()


def load_checkpoint_weights(model: nn.Module, path: str | Path, stem: str | None = None) -> tuple[Path, Recipe, dict]:
    """Load a checkpoint into a fresh model of its recipe's architecture.

    A full checkpoint is loaded as is. An adapter checkpoint (``meta["adapters"]``) is rebuilt: the base
    (``meta["base"]``, i.e. the run's ``model.init``) is loaded as :func:`load_as_base` does when the run starts,
    then ``model.add_lora`` with the recipe's ``model.lora`` and the adapter weights.

    Args:
        model: A model built from the checkpoint's recipe (no adapters yet).
        path: A checkpoint or run directory, or ``shipped:<name>``.
        stem: ``"model"`` or ``"ema"``; default: :func:`weights_stem`.

    Returns:
        ``(checkpoint_dir, recipe, meta)``.

    Raises:
        CheckpointError: The weights do not fit, or an adapter checkpoint's base is missing or has changed.
    """
    directory, recipe, meta = read_checkpoint(path)
    stem = stem or weights_stem(directory)
    if not meta.get("adapters"):
        load_weights(model, directory, stem)
        return directory, recipe, meta
    base = meta["base"]
    try:
        base_dir, _, _ = read_checkpoint(base)
    except CheckpointError as err:
        raise CheckpointError(
            f"{directory} holds LoRA adapters only, and their base model {base!r} cannot be read ({err})",
            hint="put the base checkpoint back at that path (the recipe's model.init); the adapters need it",
        ) from None
    if meta.get("base_sha256") and weights_sha256(base_dir, weights_stem(base_dir)) != meta["base_sha256"]:
        raise CheckpointError(
            f"the base model {base!r} of the LoRA adapters in {directory} has changed since they were trained",
            hint="restore the original base checkpoint, or train the adapters again on the new one",
        )
    load_as_base(model, base_dir)
    lora = recipe.model.lora  # type: ignore[union-attr]
    model.add_lora(lora.rank, lora.alpha, lora.target_modules, lora.dropout)  # type: ignore[operator]
    model.load_trainable_state_dict(read_weights(directory, stem))  # type: ignore[operator]
    return directory, recipe, meta


def load_as_base(model: nn.Module, path: str | Path) -> tuple[Path, Recipe, dict]:
    """Load a checkpoint as the starting point of a run (``model.init``): its EMA weights when it has them, any
    adapters merged into the weights, and for a teacher the target-time embedder initialised (E4a, ``Emb2 := Emb1``).
    """
    directory, recipe, meta = load_checkpoint_weights(model, path)
    if meta.get("adapters"):
        model.merge_lora()  # type: ignore[operator]
    if meta.get("kind") == "teacher":
        model.init_target_time_embedder()  # type: ignore[operator]
    return directory, recipe, meta


def read_weights(directory: Path, stem: str) -> dict[str, Tensor]:
    """The tensors of ``<stem>.safetensors`` in a checkpoint."""
    path = directory / f"{stem}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {stem}.safetensors")
    return load_file(str(path))


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
