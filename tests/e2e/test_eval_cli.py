"""`apex eval geneval | fid` through the CLI on folders rendered by the shapes world."""

import json

import pytest
from typer.testing import CliRunner

from apex_cli.cli.app import app
from apex_cli.data.shapes import QUICK_COUNTS, prompt_suite, render_prompt
from apex_cli.eval.geneval import generate_images, one_prompt_at_a_time


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The quick shapes suite (60 prompts x 2 images) rendered by the renderer itself."""
    folder = tmp_path_factory.mktemp("geneval")
    rows = prompt_suite(seed=0, counts=QUICK_COUNTS)
    render = one_prompt_at_a_time(lambda prompt, seeds: [render_prompt(prompt, s) for s in seeds])
    generate_images(rows, folder, render, images_per_prompt=2)
    return folder


@pytest.fixture
def runner():
    return CliRunner()


def test_geneval_scores_the_renderers_own_images_perfectly(runner, rendered, tmp_path):
    results = tmp_path / "results.jsonl"
    result = runner.invoke(app, ["eval", "geneval", "--images", str(rendered), "--results", str(results), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["scores"]["images"]
    assert summary["overall"] == 1.0
    assert set(summary["tasks"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert summary["total_images"] == 120
    assert len(results.read_text().splitlines()) == 120


def test_geneval_table_output(runner, rendered, tmp_path):
    result = runner.invoke(app, ["eval", "geneval", "--images", str(rendered), "--results", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 0, result.output
    assert "overall (mean of tasks)" in result.stdout and "1.00000" in result.stdout


def test_geneval_missing_folder_and_missing_official_weights_are_user_errors(runner, tmp_path, rendered):
    missing = runner.invoke(app, ["eval", "geneval", "--images", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "not found" in missing.stderr and "Traceback" not in missing.output
    mmdet = runner.invoke(
        app, ["eval", "geneval", "--images", str(rendered), "--detector", "mmdet", "--detector-weights", str(tmp_path)]
    )
    assert mmdet.exit_code == 1
    assert "pip install" in mmdet.stderr or "mask2former" in mmdet.stderr


def test_fid_against_the_shapes_renderer(runner, rendered, tmp_path, monkeypatch):
    monkeypatch.setenv("APEX_CACHE_DIR", str(tmp_path / "cache"))
    args = ["eval", "fid", "--images", str(rendered), "--ref", "shapes", "--ref-images", "240", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["mode"] == "clean" and scores["features"] == "shapes"
    assert scores["ref_name"] == "shapes-32px-seed0-n240" and len(scores["ref_hash"]) == 16
    assert scores["n_images"] == 120 and scores["fid"] < 30
    assert list((tmp_path / "cache").rglob("*.npz"))  # reference statistics were cached


def test_fid_bad_reference_is_a_user_error(runner, rendered):
    result = runner.invoke(app, ["eval", "fid", "--images", str(rendered), "--ref", "no/such/folder"])
    assert result.exit_code == 1
    assert "--ref 'no/such/folder' is neither 'shapes' nor an existing folder" in result.stderr


TINY_SHAPES = [
    "--set",
    "train.steps=2",
    "--set",
    "train.batch_size=4",
    "--set",
    "model.block_out_channels=[16, 32]",
    "--set",
    "model.attention_heads=2",
    "--set",
    "model.cross_attention_dim=32",
    "--set",
    "model.norm_num_groups=8",
    "--set",
    "output.evaluate=false",
    "--set",
    "hardware.precision=fp32",
]


@pytest.fixture(scope="module")
def tiny_shapes_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("shapes") / "run"
    result = CliRunner().invoke(
        app, ["distill", "--recipe", "shapes-teacher-cpu", *TINY_SHAPES, "--set", f"output.dir={run_dir}"]
    )
    assert result.exit_code == 0, result.output
    return run_dir


def test_geneval_generates_with_a_checkpoint_then_scores_one_table_across_nfes(runner, tiny_shapes_run, tmp_path):
    out = tmp_path / "geneval"
    args = [
        "eval",
        "geneval",
        "--ckpt",
        str(tiny_shapes_run),
        "--nfe",
        "1,2",
        "--prompts",
        "shapes-quick",
        "--n",
        "1",
        "--out",
        str(out),
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["scores"]
    assert set(scores) == {"NFE 1", "NFE 2"}
    assert all(s["total_images"] == 60 for s in scores.values())
    folder = out / "shapes-quick-nfe1"
    assert len(list(folder.glob("*/samples/0000.png"))) == 60
    assert (folder / "results.jsonl").is_file()
    # Re-running resumes: nothing is regenerated, the images are byte-identical.
    before = {p: p.read_bytes() for p in folder.glob("*/samples/*.png")}
    again = runner.invoke(app, args)
    assert again.exit_code == 0
    assert {p: p.read_bytes() for p in folder.glob("*/samples/*.png")} == before


def test_fid_generates_with_a_checkpoint(runner, tiny_shapes_run, tmp_path, monkeypatch):
    monkeypatch.setenv("APEX_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "fid"
    args = [
        "eval",
        "fid",
        "--ckpt",
        str(tiny_shapes_run),
        "--nfe",
        "1",
        "--n-images",
        "20",
        "--ref",
        "shapes",
        "--ref-images",
        "50",
        "--out",
        str(out),
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_images"] == 20
    assert len(list(out.glob("*.png"))) == 20


def test_eval_needs_exactly_one_source(runner, tiny_shapes_run, rendered):
    both = runner.invoke(app, ["eval", "geneval", "--images", str(rendered), "--ckpt", str(tiny_shapes_run)])
    assert both.exit_code == 1 and "exactly one of --images DIR or --ckpt PATH" in both.stderr
    bad_shard = runner.invoke(app, ["eval", "geneval", "--ckpt", str(tiny_shapes_run), "--shard", "3/2"])
    assert bad_shard.exit_code == 1 and "--shard '3/2' is not of the form i/n" in bad_shard.stderr


def test_eval_of_a_missing_checkpoint_is_a_user_error(runner, tmp_path):
    result = runner.invoke(app, ["eval", "geneval", "--ckpt", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "does not exist" in result.stderr
