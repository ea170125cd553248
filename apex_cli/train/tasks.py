"""What the training loop needs to know about a model family and its data: one Task per ``data.name``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from apex_cli.config import DiffusersModelConfig, Recipe
from apex_cli.errors import ApexError

Shard = tuple[int, int]
"""``(rank, world)``: this process's share of every global batch."""
WHOLE: Shard = (0, 1)


class Task(Protocol):
    """Builds the model, streams batches, and writes the end-of-run report of one domain."""

    recipe: Recipe

    def build_model(self) -> nn.Module:
        """A fresh model of the recipe's architecture (a VelocityModel with ``unconditional``)."""
        ...

    def batches(
        self, model: nn.Module, batch_size: int, seed: int, device: torch.device, skip: int = 0, shard: Shard = WHOLE
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """An endless, seeded stream of ``(x_data, cond)``, starting after ``skip`` batches (for resume).

        ``batch_size`` is the global batch; process ``shard = (rank, world)`` gets rows
        ``[rank B / world, (rank + 1) B / world)`` of each.
        """
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


def shard_rows(x_data: Tensor, cond: dict[str, Tensor], shard: Shard) -> tuple[Tensor, dict[str, Tensor]]:
    """Process ``rank``'s rows of a global batch: ``[rank B / world, (rank + 1) B / world)``."""
    rank, world = shard
    if world == 1:
        return x_data, cond
    batch = x_data.shape[0]
    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    return x_data[rows], {key: value[rows] for key, value in cond.items()}


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


PREPARE_BATCH = 8
"""Prompts or images encoded at once while filling the cache."""


@dataclass
class DiffusersTask:
    """A diffusers teacher (``model.name``: a family with ``model.path``, or ``tiny-<family>``) and its data: the shapes
    renderer, an image-caption folder, a manifest, or prompts only (image-free).

    Captioned data are encoded once, before the first step, into the on-disk cache (``data/cache.py``): every
    prompt's condition and every image's latent, each process its share. Then the text encoders and the VAE move to
    the CPU, and steps read the cache: no text-encoder forward runs while training.
    """

    recipe: Recipe
    examples: list[Any] = field(default_factory=list)
    cache: Any = None

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

    def prepare(
        self, model: nn.Module, device: torch.device, shard: Shard = WHOLE, barrier: Any = None
    ) -> dict[str, int]:
        """Fill the disk cache with this process's share of the prompts and images, then move the text encoders and
        the VAE to the CPU (captioned data); the shapes renderer keeps them on ``device``.

        Args:
            model: The generator.
            device: Where the encoders run while filling the cache.
            shard: ``(rank, world)``: process ``rank`` encodes every ``world``-th prompt and image.
            barrier: Called when this process's share is done (every process waits for the others).

        Returns:
            ``{"prompts": n, "images": m}``: how many this process encoded (0 when the cache already had them).
        """
        from apex_cli.data.cache import DiskCache, model_key
        from apex_cli.data.captioned import list_examples

        data, config = self.recipe.data, self.recipe.model
        model.move_frozen_parts(device)  # type: ignore[operator]
        if data.name == "shapes":
            return {"prompts": 0, "images": 0}
        assert isinstance(config, DiffusersModelConfig)
        root = data.cache_dir or str(Path(self.recipe.output.dir) / "cache")  # type: ignore[union-attr]
        key = model_key(config, model.max_sequence_length, model.unconditional_prompt)  # type: ignore[arg-type]
        self.cache = DiskCache(root, key)
        model.use_disk_cache(self.cache)  # type: ignore[operator]
        self.examples = list_examples(data)
        rank, world = shard
        before = model.encoder_forwards  # type: ignore[operator]
        prompts = list(dict.fromkeys(e.caption for e in self.examples))[rank::world]
        for start in range(0, len(prompts), PREPARE_BATCH):
            model.encode_prompts(prompts[start : start + PREPARE_BATCH])  # type: ignore[operator]
        model.unconditional(1)  # type: ignore[operator]
        encoded = {"prompts": model.encoder_forwards - before, "images": 0}  # type: ignore[operator]
        images = list(dict.fromkeys(e.image for e in self.examples if e.image is not None))[rank::world]
        missing = [path for path in images if self.cache.get_latent(path, data.image_size) is None]  # type: ignore[union-attr]
        for start in range(0, len(missing), PREPARE_BATCH):
            chunk = missing[start : start + PREPARE_BATCH]
            for path, latent in zip(chunk, self._encode_images(model, chunk, device), strict=True):
                self.cache.put_latent(path, data.image_size, latent)  # type: ignore[union-attr]
            encoded["images"] += len(chunk)
        if barrier is not None:
            barrier()
        model.move_frozen_parts("cpu")  # type: ignore[operator]
        return encoded

    def _encode_images(self, model: nn.Module, paths: list[Path], device: torch.device) -> Tensor:
        from apex_cli.data.captioned import load_image
        from apex_cli.models.shapes import images_to_tensor

        size = self.recipe.data.image_size  # type: ignore[union-attr]
        images = images_to_tensor(np.stack([load_image(path, size) for path in paths])).to(device)
        return model.encode_images(images).cpu()  # type: ignore[operator, no-any-return]

    def batches(
        self, model: nn.Module, batch_size: int, seed: int, device: torch.device, skip: int = 0, shard: Shard = WHOLE
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """``(latents [B, C, h, w], text conditions)`` of this process's rows of each global batch.

        Shapes: batch ``k`` rendered from its own seed ``(seed, k)`` and encoded by the VAE. Captioned data: the rows
        of ``data/captioned.batch_indices`` (seeded epochs), latents and conditions read from the cache (call
        :meth:`prepare` first). Prompts only: the latents are the model's own one-step samples ``sg(G(z, c))`` from
        the training RNG (the released code's ``use_image_free``). Either way a resumed run continues exactly.
        """
        from apex_cli.core.objective import one_step
        from apex_cli.data import shapes
        from apex_cli.data.captioned import batch_indices
        from apex_cli.models.shapes import images_to_tensor

        data = self.recipe.data
        if data.name == "shapes":
            for prompts, images in shapes.training_batches(seed, batch_size, data.image_size, skip):  # type: ignore[union-attr]
                x_data = model.encode_images(images_to_tensor(images).to(device))  # type: ignore[operator]
                yield shard_rows(x_data, model.encode_prompts(prompts), shard)  # type: ignore[operator]
        if not self.examples:
            raise RuntimeError("call DiffusersTask.prepare first: it lists the examples and fills the cache")
        rank, world = shard
        local = batch_size // world
        shape = model.latent_shape(data.image_size, data.image_size)  # type: ignore[union-attr, operator]
        batch = skip
        while True:
            rows = batch_indices(len(self.examples), batch_size, seed, batch)[rank * local : (rank + 1) * local]
            batch += 1
            examples = [self.examples[i] for i in rows]
            cond = model.encode_prompts([e.caption for e in examples])  # type: ignore[operator]
            if data.name == "prompts":
                with torch.no_grad():
                    x_data = one_step(model, torch.randn(local, *shape, device=device), cond)  # type: ignore[arg-type]
            else:
                x_data = torch.stack([self._latent(model, e.image, device) for e in examples]).to(device)
            yield x_data, cond

    def _latent(self, model: nn.Module, path: Path, device: torch.device) -> Tensor:
        size = self.recipe.data.image_size  # type: ignore[union-attr]
        latent = self.cache.get_latent(path, size)
        if latent is None:  # not in the cache (another node's share on an unshared disk): encode it now
            latent = self._encode_images(model, [path], device)[0]
            self.cache.put_latent(path, size, latent)
        return latent  # type: ignore[no-any-return]

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
