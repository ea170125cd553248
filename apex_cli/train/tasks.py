"""What the training loop needs to know about a model family and its data: one Task per ``data.name``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from apex_cli.config import DiffusersModelConfig, Recipe
from apex_cli.errors import ApexError


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
    """The task of the recipe's model and data."""
    if isinstance(recipe.model, DiffusersModelConfig):
        return DiffusersTask(recipe)
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
    from apex_cli.train.checkpoint import (
        load_checkpoint_weights,
        load_weights,
        read_checkpoint,
        read_weights,
        weights_stem,
    )

    directory, recipe, meta = read_checkpoint(path)
    model = build_task(recipe).build_model()
    if isinstance(recipe.model, DiffusersModelConfig):  # the base is the pipeline the recipe names, not a checkpoint
        stem = weights_stem(directory)
        if meta.get("adapters"):
            lora = recipe.model.lora
            assert lora is not None, "an adapter checkpoint of a recipe without model.lora"
            model.add_lora(lora.rank, lora.alpha, lora.target_modules, lora.dropout, lora.init)  # type: ignore[operator]
            model.load_trainable_state_dict(read_weights(directory, stem))  # type: ignore[operator]
        else:
            load_weights(model, directory, stem)
        return model.to(device).eval(), recipe, meta
    _, recipe, meta = load_checkpoint_weights(model, path)
    return model.to(device).eval(), recipe, meta


@dataclass
class DiffusersTask:
    """A diffusers teacher (``model.name``: a family with ``model.path``, or ``tiny-<family>``) distilled on the
    shapes renderer's (prompt, image) pairs, the images encoded into the teacher's latents by its own VAE."""

    recipe: Recipe

    def build_model(self) -> nn.Module:
        """The generator adapter over the recipe's pipeline; its target-time embedder is a copy of the time embedder."""
        from apex_cli.models.diffusers_base import generator_class

        config = self.recipe.model
        assert isinstance(config, DiffusersModelConfig)
        cls = generator_class(config.family)
        kwargs: dict[str, Any] = {
            "torch_dtype": getattr(torch, config.dtype),
            "max_sequence_length": config.max_sequence_length,
            "unconditional_prompt": config.unconditional_prompt,
        }
        if config.path is None:
            return cls.tiny(seed=config.seed, **kwargs)
        return cls.from_pretrained(config.path, revision=config.revision, **kwargs)

    def batches(
        self, model: nn.Module, batch_size: int, seed: int, device: torch.device, skip: int = 0
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """``(latents [B, C, h, w], cached text conditions)``; batch ``k`` is rendered from its own seed ``(seed, k)``,
        as in the shapes task, so a resumed run continues with the batches it would have seen."""
        import numpy as np

        from apex_cli.data import shapes
        from apex_cli.models.shapes import images_to_tensor

        model.move_frozen_parts(device)  # type: ignore[operator]
        size = self.recipe.data.image_size  # type: ignore[union-attr]
        step = skip
        while True:
            step += 1
            stream = shapes.training_stream(seed * 1_000_003 + step, size=size)
            pairs = [next(stream) for _ in range(batch_size)]
            images = images_to_tensor(np.stack([image for _, image in pairs])).to(device)
            yield model.encode_images(images), model.encode_prompts([prompt for prompt, _ in pairs])  # type: ignore[operator]

    def report(
        self, run_dir: Path, student: nn.Module | None, teacher: nn.Module, console: Console | None = None
    ) -> dict[str, Any]:
        """Not available yet (the recipe schema requires ``output.evaluate: false`` for diffusers models)."""
        raise ApexError("the end-of-run report is not available for diffusers models yet")

    def summary_table(self, metrics: dict[str, Any]) -> Table:
        """The run's metrics (only ``train_seconds`` until a report exists)."""
        table = Table(title=self.recipe.name)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in metrics.items():
            table.add_row(key, str(value))
        return table
