"""The `apex` CLI through Typer's CliRunner: help, dry runs, the error path, and a tiny real run."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from apex_cli.cli.app import app


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, *args, env=None):
    return runner.invoke(app, list(args), env=env)


def test_help_lists_the_commands_and_each_shows_an_example(runner):
    result = invoke(runner, "--help")
    assert result.exit_code == 0
    assert "distill" in result.stdout and "recipes" in result.stdout
    assert "eval" in result.stdout
    for command in (["distill"], ["recipes", "list"], ["recipes", "show"], ["eval", "geneval"], ["eval", "fid"]):
        help_text = invoke(runner, *command, "--help").stdout
        example = help_text[help_text.index("Example") :]  # the usage line alone must not satisfy this
        assert "apex " + " ".join(command) + " " in example, command


def test_recipes_list_and_show(runner):
    listed = invoke(runner, "recipes", "list")
    assert listed.exit_code == 0
    assert "toy2d-apex" in listed.stdout and "toy2d-teacher" in listed.stdout
    shown = invoke(runner, "recipes", "show", "toy2d-apex")
    assert shown.exit_code == 0
    assert "# The 2-D proof" in shown.stdout  # comments are kept, to copy and edit
    assert yaml.safe_load(shown.stdout)["name"] == "toy2d-apex"


def test_dry_run_prints_the_resolved_recipe_and_writes_nothing(runner, tmp_path):
    result = invoke(
        runner,
        "distill",
        "--recipe",
        "toy2d-apex",
        "--set",
        "train.lr=3e-5",
        "--set",
        f"output.dir={tmp_path / 'run'}",
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["lr"] == 3e-5
    assert resolved["method"]["estimate_order"] == 2  # defaults are spelled out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "train.lr=-1"], "train.lr: Input should be greater than 0"),
        (["--set", "train.learning_rate=1"], "train.learning_rate: unknown key"),
        (["--set", "sampler.nfe=0"], "sampler.nfe: Input should be greater than or equal to 1"),
    ],
)
def test_bad_values_exit_1_with_one_line_naming_the_field(runner, args, fragment):
    result = invoke(runner, "distill", "--recipe", "toy2d-apex", *args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Error:") and fragment in lines[0]
    assert lines[1].startswith("Hint:")
    assert "Traceback" not in result.output


def test_missing_recipe_file_exits_1(runner):
    result = invoke(runner, "distill", "--recipe", "does/not/exist.yaml")
    assert result.exit_code == 1
    assert "recipe 'does/not/exist.yaml' not found" in result.stderr
    assert "Traceback" not in result.output


def test_apex_debug_shows_the_traceback(runner):
    result = invoke(runner, "distill", "--recipe", "nope", env={"APEX_DEBUG": "1"})
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "RecipeError"


def test_missing_teacher_without_init_recipe_is_a_user_error(runner, tmp_path):
    result = invoke(
        runner,
        "distill",
        "--recipe",
        "toy2d-apex",
        "--set",
        f"model.init={tmp_path / 'none'}",
        "--set",
        "model.init_recipe=null",
        "--set",
        f"output.dir={tmp_path / 'run'}",
    )
    assert result.exit_code == 1
    assert f"model.init: {tmp_path / 'none'} does not exist" in result.stderr


TINY = [
    "--set",
    "train.steps=30",
    "--set",
    "output.eval_samples=200",
    "--set",
    "model.hidden_dim=32",
    "--set",
    "train.batch_size=32",
    "--set",
    "hardware.num_threads=1",
]


def test_tiny_teacher_then_student_end_to_end(runner, tmp_path):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    teacher = invoke(runner, "distill", "--recipe", "toy2d-teacher", *TINY, "--set", f"output.dir={teacher_dir}")
    assert teacher.exit_code == 0, teacher.output
    student = invoke(
        runner,
        "distill",
        "--recipe",
        "toy2d-apex",
        *TINY,
        "--set",
        f"model.init={teacher_dir}",
        "--set",
        f"output.dir={student_dir}",
    )
    assert student.exit_code == 0, student.output
    for name in (
        "config.yaml",
        "metrics.json",
        "metrics.jsonl",
        "scatter.png",
        "final/model.safetensors",
        "final/ema.safetensors",
        "final/recipe.yaml",
        "final/meta.json",
    ):
        assert (student_dir / name).is_file(), name
    assert yaml.safe_load((student_dir / "config.yaml").read_text())["model"]["init"] == str(teacher_dir)
    assert json.loads((student_dir / "final/meta.json").read_text())["kind"] == "student"
    metrics = json.loads((student_dir / "metrics.json").read_text())
    assert set(metrics["energy_distance"]) == {"teacher_50", "teacher_1", "student_1", "student_2", "student_4"}
    log = [json.loads(line) for line in (student_dir / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30 and {"main", "fake", "adversarial", "total", "grad_norm", "lr"} <= set(log[-1])
    assert "scatter:" in student.stdout

    # A finished run is not overwritten by accident ...
    again = invoke(
        runner,
        "distill",
        "--recipe",
        "toy2d-apex",
        *TINY,
        "--set",
        f"model.init={teacher_dir}",
        "--set",
        f"output.dir={student_dir}",
    )
    assert again.exit_code == 1 and "already holds a finished run" in again.stderr
    # ... and a teacher trained on other data is refused with the differing field.
    mismatch = invoke(
        runner,
        "distill",
        "--recipe",
        "toy2d-apex",
        *TINY,
        "--set",
        f"model.init={teacher_dir}",
        "--set",
        "data.mode_std=0.5",
        "--set",
        f"output.dir={tmp_path / 'other'}",
    )
    assert mismatch.exit_code == 1
    assert "data.mode_std: 0.25 vs 0.5" in mismatch.stderr
