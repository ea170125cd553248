"""`apex sample` and `apex export` end to end on tiny shapes runs: files, round trips, a fresh diffusers process.

The runs are trained two steps by the fixtures below (a full student and a LoRA student of the session's tiny
teacher); everything runs on one thread (tiny models; a busy machine slows two threads a hundredfold).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from apex_cli.cli.app import app
from apex_cli.config import dump_recipe, load_recipe
from apex_cli.export import writer
from apex_cli.export.loading import load_model, resolve_source, settings_from_record
from apex_cli.export.writer import checkpoint_samples, write_diffusers
from apex_cli.train.checkpoint import save_checkpoint
from apex_cli.train.loop import run_distillation

PROMPTS = ["a photo of a red circle", "a photo of two squares left of a blue triangle"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, tiny_shapes, tiny_shapes_teacher) -> Path:
    """A full-fine-tune APEX student of the tiny teacher, two steps."""
    path = tmp_path_factory.mktemp("student") / "run"
    overrides = [*tiny_shapes, "train.steps=2", f"model.init={tiny_shapes_teacher}", f"output.dir={path}"]
    run_distillation(load_recipe("shapes-apex-cpu", overrides))
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_shapes, tiny_shapes_teacher) -> Path:
    """A LoRA (rank 4) APEX student of the tiny teacher, two steps: its checkpoints hold adapters only."""
    path = tmp_path_factory.mktemp("lora") / "run"
    overrides = [
        *tiny_shapes,
        "train.steps=2",
        "train.warmup_steps=0",
        "model.lora.rank=4",
        f"model.init={tiny_shapes_teacher}",
        f"output.dir={path}",
    ]
    run_distillation(load_recipe("shapes-apex-lora-cpu", overrides))
    return path


@pytest.fixture(scope="module")
def toy2d_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of another model family (its weights are never read)."""
    path = tmp_path_factory.mktemp("toy2d") / "final"
    recipe = load_recipe("toy2d-teacher", [f"output.dir={path.parent}"])
    save_checkpoint(path, dump_recipe(recipe), {"model": {"w": torch.zeros(1)}}, {"step": 1, "kind": "teacher"})
    return path


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})


def pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))])


def reference(run: Path, prompts: list[str], seeds: list[int], nfe: int | None = None) -> torch.Tensor:
    """The checkpoint's own float samples: apex's sampler, the noise protocol of `apex sample`."""
    loaded = load_model(resolve_source(run))
    return checkpoint_samples(loaded.model, prompts, seeds, settings_from_record(loaded.sampler, nfe))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.endswith(".old"))


# ---------------------------------------------------------------------------------------------------------------
# apex sample


