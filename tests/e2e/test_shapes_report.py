"""The shapes end-of-run report through `apex distill`: one table of GenEval-shapes, FID and speed per sample set."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from apex_cli.cli.app import app
from apex_cli.config import load_recipe
from apex_cli.data.shapes import TASKS
from apex_cli.train import shapes as report

TINY = [
    "train.steps=2",
    "train.batch_size=4",
    "train.checkpoint_every=0",
    "model.block_out_channels=[16, 32]",
    "model.attention_heads=2",
    "model.cross_attention_dim=32",
    "model.norm_num_groups=8",
    "hardware.precision=fp32",
]


def _distill(recipe: str, run_dir, *overrides: str):
    args = ["distill", "--recipe", recipe, "--set", f"output.dir={run_dir}"]
    for item in (*TINY, *overrides):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    patch = pytest.MonkeyPatch()  # a small report: 6 prompts x 1 image, FID against 200 renderer images
    patch.setenv("APEX_CACHE_DIR", str(root / "cache"))
    patch.setenv("COLUMNS", "200")
    patch.setattr(report, "REPORT_COUNTS", dict.fromkeys(TASKS, 1))
    patch.setattr(report, "REPORT_IMAGES_PER_PROMPT", 1)
    patch.setattr(report, "REPORT_FID_REFERENCE", 200)
    teacher = _distill("shapes-teacher-cpu", root / "teacher")
    student = _distill("shapes-apex-cpu", root / "student", f"model.init={root / 'teacher'}")
    yield root, teacher, student
    patch.undo()


def test_teacher_report_has_the_renderer_and_the_teacher_at_50_4_1_steps(runs) -> None:
    root, result, _ = runs
    metrics = json.loads((root / "teacher" / "metrics.json").read_text())
    sets = metrics["geneval"]
    assert list(sets) == ["renderer", "teacher_50", "teacher_4", "teacher_1"]
    assert sets["renderer"]["overall"] == 1.0 and sets["renderer"]["images_per_second"] is None
    for name in ("teacher_50", "teacher_4", "teacher_1"):
        assert 0.0 <= sets[name]["overall"] <= 1.0
        assert set(sets[name]["tasks"]) == set(TASKS)
        assert sets[name]["fid"] > sets["renderer"]["fid"]  # two training steps are far from the renderer
        assert sets[name]["images_per_second"] > 0
    assert metrics["suite"] == "GenEval-shapes, 6 prompts x 1 images"
    assert len(list((root / "teacher" / "geneval" / "teacher_50").glob("*/samples/*.png"))) == 6
    assert "renderer: the scene renderer itself, the ceiling" in result.stdout
    assert re.search(r"teacher +50 ", result.stdout) and "student" not in result.stdout


def test_student_report_adds_nfe_1_2_4_and_a_grid_of_teacher_and_student(runs) -> None:
    root, _, result = runs
    metrics = json.loads((root / "student" / "metrics.json").read_text())
    assert list(metrics["geneval"]) == [
        "renderer",
        "teacher_50",
        "teacher_4",
        "teacher_1",
        "student_1",
        "student_2",
        "student_4",
    ]
    for row in (r"student +1 ", r"student +4 ", "img/s", "FID"):
        assert re.search(row, result.stdout), row
    grid = np.asarray(Image.open(root / "student" / "samples.png"))
    assert grid.shape == (len(TASKS) * 32, 3 * 4 * 32, 3)  # a row per task; teacher 50, teacher 1, student 1


def test_a_student_report_reuses_the_teacher_rows_stored_beside_its_weights(runs) -> None:
    root, _, _ = runs
    cache = report.write_teacher_report(root / "teacher")
    assert cache == root / "teacher" / "final" / report.TEACHER_REPORT_CACHE
    result = _distill("shapes-apex-cpu", root / "student-cached", f"model.init={root / 'teacher'}")
    fresh = json.loads((root / "student" / "metrics.json").read_text())["geneval"]
    reused = json.loads((root / "student-cached" / "metrics.json").read_text())["geneval"]
    for name in ("teacher_50", "teacher_4", "teacher_1"):
        assert reused[name]["cached"] == str(cache)
        # The stored rows are what a fresh measurement gives (the timing aside).
        assert (reused[name]["overall"], reused[name]["tasks"], reused[name]["fid"]) == (
            fresh[name]["overall"],
            fresh[name]["tasks"],
            fresh[name]["fid"],
        )
        assert not (root / "student-cached" / "geneval" / name).exists()  # not sampled again
    assert re.search(r"teacher +50 \* ", result.stdout) and "measured when the teacher was shipped" in result.stdout
    assert (root / "student-cached" / "samples.png").is_file()  # the grid still shows teacher samples


def test_stored_teacher_rows_are_ignored_when_their_key_differs(runs) -> None:
    root, _, _ = runs
    cache = report.write_teacher_report(root / "teacher")
    task = report.ShapesTask(load_recipe("shapes-apex-cpu", [f"model.init={root / 'teacher'}"]))
    guidance = task.teacher_guidance()
    assert set(task.cached_teacher_rows(guidance)) == {"teacher_50", "teacher_4", "teacher_1"}
    assert task.cached_teacher_rows(guidance + 1.0) == {}  # other guidance
    stored = json.loads(cache.read_text())
    stored["key"]["weights_sha256"] = "0" * 64  # other weights
    cache.write_text(json.dumps(stored))
    assert task.cached_teacher_rows(guidance) == {}
