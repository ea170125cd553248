"""The 2-D proof of issue 2, with the built-in recipes as they ship (teacher + APEX, a few minutes on 2 cores)."""

import pytest

from apex_cli.config import load_recipe
from apex_cli.train.loop import run_distillation


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "max_ratio", "max_distance"),
    [("toy2d-apex", 0.2, 0.03), ("toy2d-apex-grid", 0.1, None)],
)
def test_one_step_apex_student_beats_its_teacher_at_one_step(tmp_path, recipe, max_ratio, max_distance):
    overrides = [f"model.init={tmp_path / 'teacher'}", f"output.dir={tmp_path / 'student'}"]
    result = run_distillation(load_recipe(recipe, overrides))
    distance = result.metrics["energy_distance"]
    print(f"{recipe}: floor {result.metrics['floor']:.4f}, " + ", ".join(f"{k} {v:.4f}" for k, v in distance.items()))
    assert distance["teacher_50"] < 0.25 * distance["teacher_1"]  # the teacher itself is good at 50 steps
    assert distance["student_1"] <= max_ratio * distance["teacher_1"]
    if max_distance is not None:
        assert distance["student_1"] <= max_distance
