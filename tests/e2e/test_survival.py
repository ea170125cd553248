"""Runs that survive: kill -9 and resume, damaged checkpoints, a full disk, non-finite steps and a collapsed student.

The 2-D runs are tiny toy2d students; the kill -9 and collapse tests distil a tiny shapes teacher (one step of
training is enough: only the mechanics are under test).
"""

from __future__ import annotations

import errno
import io
import itertools
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from apex_cli.cli.app import app
from apex_cli.config import load_recipe
from apex_cli.core.objective import LossOutput
from apex_cli.models.shapes import ShapesModel
from apex_cli.train import checkpoint, loop
from apex_cli.train.checkpoint import checkpoint_problem
from apex_cli.train.loop import run_distillation

TOY = ["model.hidden_dim=32", "train.batch_size=16", "output.evaluate=false", "hardware.num_threads=1"]


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy-teacher") / "run"
    run_distillation(load_recipe("toy2d-teacher", [*TOY, "train.steps=20", f"output.dir={path}"]))
    return path


def _toy_args(teacher: Path, out: Path, *overrides: str) -> list[str]:
    items = [*TOY, f"model.init={teacher}", f"output.dir={out}", "train.checkpoint_every=10", *overrides]
    return [arg for item in items for arg in ("--set", item)]


def _distill(*args: str):
    return CliRunner().invoke(app, ["distill", "--recipe", "toy2d-apex", *args], env={"COLUMNS": "400"})


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> bool:
    for name in ("model", "ema"):
        first, second = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        if first.keys() != second.keys() or not all(torch.equal(first[k], second[k]) for k in first):
            return False
    return True


def _nan_loss_at(monkeypatch, steps) -> None:
    """Make the objective's total NaN on the given (1-based) calls, i.e. training steps of a fresh run."""
    real, calls = loop.apex_loss, itertools.count(1)

    def apex_loss(*args, **kwargs) -> LossOutput:
        out = real(*args, **kwargs)
        if next(calls) not in steps:
            return out
        total = out.total * float("nan")
        return LossOutput(total=total, terms={**out.terms, "total": total.detach()}, generated=out.generated)

    monkeypatch.setattr(loop, "apex_loss", apex_loss)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite steps


def test_an_injected_nan_step_is_skipped_and_logged(toy_teacher, tmp_path, monkeypatch) -> None:
    _nan_loss_at(monkeypatch, {5})
    result = _distill(*_toy_args(toy_teacher, tmp_path / "run", "train.steps=12"))
    assert result.exit_code == 0, result.output
    assert "step 5: non-finite loss, step skipped (weights unchanged)" in result.stderr
    log = _log(tmp_path / "run")
    assert [r["step"] for r in log] == list(range(1, 13))  # every step logged, once
    assert log[4]["skipped"] == "non-finite loss" and log[4]["total"] is None and log[4]["nonfinite_steps"] == 1
    assert all("skipped" not in r for r in log if r["step"] != 5)
    state = torch.load(tmp_path / "run" / "final" / "training_state.pt", weights_only=True)
    assert state["nonfinite_steps"] == 1
    assert all(s["step"].item() == 11 for s in state["optimizer"]["state"].values())  # 12 steps, 11 updates
    weights = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_at_every_step_stops_after_k_with_causes_and_fields(toy_teacher, tmp_path, monkeypatch) -> None:
    _nan_loss_at(monkeypatch, range(1, 1000))
    result = _distill(*_toy_args(toy_teacher, tmp_path / "run", "train.steps=50", "train.max_nonfinite_steps=3"))
    assert result.exit_code == 1
    error = _error_line(result)
    assert "3 steps in a row (steps 1 to 3) had a non-finite loss or gradient, so the run stopped" in error
    assert "train.lr=0.0003" in error and "train.grad_clip=1" in error and "hardware.precision=fp32" in error
    assert "Hint: lower train.lr (e.g. --set train.lr=3e-05)" in result.stderr
    assert [r["skipped"] for r in _log(tmp_path / "run")] == ["non-finite loss"] * 3


# ---------------------------------------------------------------------------------------------------------------
# Damaged checkpoints, a full disk, rotation


