"""`apex distill --dry-run`'s per-GPU memory estimate: an upper bound within 2x of the measured peak of a training
step of the tiny models, and for the 20B recipe without loading (or downloading) anything."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from apex_cli.cli.app import app
from apex_cli.config import load_recipe, validate_recipe
from apex_cli.train.memory import GIB, estimate_memory, measure_step_memory


@pytest.mark.parametrize(
    ("family", "lora", "checkpointing"),
    [("qwen-image", True, False), ("qwen-image", False, True), ("flux", False, False)],
    ids=["qwen-lora", "qwen-full-checkpointing", "flux-full"],
)
def test_the_estimate_bounds_the_measured_peak_of_a_tiny_step_within_2x(tmp_path, family, lora, checkpointing):
    torch.set_num_threads(1)
    (tmp_path / "prompts.txt").write_text("\n".join(f"a photo of {n} red circles" for n in range(8)))
    raw = {
        "name": "memory",
        "model": {"name": f"tiny-{family}", "lora": {"rank": 4} if lora else None},
        "data": {"name": "prompts", "path": str(tmp_path / "prompts.txt"), "image_size": 32},
        "method": {"enhanced_ratio": 0.5},
        "train": {"steps": 1, "batch_size": 8, "lr": 1e-3},
        "hardware": {"device": "cpu", "precision": "fp32", "gradient_checkpointing": checkpointing},
        "output": {"dir": str(tmp_path / "run"), "evaluate": False},
    }
    recipe = validate_recipe(raw, "test", [])
    estimate, measured = estimate_memory(recipe), measure_step_memory(recipe)
    assert measured["peak"] <= estimate.peak <= 2 * measured["peak"], (estimate.terms, measured)
    # The weights and optimizer terms are exact counts: they match what the tracker saw held.
    assert estimate.terms["optimizer"] == pytest.approx(measured["optimizer"], rel=0.25)


def test_dry_run_of_the_20b_lora_recipe_prints_a_per_gpu_estimate_without_loading_it(monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run must not load weights")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["distill", "--recipe", "qwen20b-lora.yaml", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "memory estimate per GPU" in result.stdout
    assert "transformer + adapters + Emb2" in result.stdout and "20.86B" in result.stdout
    peak = float(re.search(r"#\s+peak\s+([\d.]+) GiB", result.stdout).group(1))
    assert 45 < peak < 80  # fits the recipe's one 80 GB GPU
    assert "WARNING" not in result.stdout


def test_fsdp_divides_the_sharded_terms_by_the_processes():
    one = estimate_memory(
        load_recipe("qwen20b-lora", ["model.lora=null", "method.reference=ema", "method.enhanced_ratio=0.8"])
    )
    eight = estimate_memory(load_recipe("qwen20b-full-8xa100-fsdp", ["train.batch_size=32"]))
    assert eight.terms["optimizer"] == pytest.approx(one.terms["optimizer"] / 8)
    assert eight.terms["gradients"] == pytest.approx(one.terms["gradients"] / 8)
    assert one.peak / GIB > 80 > eight.peak / GIB  # 20B full fine-tuning only fits sharded


def test_dry_run_of_a_family_without_an_estimate_says_so_instead_of_failing():
    result = CliRunner().invoke(
        app,
        [
            "distill",
            "--recipe",
            "qwen20b-lora.yaml",
            "--set",
            "model={name: tiny-z-image}",
            "--set",
            "output.evaluate=false",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "memory estimate: not available for z-image yet" in result.stdout


def test_the_teacher_velocity_costs_one_frozen_copy_shared_with_a_frozen_reference():
    full = ["model.lora=null", "method.reference=ema", "method.enhanced_ratio=0.8"]
    base = estimate_memory(load_recipe("qwen20b-lora", full))
    teacher = estimate_memory(load_recipe("qwen20b-lora", [*full, "method.target_velocity=teacher"]))
    frozen = ["model.lora=null", "method.reference=frozen", "method.enhanced_ratio=0.8"]
    frozen_ref = estimate_memory(load_recipe("qwen20b-lora", frozen))
    both = estimate_memory(load_recipe("qwen20b-lora", [*frozen, "method.target_velocity=teacher"]))
    copy = teacher.terms["weights"] - base.terms["weights"]
    assert copy > 30 * GIB  # a whole 20B bf16 transformer: about 38 GiB
    assert both.terms["weights"] == frozen_ref.terms["weights"]  # the frozen reference is that teacher
    lora = estimate_memory(load_recipe("qwen20b-lora", ["method.target_velocity=teacher"]))
    assert lora.terms["weights"] == estimate_memory(load_recipe("qwen20b-lora")).terms["weights"]  # adapters off
