"""`apex export` of a tiny Qwen-Image LoRA student: ``lora`` loads in the stock pipeline with no missing or unexpected
keys, ``merged`` equals base + LoRA, bad formats are one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from apex_cli.cli.app import app
from apex_cli.config import validate_recipe
from apex_cli.export.teachers import ONE_STEP_BIAS_FILE, ROUND_TRIP_TIMES
from apex_cli.models.diffusers_base import TARGET_TIME_FILE
from apex_cli.models.qwen_image import QwenImageGenerator
from apex_cli.train.loop import run_distillation
from apex_cli.train.tasks import build_task, load_checkpoint_model

PROMPTS = ["a photo of a red circle", "a photo of two squares left of a blue triangle"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _train(out: Path, lora: bool, extra: tuple[str, ...] = ()) -> Path:
    torch.set_num_threads(1)
    raw = {
        "name": "tiny-qwen-image-apex",
        "model": {"name": "tiny-qwen-image", "lora": {"rank": 4, "alpha": 8} if lora else None},
        "data": {"name": "shapes", "image_size": 32},
        "method": {"enhanced_ratio": 0.5},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 2, "warmup_steps": 0},
        "monitor": {"every": 1},
        "hardware": {"device": "cpu", "precision": "fp32", "num_threads": 1},
        "output": {"dir": str(out), "evaluate": False},
    }
    run_distillation(validate_recipe(raw, "test recipe", list(extra)))
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A tiny Qwen-Image LoRA (rank 4, alpha 8) student, two steps."""
    return _train(tmp_path_factory.mktemp("qwen") / "run", lora=True)


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})


def _inputs(model):
    x = torch.randn(2, *model.latent_shape(32, 32), generator=torch.Generator().manual_seed(3))
    return x, model.encode_prompts(PROMPTS)


def test_lora_and_merged_exports_of_a_tiny_qwen_image_student(lora_run, tmp_path, caplog) -> None:
    result = invoke("export", "--ckpt", lora_run, "--format", "lora", "--out", tmp_path / "lora", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output.strip().splitlines()[-1])
    assert info["teacher"] is True and info["max_abs_diff"] <= 1e-5
    lora = tmp_path / "lora"
    assert set(info["files"]) == {
        "pytorch_lora_weights.safetensors",
        TARGET_TIME_FILE,
        "apex_sampler.json",
        "apex_export.json",
    }
    manifest = json.loads((lora / "apex_export.json").read_text())
    assert manifest["model"] == "tiny-qwen-image" and manifest["base"]["pipeline"] == "tiny-qwen-image"

    student, recipe, _ = load_checkpoint_model(lora_run)
    x, cond = _inputs(student)
    with torch.no_grad():
        expected_tt = student.velocity(x, torch.full((2,), 0.7), torch.full((2,), 0.7), cond)

    # The stock pipeline's load_lora_weights: every saved key lands, none is left over, no warning.
    base = build_task(recipe).build_model().eval()
    pipe = base.pipeline
    with torch.no_grad():
        before = base.velocity(x, torch.full((2,), 0.7), torch.full((2,), 0.7), cond)
    saved = load_file(str(lora / "pytorch_lora_weights.safetensors"))
    assert saved and all(k.startswith("transformer.") and ".lora_" in k for k in saved)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        type(pipe).load_lora_weights(pipe, lora)  # the stock QwenImagePipeline method
    assert type(pipe).__name__ == "QwenImagePipeline"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "missing" in w.lower() or "unexpected" in w.lower()], warnings
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=next(iter(pipe.transformer.peft_config)))
    assert set(loaded) == {k.removeprefix("transformer.") for k in saved}, "missing or unexpected LoRA keys"
    print(f"lora keys: {len(saved)} saved, {len(loaded)} loaded")
    with torch.no_grad():
        after = base.velocity(x, torch.full((2,), 0.7), torch.full((2,), 0.7), cond)
    assert (after - before).abs().max() > 1e-4  # the adapters change the output ...
    assert (after - expected_tt).abs().max() < 1e-5  # ... into the student's at r = t

    # merged: transformer/ equals base + LoRA (float32); with the one-step bias it is F(z, 1, 0) at t = 1.
    result = invoke("export", "--ckpt", lora_run, "--format", "merged", "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert "round trip: the velocities match" in result.output
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "transformer" / "config.json").is_file() and (merged_dir / ONE_STEP_BIAS_FILE).is_file()
    merged = type(pipe.transformer).from_pretrained(merged_dir / "transformer").eval()
    assert merged.dtype == torch.float32 and not any("lora" in k for k in merged.state_dict())
    bare = QwenImageGenerator.bare(merged)
    worst = 0.0
    for t in (*ROUND_TRIP_TIMES, 0.7, 0.2):
        with torch.no_grad():
            ours = bare._forward(x, torch.full((2,), t), cond)
            theirs = base.velocity(x, torch.full((2,), t), torch.full((2,), t), cond)
        worst = max(worst, (ours - theirs).abs().max().item())
    print(f"merged vs base + LoRA: max abs diff {worst:.3g}")
    assert worst < 1e-5
    with torch.no_grad():
        one_step = student.velocity(x, torch.ones(2), torch.zeros(2), cond)
        unfolded = bare._forward(x, torch.ones(2), cond)
        state = merged.state_dict()
        for key, delta in load_file(str(merged_dir / ONE_STEP_BIAS_FILE)).items():
            state[key].add_(delta)
        folded = bare._forward(x, torch.ones(2), cond)
    assert (unfolded - one_step).abs().max() > 1e-4  # Emb2 matters for the one-step map ...
    assert (folded - one_step).abs().max() < 1e-5  # ... and the folded bias reproduces it exactly at t = 1


def test_unsupported_formats_are_one_line_errors(lora_run, tmp_path) -> None:
    result = invoke("export", "--ckpt", lora_run, "--format", "diffusers", "--out", tmp_path / "d")
    assert result.exit_code != 0
    assert "tiny-qwen-image student" in result.output and "--format lora or merged" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "d").exists()


def test_a_failed_round_trip_leaves_nothing_behind(lora_run, tmp_path, monkeypatch) -> None:
    from apex_cli.export import teachers

    monkeypatch.setattr(teachers, "student_velocities", lambda model, x, cond: torch.full((3, *x.shape), float("nan")))
    result = invoke("export", "--ckpt", lora_run, "--format", "lora", "--out", tmp_path / "bad")
    assert result.exit_code == 1 and "round trip failed" in result.output
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_a_full_fine_tune_exports_merged_but_not_lora(tmp_path) -> None:
    run = _train(tmp_path / "full", lora=False, extra=("method.reference=online",))
    result = invoke("export", "--ckpt", run, "--format", "lora", "--out", tmp_path / "l")
    assert result.exit_code != 0 and "is a full fine-tune" in result.output and "--format merged" in result.output
    result = invoke("export", "--ckpt", run, "--format", "merged", "--out", tmp_path / "m", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output.strip().splitlines()[-1])
    assert info["max_abs_diff"] <= 1e-5 and "transformer/diffusion_pytorch_model.safetensors" in info["files"]
    assert "base" not in json.loads((tmp_path / "m" / "apex_export.json").read_text())
