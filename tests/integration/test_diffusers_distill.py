"""`apex distill`'s loop on tiny diffusers teachers (``model.name: tiny-<family>``): LoRA and full runs, checkpoints,
resume and reloading, on the shapes renderer's images encoded by the teacher's own VAE."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from apex_cli.config import validate_recipe
from apex_cli.errors import RecipeError
from apex_cli.train.loop import run_distillation
from apex_cli.train.tasks import load_checkpoint_model


def _recipe(family: str, out, steps: int, lora: bool, extra: tuple[str, ...] = ()):
    raw = {
        "name": f"tiny-{family}-apex",
        "model": {"name": f"tiny-{family}", "lora": {"rank": 4, "alpha": 8} if lora else None},
        "data": {"name": "shapes", "image_size": 32},
        "method": {"enhanced_ratio": 0.5},
        "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 2},
        "monitor": {"every": 1},
        "hardware": {"device": "cpu", "precision": "fp32", "num_threads": 1},
        "output": {"dir": str(out), "evaluate": False},
    }
    return validate_recipe(raw, "test recipe", list(extra))


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lora_distillation_of_a_tiny_qwen_image_writes_adapters_resumes_and_reloads(tmp_path) -> None:
    run_distillation(_recipe("qwen-image", tmp_path / "whole", 3, lora=True))
    run_distillation(_recipe("qwen-image", tmp_path / "parts", 2, lora=True))
    run_distillation(_recipe("qwen-image", tmp_path / "parts", 3, lora=True), resume=True)

    final = tmp_path / "whole" / "final"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["adapters"] is True and meta["base"] == "tiny-qwen-image"
    records = _log(tmp_path / "whole")
    assert len(records) == 3 and all(r["total"] is not None and r["grad_norm"] is not None for r in records)
    assert all("diversity" in r for r in records)  # the collapse monitor ran on the latents
    for stem in ("model", "ema"):
        whole = load_file(str(final / f"{stem}.safetensors"))
        parts = load_file(str(tmp_path / "parts" / "final" / f"{stem}.safetensors"))
        assert whole and all(".lora_" in k or k.startswith("target_time_embedder.") for k in whole)
        assert set(whole) == set(parts) and all(torch.equal(whole[k], parts[k]) for k in whole), stem  # bit-exact
    assert any((v != 0).any() for k, v in load_file(str(final / "model.safetensors")).items() if ".lora_B." in k)

    model, recipe, _ = load_checkpoint_model(tmp_path / "whole")
    assert model.has_lora and recipe.model.lora.rank == 4
    saved = load_file(str(final / "ema.safetensors"))
    assert all(torch.equal(model.trainable_state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize("family", ["sana", "sd3", "flux", "z-image"])
def test_full_fine_tuning_of_a_tiny_teacher_runs_two_steps_and_reloads(family, tmp_path) -> None:
    run_distillation(_recipe(family, tmp_path / "run", 2, lora=False, extra=("method.reference=online",)))
    records = _log(tmp_path / "run")
    assert len(records) == 2 and all(r["total"] is not None for r in records)
    weights = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert any(k.startswith("transformer.") for k in weights) and any(
        k.startswith("target_time_embedder.") for k in weights
    )
    model, _, _ = load_checkpoint_model(tmp_path / "run")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_diffusers_recipes_are_validated() -> None:
    with pytest.raises(RecipeError, match=r"output\.evaluate: the end-of-run report is not available"):
        _recipe("flux", "unused", 1, lora=False, extra=("output.evaluate=true",))
    with pytest.raises(RecipeError, match=r"model\.path: model 'sd3' needs a local diffusers folder or a hub id"):
        _recipe("sd3", "unused", 1, lora=False, extra=("model.name=sd3",))
    recipe = _recipe("sana", "unused", 1, lora=True)
    assert recipe.model.lora.target_modules[:2] == ("attn1.to_q", "attn1.to_k")  # the family's default targets
