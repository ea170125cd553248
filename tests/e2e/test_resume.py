"""Resuming a run from its checkpoint continues it exactly (same weights as an uninterrupted run, on CPU)."""

import pytest
from safetensors.torch import load_file

from apex_cli.config import load_recipe
from apex_cli.errors import CheckpointError
from apex_cli.train.loop import run_distillation

TINY = ["model.hidden_dim=32", "train.batch_size=16", "output.evaluate=false", "hardware.num_threads=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "run"
    run_distillation(load_recipe("toy2d-teacher", [*TINY, "train.steps=20", f"output.dir={path}"]))
    return path


def _student(teacher, out, steps, extra=()):
    return load_recipe(
        "toy2d-apex",
        [
            *TINY,
            f"model.init={teacher}",
            f"output.dir={out}",
            f"train.steps={steps}",
            "train.checkpoint_every=10",
            *extra,
        ],
    )


def test_resumed_run_equals_an_uninterrupted_one(teacher, tmp_path):
    run_distillation(_student(teacher, tmp_path / "whole", 30))
    run_distillation(_student(teacher, tmp_path / "parts", 20))
    run_distillation(_student(teacher, tmp_path / "parts", 30), resume=True)
    for name in ("model", "ema"):
        whole = load_file(str(tmp_path / "whole" / "final" / f"{name}.safetensors"))
        parts = load_file(str(tmp_path / "parts" / "final" / f"{name}.safetensors"))
        assert all((whole[k] == parts[k]).all() for k in whole), name  # bit-exact
    assert (tmp_path / "whole" / "checkpoints" / "step_0000010" / "training_state.pt").is_file()


def test_resume_refuses_a_changed_recipe_unless_forced(teacher, tmp_path):
    run_distillation(_student(teacher, tmp_path / "run", 20))
    changed = _student(teacher, tmp_path / "run", 30, ["train.lr=1e-3"])
    with pytest.raises(CheckpointError, match=r"different recipe: train.lr: 0.0003 -> 0.001"):
        run_distillation(changed, resume=True)
    run_distillation(changed, resume=True, force=True)


def test_resume_without_a_checkpoint_or_past_the_end(teacher, tmp_path):
    with pytest.raises(CheckpointError, match="has no checkpoint yet"):
        run_distillation(_student(teacher, tmp_path / "empty", 20), resume=True)
    run_distillation(_student(teacher, tmp_path / "done", 20))
    with pytest.raises(CheckpointError, match=r"is at step 20, the recipe stops at train\.steps=20"):
        run_distillation(_student(teacher, tmp_path / "done", 20), resume=True)


def test_sigterm_saves_a_checkpoint_and_exits_130(teacher, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["--recipe", "toy2d-apex", "--set", f"model.init={teacher}", "--set", "train.steps=100000"]
    args += [item for pair in zip(["--set"] * len(TINY), TINY, strict=True) for item in pair]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "apex_cli", "distill", *args, "--set", f"output.dir={tmp_path / 'run'}"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while not (log.is_file() and log.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGTERM after step" in stderr and "--resume" in stderr
    checkpoints = list((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "training_state.pt").is_file()
