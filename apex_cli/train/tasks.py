"""What the training loop needs to know about a model family and its data: one Task per ``data.name``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from apex_cli.config import Recipe


class Task(Protocol):
    """Builds the model, streams batches, and writes the end-of-run report of one domain."""

    recipe: Recipe

    def build_model(self) -> nn.Module:
        """A fresh model of the recipe's architecture (a VelocityModel with ``unconditional``)."""
        ...

    def batches(
        self, model: nn.Module, batch_size: int, seed: int, device: torch.device, skip: int = 0
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """An endless, seeded stream of ``(x_data, cond)``, starting after ``skip`` batches (for resume)."""
        ...

    def report(
        self, run_dir: Path, student: nn.Module | None, teacher: nn.Module, console: Console | None = None
    ) -> dict[str, Any]:
        """Measure the run, write its report files and return the metrics (with ``outputs``: name -> path).

        Long reports show their progress on ``console``.
        """
        ...

    def summary_table(self, metrics: dict[str, Any]) -> Table:
        """The metrics as a table for the terminal."""
        ...


def build_task(recipe: Recipe) -> Task:
    """The task of the recipe's data."""
    if recipe.data.name == "toy2d":
        from apex_cli.train.toy2d import Toy2dTask

        return Toy2dTask(recipe)
    from apex_cli.train.shapes import ShapesTask

    return ShapesTask(recipe)


def load_checkpoint_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Recipe, dict[str, Any]]:
    """The model of a checkpoint (its EMA weights when it has them), in eval mode, with its recipe and metadata.

    An adapter checkpoint of a LoRA run is rebuilt on its base (``model.init``): see ``load_checkpoint_weights``.

    Args:
        path: A run directory (its final checkpoint) or a checkpoint directory.
        device: Where to put the model.

    Raises:
        CheckpointError: The checkpoint is unreadable, or a LoRA checkpoint's base cannot be found.
    """
    from apex_cli.train.checkpoint import load_checkpoint_weights, read_checkpoint

    _, recipe, _ = read_checkpoint(path)
    model = build_task(recipe).build_model()
    _, recipe, meta = load_checkpoint_weights(model, path)
    return model.to(device).eval(), recipe, meta
