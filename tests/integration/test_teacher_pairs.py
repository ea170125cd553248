"""method.regression_pairs in a real run: the teacher generates the pool once, the run dir keeps it, a resumed run
reads it back instead of regenerating it from trained weights."""

from __future__ import annotations

import io
import json

import torch
from rich.console import Console

from apex_cli.config import load_recipe
from apex_cli.train import loop
from apex_cli.train.loop import run_distillation
from apex_cli.train.pairs import FILENAME, TeacherPairs


def _recipe(out, steps):
    return load_recipe(
        "shapes-apex-cpu",
        [
            f"output.dir={out}",
            "output.evaluate=false",
            f"train.steps={steps}",
            "train.batch_size=8",
            "train.checkpoint_every=1",
            "method.regression_pairs=6",
            "method.regression_nfe=2",
            "method.regression_guidance=2",
            "hardware.num_threads=1",
        ],
    )


def test_the_teacher_pairs_are_generated_once_and_a_resumed_run_reads_them(tmp_path, monkeypatch):
    out = tmp_path / "run"
    printed = io.StringIO()
    run_distillation(_recipe(out, 2), console=Console(file=printed, width=400))
    assert "teacher pairs: 6/6" in printed.getvalue()  # without a live bar, progress comes as plain lines
    assert f"written to {out / FILENAME}" in printed.getvalue()
    pool = TeacherPairs.load(out / FILENAME, torch.device("cpu"))
    assert len(pool) == 6 and pool.x.shape == (6, 3, 32, 32)
    assert set(pool.cond) == {"embeds", "mask"}
    assert torch.isfinite(pool.x).all() and not torch.equal(pool.x, pool.z)
    before = (out / FILENAME).read_bytes()

    def regenerate(*args, **kwargs):
        raise AssertionError("a resumed run regenerated its teacher pairs")

    monkeypatch.setattr(loop, "generate_pairs", regenerate)
    run_distillation(_recipe(out, 3), resume=True)
    assert (out / FILENAME).read_bytes() == before
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_an_overwritten_run_makes_its_own_pool(tmp_path):
    out = tmp_path / "run"
    run_distillation(_recipe(out, 1))
    first = TeacherPairs.load(out / FILENAME, torch.device("cpu"))
    run_distillation(load_recipe(str(out / "config.yaml"), ["method.regression_guidance=0"]), overwrite=True)
    again = TeacherPairs.load(out / FILENAME, torch.device("cpu"))
    torch.testing.assert_close(again.z, first.z)  # the same seeded noises ...
    assert not torch.allclose(again.x, first.x)  # ... integrated without guidance: not the old pool reused


def test_resuming_without_the_pool_regenerates_it_from_the_frozen_teacher(tmp_path):
    out = tmp_path / "run"
    run_distillation(_recipe(out, 2))
    first = TeacherPairs.load(out / FILENAME, torch.device("cpu"))
    (out / FILENAME).unlink()
    run_distillation(_recipe(out, 3), resume=True)
    again = TeacherPairs.load(out / FILENAME, torch.device("cpu"))
    torch.testing.assert_close(again.x, first.x)  # the frozen teacher, not the trained student, made them
