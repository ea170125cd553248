"""`apex distill` with the DMD2 baseline (a separate fake score) and with a wall-clock budget: short tiny-shapes runs
that checkpoint and resume exactly."""

import json
from pathlib import Path

from safetensors.torch import load_file
from typer.testing import CliRunner

from apex_cli.cli.app import app

RECIPES = Path(__file__).parents[2] / "recipes"


def _distill(recipe, overrides, *flags):
    args = ["distill", "--recipe", str(RECIPES / f"{recipe}.yaml"), *flags]
    for item in overrides:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _dmd2(tiny_shapes, teacher, out, steps):
    return [
        *tiny_shapes,
        f"model.init={teacher}",
        f"output.dir={out}",
        f"train.steps={steps}",
        "train.checkpoint_every=2",
        "method.fake_score.updates=2",
    ]


def test_dmd2_trains_its_fake_score_and_resumes_exactly(tiny_shapes, tiny_shapes_teacher, tmp_path):
    _distill("shapes-dmd2-cpu", _dmd2(tiny_shapes, tiny_shapes_teacher, tmp_path / "whole", 3))
    _distill("shapes-dmd2-cpu", _dmd2(tiny_shapes, tiny_shapes_teacher, tmp_path / "parts", 2))
    _distill("shapes-dmd2-cpu", _dmd2(tiny_shapes, tiny_shapes_teacher, tmp_path / "parts", 3), "--resume")
    final = tmp_path / "whole" / "final"
    teacher = load_file(str(tiny_shapes_teacher / "final" / "ema.safetensors"))
    fake = load_file(str(final / "fake_score.safetensors"))
    unet = [k for k in teacher if "class_embedding" not in k]  # (E4a's Emb2 is set from Emb1 when the run starts)
    assert sum(not (fake[k] == teacher[k]).all() for k in unet) > len(unet) // 2  # the fake score trained
    for name in ("model", "ema", "fake_score"):
        whole = load_file(str(final / f"{name}.safetensors"))
        parts = load_file(str(tmp_path / "parts" / "final" / f"{name}.safetensors"))
        assert all((whole[k] == parts[k]).all() for k in whole), name  # bit-exact after resuming at step 2
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["fake_score"] is not None and r["adversarial"] is not None for r in records)
    manifest = json.loads((final / "manifest.json").read_text())["files"]
    assert "fake_score.safetensors" in manifest


def test_max_minutes_stops_cleanly_with_a_final_checkpoint_that_resumes(tiny_shapes, tiny_shapes_teacher, tmp_path):
    run = tmp_path / "run"
    overrides = [*tiny_shapes, f"model.init={tiny_shapes_teacher}", f"output.dir={run}", "train.steps=50"]
    result = _distill("shapes-apex-cpu", [*overrides, "train.max_minutes=1e-6"])
    assert "spent after step 1" in result.output
    assert json.loads((run / "final" / "meta.json").read_text())["step"] == 1
    assert json.loads((run / "metrics.json").read_text())["train_seconds"] < 60
    _distill("shapes-apex-cpu", [*overrides, "train.max_minutes=1e-6"], "--resume")  # one more step, from final/
    assert json.loads((run / "final" / "meta.json").read_text())["step"] == 2
