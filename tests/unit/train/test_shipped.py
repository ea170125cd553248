"""``shipped:NAME`` names a checkpoint folder inside the package (apex_cli/weights/NAME)."""

from __future__ import annotations

import pytest

from apex_cli.errors import CheckpointError
from apex_cli.train import checkpoint


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    (folder / "tiny-teacher").mkdir(parents=True)
    (folder / "tiny-teacher" / "meta.json").write_text('{"kind": "teacher"}')
    (folder / "tiny-teacher" / "model.safetensors").write_bytes(b"")
    (folder / "not-a-checkpoint").mkdir()  # no meta.json: not listed
    monkeypatch.setattr(checkpoint, "SHIPPED_DIR", folder)
    return folder


def test_shipped_names_resolve_to_the_packaged_folder(shipped) -> None:
    assert checkpoint.shipped_checkpoints() == ["tiny-teacher"]
    assert checkpoint.resolve_checkpoint("shipped:tiny-teacher") == shipped / "tiny-teacher"


def test_an_unknown_shipped_name_lists_what_ships_and_how_to_train_one(shipped) -> None:
    with pytest.raises(CheckpointError, match="no shipped checkpoint named 'nope'") as info:
        checkpoint.resolve_checkpoint("shipped:nope")
    assert "shipped checkpoints: tiny-teacher" in info.value.hint
    assert "apex distill --recipe shapes-teacher-cpu" in info.value.hint


def test_other_paths_are_untouched(tmp_path) -> None:
    with pytest.raises(CheckpointError):
        checkpoint.resolve_checkpoint(tmp_path / "shipped:tiny-teacher")