def test_a_truncated_checkpoint_is_skipped_and_the_previous_one_resumed_exactly(toy_teacher, tmp_path) -> None:
    assert _distill(*_toy_args(toy_teacher, tmp_path / "whole", "train.steps=30")).exit_code == 0
    assert _distill(*_toy_args(toy_teacher, tmp_path / "parts", "train.steps=30")).exit_code == 0
    # Take the run back to step 20 (as if killed after the step-20 checkpoint), then damage that checkpoint.
    parts = tmp_path / "parts"
    shutil.rmtree(parts / "final")
    damaged = parts / "checkpoints" / "step_0000020" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    # An explicit --resume-from of the damaged one is refused, naming it.
    refused = _distill(
        *_toy_args(toy_teacher, tmp_path / "parts", "train.steps=30"), "--resume-from", str(damaged.parent)
    )
    assert refused.exit_code == 1
    assert f"checkpoint {damaged.parent} is incomplete or corrupt: model.safetensors has 100 bytes" in _error_line(
        refused
    )
    # --resume alone skips it, naming it, and takes the one before.
    result = _distill(*_toy_args(toy_teacher, parts, "train.steps=30"), "--resume")
    assert result.exit_code == 0, result.output
    assert f"skipping checkpoint {damaged.parent}: model.safetensors has 100 bytes" in result.stderr
    assert f"Resuming from {parts / 'checkpoints' / 'step_0000010'} (step 10)" in result.stderr
    assert _same_weights(tmp_path / "whole" / "final", parts / "final")


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_exits_1(toy_teacher, tmp_path, monkeypatch):
    real = checkpoint.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if "step_0000020" in filename:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    run_dir = tmp_path / "run"
    result = _distill(*_toy_args(toy_teacher, run_dir, "train.steps=30"))
    assert result.exit_code == 1
    error = _error_line(result)
    assert f"cannot write checkpoint {run_dir / 'checkpoints' / 'step_0000020'}: No space left on device" in error
    assert "earlier checkpoints are untouched" in error
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000010"]  # no staging left
    assert checkpoint_problem(run_dir / "checkpoints" / "step_0000010") is None
    monkeypatch.setattr(checkpoint, "save_file", real)  # space freed: the run resumes from there
    resumed = _distill(*_toy_args(toy_teacher, run_dir, "train.steps=30"), "--resume")
    assert resumed.exit_code == 0 and "(step 10)" in resumed.stderr


def test_keep_last_rotates_periodic_checkpoints(toy_teacher, tmp_path) -> None:
    result = _distill(*_toy_args(toy_teacher, tmp_path / "run", "train.steps=50", "train.keep_last=2"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000030", "step_0000040"]
    assert (tmp_path / "run" / "final" / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# kill -9 and the collapse monitor, on the shapes model


def _shapes_student(tiny: list[str], teacher: Path, out: Path, *overrides: str) -> list[str]:
    return [
        *tiny,
        f"model.init={teacher}",
        f"output.dir={out}",
        "train.steps=8",
        "train.checkpoint_every=2",
        *overrides,
    ]


def test_kill_9_at_a_random_step_then_resume_equals_an_uninterrupted_run(
    tiny_shapes, tiny_shapes_teacher, tmp_path
) -> None:
    every, steps = 2, 8
    target = random.SystemRandom().randint(every + 1, steps - 2)  # a step after the first checkpoint
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "apex_cli", "distill", "--recipe", "shapes-apex-cpu"]
    command += [arg for item in _shapes_student(tiny_shapes, tiny_shapes_teacher, killed) for arg in ("--set", item)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last_logged, deadline = 0, time.monotonic() + 120
    try:
        while last_logged < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            if (killed / "metrics.jsonl").is_file():
                lines = (killed / "metrics.jsonl").read_text().splitlines()
                last_logged = json.loads(lines[-1])["step"] if lines else 0
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before step {target}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists()

    console = io.StringIO()
    recipe = load_recipe("shapes-apex-cpu", _shapes_student(tiny_shapes, tiny_shapes_teacher, killed))
    run_distillation(recipe, resume=True, console=Console(file=console, width=300))
    resumed_at = int(console.getvalue().split("(step ")[1].split(")")[0])
    assert 0 <= last_logged - resumed_at <= every, (target, last_logged, resumed_at)  # only steps since it repeat
    assert [r["step"] for r in _log(killed)] == list(range(1, steps + 1))  # each step logged once

    whole = tmp_path / "whole"
    run_distillation(load_recipe("shapes-apex-cpu", _shapes_student(tiny_shapes, tiny_shapes_teacher, whole)))
    assert _same_weights(whole / "final", killed / "final"), f"killed after step {last_logged}"
    assert all("warning" not in r for r in _log(whole))  # a healthy student raises no collapse warning


def test_a_student_forced_to_a_constant_image_triggers_the_collapse_warning(
    tiny_shapes, tiny_shapes_teacher, tmp_path, monkeypatch
):
    real = ShapesModel.velocity

    def constant(self, x_t, t, r, cond):  # x_hat = x_t - t F = 0.3 everywhere, whatever the noise or prompt
        return 0 * real(self, x_t, t, r, cond) + (x_t - 0.3) / t.clamp_min(1e-3).view(-1, 1, 1, 1)

    monkeypatch.setattr(ShapesModel, "velocity", constant)
    console = io.StringIO()
    recipe = load_recipe(
        "shapes-apex-cpu",
        _shapes_student(
            tiny_shapes,
            tiny_shapes_teacher,
            tmp_path / "run",
            "train.steps=4",
            "train.checkpoint_every=0",
            "monitor.every=2",
        ),
    )
    run_distillation(recipe, console=Console(file=console, width=300))
    assert "one-step samples look collapsed at step 2" in console.getvalue()
    assert "100% near-constant images > monitor.max_constant_fraction 0.5" in console.getvalue()
    measured = [r for r in _log(tmp_path / "run") if "diversity" in r]
    assert [r["step"] for r in measured] == [2, 4]
    assert measured[0]["diversity"] == 0.0 and measured[0]["constant_fraction"] == 1.0
    assert measured[0]["warning"] == "collapse" and "warning" not in measured[1]  # once, not at every measurement
