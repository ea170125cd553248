"""Checkpoints: model weights (safetensors), the resolved recipe and metadata, written atomically.

Layout of a checkpoint directory::

    model.safetensors   the online weights
    ema.safetensors     the EMA weights (when the recipe uses an EMA reference)
    recipe.yaml         the resolved recipe that produced it
    training_state.pt   optimizer, LR scheduler, EMA warm-up and RNG states (to resume exactly)
    meta.json           {"step", "kind": "teacher" | "student", "apex_version", "schema_version"}
    manifest.json       {"files": {name: {"bytes", "sha256"}}} of every other file, written last

A run directory holds ``config.yaml``, ``checkpoints/step_XXXXXXX/`` and ``final/``.

The rename makes a checkpoint appear whole or not at all, even under ``kill -9``; the manifest catches what happens
to it afterwards (a truncated copy, a bad disk). Resuming verifies it: :func:`latest_checkpoint` skips a checkpoint
that does not match its manifest and takes the one before. Checkpoints written before manifests existed have none
and are taken as they are.

A LoRA run (``model.lora``) writes adapter checkpoints: the weight files hold only the trained tensors (the LoRA
``A`` / ``B`` matrices and the target-time embedder ``class_embedding``), and ``meta.json`` adds
``"adapters": true``, ``"base"`` (the recipe's ``model.init``) and ``"base_sha256"`` (of the base weights file).
:func:`load_checkpoint_weights` rebuilds such a model from its base.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from apex_cli import __version__
from apex_cli.config import SCHEMA_VERSION, Recipe, parse_yaml, validate_recipe
from apex_cli.errors import CheckpointError

FINAL = "final"
MANIFEST = "manifest.json"
STEP_PREFIX = "step_"
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
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, an fsync and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
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

    The files are followed by ``manifest.json`` (size and SHA-256 of each), then everything is fsynced and the
    folder renamed into place; until that rename, ``directory`` and every other checkpoint are left as they were.

    Args:
        directory: Final checkpoint path (replaced if it exists).
        recipe_yaml: The resolved recipe.
        weights: File stem -> state dict, e.g. ``{"model": ..., "ema": ...}``.
        meta: Extra metadata (step, kind).
        training_state: What resuming needs besides the weights (saved with ``torch.save``).

    Returns:
        ``directory``.

    Raises:
        CheckpointError: A file could not be written (a full disk, say); nothing was replaced.
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
        files = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in sorted(staging.iterdir())}
        (staging / MANIFEST).write_text(json.dumps({"files": files}, indent=2))
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(staging)
    except (OSError, RuntimeError, SafetensorError) as err:  # the writers' ways of saying "disk full"
        shutil.rmtree(staging, ignore_errors=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        free = shutil.disk_usage(directory.parent).free / 2**20
        raise CheckpointError(
            f"cannot write checkpoint {directory}: {reason} ({free:.0f} MiB free there); "
            "earlier checkpoints are untouched",
            hint="free disk space (or move output.dir to a larger disk), then run the same command with --resume",
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, directory)
    _fsync_directory(directory.parent)
    return directory


def _fsync_directory(directory: Path) -> None:
    """Make a folder's entries (new files, a rename) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (weights files can be tens of GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(directory: Path, *, hashes: bool = True) -> str | None:
    """What is wrong with a checkpoint by its manifest, or None when it is complete.

    Args:
        directory: A checkpoint folder.
        hashes: Also compare SHA-256 digests (reads every byte); False checks presence and sizes only.

    A checkpoint without ``manifest.json`` (written before apex had manifests) cannot be checked and counts as
    complete when it has ``meta.json``.
    """
    if not (directory / "meta.json").is_file():
        return "meta.json is missing"
    if not (directory / MANIFEST).is_file():
        return None
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, its manifest says {expected['bytes']} (truncated?)"
        if hashes and file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 in {MANIFEST} (corrupted)"
    return None


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


def latest_checkpoint(run_dir: Path, on_skip: Callable[[Path, str], None] | None = None) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` (``final/`` included), or None.

    Checkpoints are tried from the highest step down; one that does not match its manifest is passed to
    ``on_skip(path, problem)`` and the one before it is tried.
    """
    candidates = [p for p in (run_dir / "checkpoints").glob(f"{STEP_PREFIX}*") if p.is_dir()]
    if (run_dir / FINAL).is_dir():
        candidates.append(run_dir / FINAL)
    for directory in sorted(candidates, key=_step_of, reverse=True):
        problem = checkpoint_problem(directory)
        if problem is None:
            return directory
        if on_skip is not None:
            on_skip(directory, problem)
    return None


def _step_of(directory: Path) -> float:
    """The step of a checkpoint, from its name (``step_0000100``) or its meta.json; unreadable ones sort first."""
    if directory.name.startswith(STEP_PREFIX) and directory.name[len(STEP_PREFIX) :].isdigit():
        return int(directory.name[len(STEP_PREFIX) :])
    try:
        return int(json.loads((directory / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf  # tried first, so that its problem is reported


def rotate_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete the periodic checkpoints (``checkpoints/step_*``) older than the newest ``keep_last`` complete ones.

    Only complete checkpoints (by their manifest's file sizes) count towards ``keep_last``, so the newest complete
    checkpoint is never deleted; incomplete ones newer than the kept ones are left alone. ``final/`` is never touched.

    Returns:
        The deleted folders.
    """
    kept, deleted = 0, []
    for directory in sorted((run_dir / "checkpoints").glob(f"{STEP_PREFIX}*"), key=_step_of, reverse=True):
        if kept >= keep_last:
            shutil.rmtree(directory)
            deleted.append(directory)
        elif checkpoint_problem(directory, hashes=False) is None:
            kept += 1
    return deleted


def remove_staging(run_dir: Path) -> None:
    """Delete the half-written temporary folders a killed run may have left in ``checkpoints/`` and the run dir."""
    for parent in (run_dir / "checkpoints", run_dir):
        for leftover in parent.glob(".*.tmp"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)


def load_training_state(directory: Path) -> dict[str, Any]:
    """The optimizer / scheduler / RNG state of a checkpoint written by a run (not by an export)."""
    path = directory / "training_state.pt"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no training_state.pt, so it cannot be resumed")
    return torch.load(path, map_location="cpu", weights_only=True)
