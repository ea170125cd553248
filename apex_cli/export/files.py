"""Writing a folder atomically: fill a temporary sibling, fsync it, rename it into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from apex_cli.errors import DataError


def occupied(out: Path) -> bool:
    """Whether ``out`` exists as a file or a non-empty folder."""
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def staging_folder(out: Path, what: str) -> Path:
    """A fresh temporary sibling of ``out`` (``.<name>.<random>.tmp``), its parents created.

    Raises:
        DataError: The parent of ``out`` cannot be created or written (the message says ``what`` was to be written).
    """
    existing = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    if not existing.is_dir():
        raise DataError(
            f"cannot write {what} to {out}: {existing} is a file, not a folder", hint="choose another --out folder"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as err:
        raise DataError(
            f"cannot write {what} to {out}: {err.strerror or err}", hint="choose an --out folder you can write to"
        ) from None


def publish(staging: Path, out: Path, sync: bool = True) -> None:
    """Rename ``staging`` to ``out`` (a folder already there is swapped out, then deleted).

    With ``sync`` every file is fsynced first and the rename after, so that a power cut cannot leave a complete-looking
    folder with empty files; sample images, which their seeds reproduce, skip that cost.
    """
    if sync:
        for path in [*staging.rglob("*"), staging]:
            _fsync(path)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
    if sync:
        _fsync(out.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