def test_help_of_both_commands_shows_examples():
    for command in ("sample", "export"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        assert f"apex {command} " in result.stdout[result.stdout.index("Examples") :]


def test_sample_writes_pngs_a_grid_and_a_manifest(student_run, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(f"\n{PROMPTS[1]}\n\n")
    out = tmp_path / "samples"
    result = invoke(
        "sample", PROMPTS[0], "--prompts-file", prompt_file, "--ckpt", student_run, "--n", 2, "--seed", 5, "--out", out
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(i["file"], i["prompt"], i["seed"], i["nfe"]) for i in manifest["images"]] == [
        ("000-00.png", PROMPTS[0], 5, 1),
        ("000-01.png", PROMPTS[0], 6, 1),
        ("001-00.png", PROMPTS[1], 7, 1),
        ("001-01.png", PROMPTS[1], 8, 1),
    ]
    checkpoint_manifest = json.loads((student_run / "final" / "manifest.json").read_text())
    assert manifest["weights_sha256"] == {"ema.safetensors": checkpoint_manifest["files"]["ema.safetensors"]["sha256"]}
    assert manifest["source"] == str(student_run / "final")
    assert manifest["sampler"]["time_grid"] == [0.999, 0.0] and manifest["sampler"]["guidance"] == 0.0
    assert np.asarray(Image.open(out / "grid.png")).shape == (64, 64, 3)  # a row a prompt, a column an image
    # The images are apex's sampler rounded; the batch they were drawn in changes float rounding only.
    first = pixels(out)
    expected = reference(student_run, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, [5, 6, 7, 8])
    assert (first == ((expected.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()).all()
    again = invoke("sample", *PROMPTS, "--ckpt", student_run, "--n", 2, "--seed", 5, "--batch-size", 1, "--out", out)
    assert again.exit_code == 0, again.output  # an earlier sample folder is replaced
    assert np.abs(pixels(out).astype(int) - first).max() <= 1 and len(list(out.glob("0*.png"))) == 4
    assert leftovers(tmp_path) == []


def test_sample_without_ckpt_uses_the_demo_run(student_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(student_run)
    result = invoke("sample", "a photo of a circle", "--n", 1, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 1
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source"] == "runs/demo/final"


# ---------------------------------------------------------------------------------------------------------------
# apex export


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    args = json.loads(sys.argv[1])
    generators = lambda: [torch.Generator().manual_seed(s) for s in args["seeds"]]

    pipe = DiffusionPipeline.from_pretrained(args["diffusers"], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.nfe == 1, pipe.scheduler.config  # the stored sampler, one step
    raw = {"diffusers": pipe(args["prompts"], generator=generators(), output_type="latent").images}
    for i, image in enumerate(pipe(args["prompts"], generator=generators()).images):
        image.save(Path(args["pngs"]) / f"0{i}.png")

    base = DiffusionPipeline.from_pretrained(args["base"], trust_remote_code=True)
    base.set_progress_bar_config(disable=True)
    base.load_lora_weights(args["lora"])
    base.scheduler = base.scheduler.from_config(json.loads((Path(args["lora"]) / "apex_sampler.json").read_text()))
    raw["lora"] = base(args["prompts"], generator=generators(), output_type="latent").images
    save_file({k: v.contiguous() for k, v in raw.items()}, args["result"])
    assert not [m for m in sys.modules if m.startswith("apex_cli")]  # diffusers alone
    print(type(pipe).__name__, type(pipe.scheduler).__name__)
    """
)


def test_diffusers_export_loads_in_a_fresh_process_and_equals_apex_sample(
    student_run, lora_run, tiny_shapes_teacher, tmp_path
):
    export = tmp_path / "diffusers"
    result = invoke("export", "--ckpt", student_run, "--format", "diffusers", "--out", export)
    assert result.exit_code == 0, result.output
    assert "max abs difference 0" in result.stdout
    for name in ("model_index.json", "pipeline_apex_shapes.py", "scheduler/scheduling_apex.py", "unet/config.json"):
        assert (export / name).is_file(), name
    info = json.loads((export / "apex_export.json").read_text())
    assert info["round_trip"]["max_abs_diff"] == 0.0 and info["source"]["checkpoint"] == str(student_run / "final")
    assert json.loads((export / "apex_sampler.json").read_text())["nfe"] == 1

    lora = tmp_path / "lora"
    assert invoke("export", "--ckpt", lora_run, "--format", "lora", "--out", lora).exit_code == 0
    base = tmp_path / "base"  # what `apex export --ckpt TEACHER --format diffusers` writes, without its round trip
    loaded = load_model(resolve_source(tiny_shapes_teacher))
    write_diffusers(base, loaded.model, loaded.sampler)

    seeds = [11, 12]
    sampled = invoke(
        "sample", *PROMPTS, "--ckpt", student_run, "--nfe", 1, "--n", 1, "--seed", 11, "--out", tmp_path / "s"
    )
    assert sampled.exit_code == 0, sampled.output
    pngs, raw = tmp_path / "pngs", tmp_path / "raw.safetensors"
    pngs.mkdir()
    args = {"diffusers": str(export), "base": str(base), "lora": str(lora), "prompts": PROMPTS, "seeds": seeds}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, json.dumps({**args, "pngs": str(pngs), "result": str(raw)})],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr
    assert "ApexShapesPipeline ApexSampler" in process.stdout

    images = load_file(str(raw))
    difference = (images["diffusers"] - reference(student_run, PROMPTS, seeds, nfe=1)).abs().max().item()
    assert difference < 1e-5, difference
    assert (pixels(pngs) == pixels(tmp_path / "s")).all()  # the same PNGs as `apex sample`
    lora_difference = (images["lora"] - reference(lora_run, PROMPTS, seeds)).abs().max().item()
    assert lora_difference < 1e-5, lora_difference


def test_lora_and_merged_exports_sample_like_their_checkpoint(lora_run, tmp_path):
    lora, merged = tmp_path / "lora", tmp_path / "merged"
    for export_format, out in (("lora", lora), ("merged", merged)):
        result = invoke("export", "--ckpt", lora_run, "--format", export_format, "--out", out)
        assert result.exit_code == 0, result.output
    with safe_open(str(lora / "pytorch_lora_weights.safetensors"), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert json.loads(metadata["lora_adapter_metadata"])["unet.r"] == 4  # the peft config travels with the weights
    assert set(load_file(str(lora / "target_time_embedder.safetensors"))) == {
        "linear_1.weight",
        "linear_1.bias",
        "linear_2.weight",
        "linear_2.bias",
    }
    unet_keys = load_file(str(merged / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in unet_keys)  # fused: a plain UNet2DConditionModel

    folders = {}
    for name, ckpt in (("checkpoint", lora_run), ("lora", lora), ("merged", merged)):
        folders[name] = tmp_path / f"samples-{name}"
        result = invoke("sample", *PROMPTS, "--ckpt", ckpt, "--n", 2, "--out", folders[name])
        assert result.exit_code == 0, result.output
    assert (pixels(folders["lora"]) == pixels(folders["checkpoint"])).all()
    fused = np.abs(pixels(folders["merged"]).astype(int) - pixels(folders["checkpoint"]).astype(int))
    assert fused.max() <= 1  # fusing moves floats by ~1e-6: at most a rounding flip
    base_hash = json.loads((lora / "apex_export.json").read_text())["base"]["sha256"]
    assert json.loads((folders["lora"] / "manifest.json").read_text())["weights_sha256"]["base"] == base_hash


def test_the_pipeline_loads_fuses_and_unloads_a_lora_export(lora_run, tiny_shapes_teacher, tmp_path):
    from diffusers import DiffusionPipeline

    lora, base = tmp_path / "lora", tmp_path / "base"
    assert invoke("export", "--ckpt", lora_run, "--format", "lora", "--out", lora).exit_code == 0
    loaded = load_model(resolve_source(tiny_shapes_teacher))
    write_diffusers(base, loaded.model, loaded.sampler)
    pipe = DiffusionPipeline.from_pretrained(base, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = pipe.scheduler.from_config(json.loads((lora / "apex_sampler.json").read_text()))

    def run():
        generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
        return pipe(PROMPTS, generator=generators, output_type="latent").images

    base_images = run()
    pipe.load_lora_weights(lora)
    student = run()
    assert (student - reference(lora_run, PROMPTS, [0, 1])).abs().max() < 1e-5
    pipe.unload_lora_weights()  # adapters and target-time embedder out: the base again
    assert torch.equal(run(), base_images)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # fused: the student stays, without adapter layers
    assert (run() - student).abs().max() < 1e-4


def test_a_round_trip_mismatch_is_an_error_and_leaves_nothing(student_run, tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "ROUND_TRIP_ATOL", -1.0)  # any difference, even 0, is now too large
    out = tmp_path / "exports" / "merged"
    result = invoke("export", "--ckpt", student_run, "--format", "merged", "--out", out)
    assert result.exit_code == 1
    assert "round trip failed: the merged export's samples differ from the checkpoint's by 0" in result.stderr
    assert not out.exists() and leftovers(out.parent) == []


def test_overwrite_replaces_an_earlier_export(student_run, tmp_path):
    out = tmp_path / "merged"
    assert invoke("export", "--ckpt", student_run, "--format", "merged", "--out", out).exit_code == 0
    again = invoke("export", "--ckpt", student_run, "--format", "merged", "--out", out)
    assert again.exit_code == 1 and "already holds an export" in again.stderr
    from_export = invoke("export", "--ckpt", out, "--format", "diffusers")
    assert (
        from_export.exit_code == 1
        and "is already an export (merged); apex export reads checkpoints" in from_export.stderr
    )
    assert invoke("export", "--ckpt", student_run, "--format", "merged", "--out", out, "--overwrite").exit_code == 0
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one `Error:` line, exit 1, no traceback, nothing left behind


BAD = [
    (
        "export-missing-checkpoint",
        ["export", "--ckpt", "{tmp}/nothing", "--format", "diffusers"],
        "{tmp}/nothing does not exist",
    ),
    ("export-other-model", ["export", "--ckpt", "{toy2d}", "--format", "diffusers"], "holds a toy2d-mlp model"),
    (
        "export-unknown-format",
        ["export", "--ckpt", "{student}", "--format", "comfyui", "--out", "{tmp}/out"],
        "unknown --format 'comfyui'; expected one of diffusers, lora, merged",
    ),
    (
        "export-out-under-a-file",
        ["export", "--ckpt", "{student}", "--format", "merged", "--out", "{tmp}/file.txt/out"],
        "cannot write the export to {tmp}/file.txt/out: {tmp}/file.txt is a file, not a folder",
    ),
    (
        "export-lora-of-full-fine-tune",
        ["export", "--ckpt", "{student}", "--format", "lora", "--out", "{tmp}/out"],
        "is a full fine-tune (every weight trained), not LoRA adapters",
    ),
    (
        "export-out-holds-other-files",
        ["export", "--ckpt", "{student}", "--format", "merged", "--out", "{tmp}"],
        "already exists and is not an apex export",
    ),
    (
        "sample-missing-checkpoint",
        ["sample", "a photo of a circle", "--ckpt", "{tmp}/nothing"],
        "{tmp}/nothing does not exist",
    ),
    ("sample-other-model", ["sample", "a photo of a circle", "--ckpt", "{toy2d}"], "holds a toy2d-mlp model"),
    ("sample-no-demo-run", ["sample", "a photo of a circle"], "no --ckpt given, and there is no demo run at runs/demo"),
    ("sample-no-prompts", ["sample", "--prompts-file", "{tmp}/file.txt", "--ckpt", "{student}"], "no prompts"),
    (
        "sample-unknown-word",
        ["sample", "a photo of a dragon", "--ckpt", "{student}", "--out", "{tmp}/out"],
        "has words outside the shapes vocabulary: 'dragon'",
    ),
    (
        "sample-bad-style",
        ["sample", "a photo of a circle", "--ckpt", "{student}", "--style", "fast", "--out", "{tmp}/out"],
        "--style 'fast' is not a sampler style",
    ),
    (
        "sample-other-size",
        ["sample", "a photo of a circle", "--ckpt", "{student}", "--height", "64", "--out", "{tmp}/out"],
        "this shapes model generates 32 x 32 images only",
    ),
    (
        "sample-out-holds-other-files",
        ["sample", "a photo of a circle", "--ckpt", "{student}", "--out", "{tmp}"],
        "already holds files that apex sample did not write",
    ),
    (
        "sample-out-under-a-file",
        ["sample", "a photo of a circle", "--ckpt", "{student}", "--out", "{tmp}/file.txt/out"],
        "cannot write samples to {tmp}/file.txt/out: {tmp}/file.txt is a file, not a folder",
    ),
]


@pytest.mark.parametrize(("args", "fragment"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_exits_1_with_one_error_line(args, fragment, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)  # no runs/demo here
    (tmp_path / "file.txt").write_text("\n")
    paths = {"{tmp}": str(tmp_path)}
    for key, fixture in (("{student}", "student_run"), ("{toy2d}", "toy2d_checkpoint")):
        if any(key in arg for arg in args):
            paths[key] = str(request.getfixturevalue(fixture))
    before = sorted(p.name for p in tmp_path.iterdir())
    expanded = list(args)
    for key, value in paths.items():
        expanded = [arg.replace(key, value) for arg in expanded]
        fragment = fragment.replace(key, value)
    result = invoke(*expanded)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no partial export or sample folder


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a read-only /sys (Linux)")
def test_unwritable_out_is_an_error_even_for_root(student_run):
    result = invoke("export", "--ckpt", student_run, "--format", "merged", "--out", "/sys/apex-export")
    assert result.exit_code == 1
    assert "Error: cannot write the export to /sys/apex-export: Operation not permitted" in result.stderr
