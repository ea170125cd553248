"""The on-disk cache of text embeddings and latents: the second epoch runs no text-encoder forward (a hook counts
them), and a second run on the same cache runs none at all."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from apex_cli.config import validate_recipe
from apex_cli.train.loop import run_distillation
from apex_cli.train.tasks import build_task

PROMPTS = ["a photo of a red circle", "a photo of two squares", "a blue triangle", "a green circle left of a square"]


def _folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, prompt in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(prompt)
    return folder


def _recipe(tmp_path, name: str, steps: int, lora: bool = True):
    raw = {
        "name": "cache-test",
        "model": {"name": "tiny-qwen-image", "lora": {"rank": 4} if lora else None},
        "data": {
            "name": "folder",
            "path": str(_folder(tmp_path)) if name == "folder" else str(tmp_path / "images"),
            "image_size": 32,
            "cache_dir": str(tmp_path / "cache"),
        },
        "method": {"enhanced_ratio": 0.5},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-3},
        "monitor": {"every": 0},
        "hardware": {"device": "cpu", "precision": "fp32", "num_threads": 1},
        "output": {"dir": str(tmp_path / "run"), "evaluate": False},
    }
    return validate_recipe(raw, "test recipe", [])


def _count_forwards(model) -> dict[str, int]:
    """Forward calls of the text encoder and of the VAE encoder, counted by hooks."""
    counts = {"text": 0, "vae": 0}
    pipeline = model.pipeline
    pipeline.text_encoder.register_forward_hook(lambda *_: counts.__setitem__("text", counts["text"] + 1))
    pipeline.vae.encoder.register_forward_hook(lambda *_: counts.__setitem__("vae", counts["vae"] + 1))
    return counts


def test_the_second_epoch_runs_no_text_encoder_forward_and_a_second_run_none_at_all(tmp_path) -> None:
    torch.set_num_threads(1)
    recipe = _recipe(tmp_path, "folder", steps=2)
    task = build_task(recipe)
    model = task.build_model()
    counts = _count_forwards(model)
    encoded = task.prepare(model, torch.device("cpu"))
    assert encoded == {"prompts": 2, "images": 4}  # 4 prompts in one encoder batch + the unconditional one; 4 latents
    assert counts["text"] == 2 and counts["vae"] == 1  # the prompts and the unconditional prompt; one VAE batch
    assert next(model.pipeline.text_encoder.parameters()).device.type == "cpu"
    batches = task.batches(model, 4, seed=0, device=torch.device("cpu"))
    before = dict(counts)
    epoch_1 = next(batches)  # 4 examples, batch 4: one batch an epoch
    epoch_2 = next(batches)
    assert counts == before  # neither epoch ran the text encoder or the VAE: both read the disk cache
    assert epoch_1[0].shape == (4, 4, 8, 8) and epoch_1[1]["embeds"].shape[:2] == (4, 64)
    assert not torch.equal(epoch_1[0], epoch_2[0])  # another order in the second epoch

    # A new process (a fresh model) on the same cache: no encoder runs at all, and the conditions are the same.
    fresh = build_task(recipe)
    again = fresh.build_model()
    counts = _count_forwards(again)
    assert fresh.prepare(again, torch.device("cpu")) == {"prompts": 0, "images": 0}
    cond = again.encode_prompts(PROMPTS)
    assert counts == {"text": 0, "vae": 0}
    torch.testing.assert_close(cond["embeds"], model._encode(PROMPTS, False)["embeds"])  # padded back exactly
    torch.testing.assert_close(cond["mask"], model._encode(PROMPTS, False)["mask"])


def test_a_run_on_images_and_one_on_prompts_only_train_from_the_cache(tmp_path) -> None:
    run_distillation(_recipe(tmp_path, "folder", steps=3))  # 3 steps = 3 epochs of 4 images
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["total"] is not None for r in records)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    image_free = _recipe(tmp_path, "cached", steps=2, lora=False).model_dump(mode="json")
    image_free["data"] = {
        "name": "prompts",
        "path": str(tmp_path / "prompts.txt"),
        "image_size": 32,
        "cache_dir": str(tmp_path / "cache"),
    }
    image_free["output"]["dir"] = str(tmp_path / "image-free")
    run_distillation(validate_recipe(image_free, "image-free", []))
    assert (tmp_path / "image-free" / "final" / "model.safetensors").is_file()
