"""The teacher shipped inside apex (``shipped:shapes-teacher``): what its card promises is what the folder holds."""

import json

import pytest

from apex_cli.config import load_recipe
from apex_cli.eval.generate import generate
from apex_cli.train import shapes as report
from apex_cli.train.checkpoint import SHIPPED_DIR, read_checkpoint, shipped_checkpoints
from apex_cli.train.sampling import checkpoint_sampler
from apex_cli.train.tasks import load_checkpoint_model

FOLDER = SHIPPED_DIR / "shapes-teacher"
pytestmark = pytest.mark.skipif(not FOLDER.is_dir(), reason="no shipped teacher in this build")


def test_the_shipped_teacher_is_a_small_safetensors_teacher_with_a_card() -> None:
    assert "shapes-teacher" in shipped_checkpoints()
    assert (FOLDER / "model.safetensors").stat().st_size <= 25 * 2**20
    _, recipe, meta = read_checkpoint("shipped:shapes-teacher")
    assert meta["kind"] == "teacher" and recipe.train.steps == meta["step"]
    scores = json.loads((FOLDER / "scores.json").read_text())
    card = (FOLDER / "CARD.md").read_text()
    for nfe in (50, 4, 1):
        assert f"| {nfe} | {scores[f'NFE {nfe}']['overall']:.3f} |" in card  # the card prints the measured scores
    assert f"apex distill --recipe shapes-teacher-cpu --set train.steps={meta['step']}" in card


def test_the_recipe_reproduces_the_shipped_teacher() -> None:
    # Validated by today's schema, so fields added since (with defaults that keep the old behaviour) compare equal.
    shipped = load_recipe(str(FOLDER / "recipe.yaml")).model_dump(mode="json")
    recipe = load_recipe("shapes-teacher-cpu").model_dump(mode="json")
    for section in ("model", "data", "method", "sampler", "train"):
        assert recipe[section] == shipped[section], section


def test_the_stored_report_rows_belong_to_these_weights() -> None:
    """`make demo` reuses them instead of sampling the teacher at 50 guided steps: their key must match."""
    task = report.ShapesTask(load_recipe("shapes-apex-cpu"))
    rows = task.cached_teacher_rows(task.teacher_guidance())
    assert list(rows) == ["teacher_50", "teacher_4", "teacher_1"]
    assert rows["teacher_50"]["overall"] > rows["teacher_1"]["overall"]


def test_the_shipped_teacher_draws_what_it_is_asked_for() -> None:
    model, recipe, meta = load_checkpoint_model("shipped:shapes-teacher")
    images = generate(model, ["a photo of a red circle"] * 4, [0, 1, 2, 3], checkpoint_sampler(recipe, meta, 50))
    red = [int(((im[..., 0] > 150) & (im[..., 1] < 90) & (im[..., 2] < 90)).sum()) for im in images]
    assert sum(count >= 20 for count in red) >= 3, red  # a red shape of at least 20 pixels, in 3 of 4 samples
