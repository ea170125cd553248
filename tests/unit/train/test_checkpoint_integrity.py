"""Checkpoint integrity: the manifest catches damage, resume takes the newest complete one, rotation keeps it, and a
failing writer (a full disk) leaves every earlier checkpoint as it was."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from apex_cli.errors import CheckpointError
from apex_cli.train import checkpoint
from apex_cli.train.checkpoint import (
    MANIFEST,
    checkpoint_problem,
    latest_checkpoint,
    remove_staging,
    rotate_checkpoints,
    save_checkpoint,
)


def _save(run_dir: Path, step: int, name: str | None = None) -> Path:
    directory = run_dir / "checkpoints" / f"step_{step:07d}" if name is None else run_dir / name
    weights = {"model": {"w": torch.full((64,), float(step))}}
    return save_checkpoint(directory, "name: test\n", weights, {"step": step}, {"step": step})


def test_a_checkpoint_lists_every_file_with_its_size_and_sha256(tmp_path) -> None:
    directory = _save(tmp_path, 10)
    files = json.loads((directory / MANIFEST).read_text())["files"]
    assert set(files) == {"model.safetensors", "training_state.pt", "recipe.yaml", "meta.json"}
    assert files["recipe.yaml"]["bytes"] == len("name: test\n")
    assert files["model.safetensors"]["sha256"] == checkpoint.file_sha256(directory / "model.safetensors")
    assert checkpoint_problem(directory) is None
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no staging left behind


def test_truncation_corruption_and_missing_files_are_named(tmp_path) -> None:
    directory = _save(tmp_path, 10)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "model.safetensors has" in checkpoint_problem(directory)
    assert "(truncated?)" in checkpoint_problem(directory)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert checkpoint_problem(directory) == "model.safetensors does not match its SHA-256 in manifest.json (corrupted)"
    assert checkpoint_problem(directory, hashes=False) is None  # the cheap check sees sizes only
    weights.write_bytes(data)
    (directory / "training_state.pt").unlink()
    assert checkpoint_problem(directory) == "training_state.pt is missing"
    (directory / MANIFEST).write_text("{")
    assert checkpoint_problem(directory) == "manifest.json is unreadable"


def test_a_checkpoint_from_before_manifests_is_accepted(tmp_path) -> None:
    directory = _save(tmp_path, 10)
    (directory / MANIFEST).unlink()
    assert checkpoint_problem(directory) is None
    (directory / "meta.json").unlink()
    assert checkpoint_problem(directory) == "meta.json is missing"


def test_latest_skips_a_damaged_checkpoint_and_names_it(tmp_path) -> None:
    for step in (10, 20, 30):
        _save(tmp_path, step)
    newest = tmp_path / "checkpoints" / "step_0000030"
    size = (newest / "model.safetensors").stat().st_size
    (newest / "model.safetensors").write_bytes(b"cut")
    skipped: list[tuple[Path, str]] = []
    assert latest_checkpoint(tmp_path, on_skip=lambda path, problem: skipped.append((path, problem))) == (
        tmp_path / "checkpoints" / "step_0000020"
    )
    assert skipped == [(newest, f"model.safetensors has 3 bytes, its manifest says {size} (truncated?)")]


def test_latest_orders_by_step_and_counts_final(tmp_path) -> None:
    _save(tmp_path, 9)
    _save(tmp_path, 10)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_0000010"
    _save(tmp_path, 12, "final")
    assert latest_checkpoint(tmp_path) == tmp_path / "final"
    _save(tmp_path, 30)  # a resumed run with more steps passed the old final
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_0000030"
    assert latest_checkpoint(tmp_path / "empty") is None


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path) -> None:
    for step in (10, 20, 30, 40):
        _save(tmp_path, step)
    (tmp_path / "checkpoints" / "step_0000040" / "model.safetensors").write_bytes(b"cut")  # newest, damaged
    deleted = rotate_checkpoints(tmp_path, keep_last=1)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # step 30 is the newest complete one: kept; the damaged newer one is not deleted either.
    assert left == ["step_0000030", "step_0000040"]
    assert sorted(p.name for p in deleted) == ["step_0000010", "step_0000020"]
    _save(tmp_path, 12, "final")
    rotate_checkpoints(tmp_path, keep_last=1)
    assert (tmp_path / "final").is_dir()


@pytest.mark.parametrize(
    ("writer", "error"),
    [
        ("save_file", OSError(errno.ENOSPC, "No space left on device")),
        ("torch.save", RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")),
    ],
)
def test_a_failing_writer_leaves_earlier_checkpoints_intact(tmp_path, monkeypatch, writer, error) -> None:
    previous = _save(tmp_path, 10)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}

    def fail(*_args, **_kwargs):
        raise error

    if writer == "save_file":
        monkeypatch.setattr(checkpoint, "save_file", fail)
    else:
        monkeypatch.setattr(checkpoint.torch, "save", fail)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step_0000020: ") as info:
        _save(tmp_path, 20)
    assert "earlier checkpoints are untouched" in str(info.value) and "--resume" in info.value.hint
    if writer == "save_file":
        assert "No space left on device (" in str(info.value)
    assert not (tmp_path / "checkpoints" / "step_0000020").exists()
    assert not list((tmp_path / "checkpoints").glob(".*"))  # the staging folder is gone
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert latest_checkpoint(tmp_path) == previous


def test_a_failing_writer_does_not_replace_final(tmp_path, monkeypatch) -> None:
    final = _save(tmp_path, 10, "final")
    monkeypatch.setattr(checkpoint, "save_file", lambda *_a, **_k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "x")))
    with pytest.raises(CheckpointError):
        _save(tmp_path, 20, "final")
    assert checkpoint_problem(final) is None
    assert json.loads((final / "meta.json").read_text())["step"] == 10


def test_staging_left_by_a_killed_save_is_removed(tmp_path) -> None:
    _save(tmp_path, 10)
    leftover = tmp_path / "checkpoints" / ".step_0000020.abc123.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".final.xyz.tmp").mkdir()
    remove_staging(tmp_path)
    assert not leftover.exists() and not (tmp_path / ".final.xyz.tmp").exists()
    assert (tmp_path / "checkpoints" / "step_0000010").is_dir()
