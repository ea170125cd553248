"""The shapes task: the renderer's (prompt, image) stream, the shapes UNet, and a GenEval report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.table import Table
from torch import Tensor, nn

from apex_cli.config import Recipe
from apex_cli.core.sampler import SamplerSettings
from apex_cli.data import shapes
from apex_cli.eval.detectors import ShapesDetector
from apex_cli.eval.generate import generate, generate_fn
from apex_cli.eval.geneval import generate_images, score_folder, summarize
from apex_cli.models.shapes import ShapesModel, images_to_tensor
from apex_cli.train.checkpoint import atomic_write_text
from apex_cli.train.sampling import TEACHER_MULTI_STEP, TEACHER_ONE_STEP, sampler_settings

SHORT_TASK_NAMES = {"single_object": "single", "two_object": "two", "counting": "count", "color_attr": "attr"}
REPORT_SEED = 0
REPORT_IMAGES_PER_PROMPT = 2


@dataclass
class ShapesTask:
    """Everything the loop needs that is specific to the shapes world."""

    recipe: Recipe

    def build_model(self) -> ShapesModel:
        """A fresh shapes UNet with its frozen text encoder and word-level tokenizer."""
        cfg = self.recipe.model
        return ShapesModel.build(
            image_size=self.recipe.data.image_size,  # type: ignore[union-attr]
            block_out_channels=cfg.block_out_channels,  # type: ignore[union-attr]
            layers_per_block=cfg.layers_per_block,  # type: ignore[union-attr]
            attention_heads=cfg.attention_heads,  # type: ignore[union-attr]
            cross_attention_dim=cfg.cross_attention_dim,  # type: ignore[union-attr]
            norm_num_groups=cfg.norm_num_groups,  # type: ignore[union-attr]
            seed=cfg.text_seed,  # type: ignore[union-attr]
        )

    def batches(
        self, model: nn.Module, batch_size: int, seed: int, device: torch.device, skip: int = 0
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """``(images in [-1, 1] [B, 3, H, W], cached text embeddings)`` from the renderer.

        Batch ``k`` is rendered from its own seed ``(seed, k)``, so a resumed run starts at batch ``skip`` at once.
        """
        size = self.recipe.data.image_size  # type: ignore[union-attr]
        step = skip
        while True:
            step += 1
            stream = shapes.training_stream(seed * 1_000_003 + step, size=size)
            pairs = [next(stream) for _ in range(batch_size)]
            x = images_to_tensor(np.stack([image for _, image in pairs])).to(device)
            cond = model.encode_prompts([prompt for prompt, _ in pairs])  # type: ignore[operator]
            yield x, {k: v.to(device) for k, v in cond.items()}

    def report(self, run_dir: Path, student: nn.Module | None, teacher: nn.Module) -> dict[str, Any]:
        """GenEval-shapes on the quick suite (60 prompts x 2 images) and a sample grid, one row per task."""
        sets: dict[str, tuple[nn.Module, SamplerSettings]] = {
            "teacher_50": (teacher, TEACHER_MULTI_STEP),
            "teacher_1": (teacher, TEACHER_ONE_STEP),
        }
        if student is not None:
            sets["student_1"] = (student, sampler_settings(self.recipe.sampler, 1))
        rows = shapes.prompt_suite(seed=0, counts=shapes.QUICK_COUNTS)
        scores = {}
        for name, (model, settings) in sets.items():
            folder = run_dir / "geneval" / name
            generate_images(rows, folder, generate_fn(model, settings), REPORT_IMAGES_PER_PROMPT, REPORT_SEED)
            scores[name] = summarize(score_folder(folder, ShapesDetector()))
        grid = run_dir / "samples.png"
        _grid(grid, sets)
        metrics: dict[str, Any] = {
            "geneval": {name: _compact(summary) for name, summary in scores.items()},
            "suite": "shapes quick (10 prompts a task)",
            "images_per_prompt": REPORT_IMAGES_PER_PROMPT,
            "outputs": {"metrics": str(run_dir / "metrics.json"), "samples": str(grid)},
        }
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
        return metrics

    def summary_table(self, metrics: dict[str, Any]) -> Table:
        """GenEval-shapes overall and per task for each sample set."""
        table = Table(title=f"{self.recipe.name}: GenEval-shapes, {metrics['suite']}")
        tasks = list(shapes.TASKS)
        table.add_column("samples")
        table.add_column("overall", justify="right")
        for task in tasks:
            table.add_column(SHORT_TASK_NAMES.get(task, task), justify="right")
        for name, score in metrics["geneval"].items():
            table.add_row(
                name.replace("_", ", NFE "), f"{score['overall']:.3f}", *(f"{score['tasks'][t]:.2f}" for t in tasks)
            )
        return table


def _compact(summary: dict[str, Any]) -> dict[str, Any]:
    return {"overall": summary["overall"], "tasks": {t: v["accuracy"] for t, v in summary["tasks"].items()}}


def _grid(path: Path, sets: dict[str, tuple[nn.Module, SamplerSettings]]) -> None:
    """One row per GenEval task (its first quick-suite prompt), one column per sample set, 4 seeds each."""
    rows = shapes.prompt_suite(seed=0, counts=dict.fromkeys(shapes.TASKS, 1))
    seeds = [0, 1, 2, 3]
    tiles = []
    for row in rows:
        tiles.append(
            np.concatenate(
                [np.concatenate(list(generate(m, [row["prompt"]] * 4, seeds, s)), axis=1) for m, s in sets.values()],
                axis=1,
            )
        )
    image = np.concatenate(tiles, axis=0)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(image).save(tmp)
    tmp.replace(path)
