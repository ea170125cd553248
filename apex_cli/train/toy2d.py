"""The 2-D task: mixture data, the MLP model, and the end-of-run report (energy distances + scatter plot)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from apex_cli.config import Recipe
from apex_cli.core.sampler import SamplerSettings, sample
from apex_cli.data.toy2d import Toy2dMixture
from apex_cli.eval.energy import energy_distance
from apex_cli.models.toy2d import Toy2dMLP
from apex_cli.train.checkpoint import atomic_write_text
from apex_cli.train.sampling import TEACHER_MULTI_STEP, TEACHER_ONE_STEP, sampler_settings
from apex_cli.train.tasks import WHOLE, Shard, shard_rows

EVAL_SEED = 20260422  # fixed, so every run of a recipe is measured on the same reference samples


@dataclass
class Toy2dTask:
    """Everything the loop needs that is specific to the 2-D mixtures."""

    recipe: Recipe

    def __post_init__(self) -> None:
        self.mixture = Toy2dMixture(self.recipe.data)

    def build_model(self) -> Toy2dMLP:
        """A fresh model of the recipe's architecture."""
        cfg = self.recipe.model
        return Toy2dMLP(self.mixture.num_classes, cfg.hidden_dim, cfg.depth, cfg.embed_dim, cfg.target_time)

    def batches(
        self, model: nn.Module, batch_size: int, seed: int, device: torch.device, skip: int = 0, shard: Shard = WHOLE
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """An endless, seeded stream of ``(x_data [B, 2], {"labels": [B]})``, after ``skip`` batches (resume);
        process ``shard = (rank, world)`` gets its share of the rows of each batch."""
        generator = torch.Generator().manual_seed(seed)
        for _ in range(skip):  # cheap: replaying the draws puts the generator exactly where the run left it
            self.mixture.sample(batch_size, generator)
        while True:
            points, labels = self.mixture.sample(batch_size, generator)
            yield shard_rows(points.to(device), {"labels": labels.to(device)}, shard)

    def report(
        self, run_dir: Path, student: nn.Module | None, teacher: nn.Module, console: Console | None = None
    ) -> dict[str, Any]:
        """Energy distances of each sample set to the true mixture, ``metrics.json`` and ``scatter.png``."""
        n = self.recipe.output.eval_samples
        generator = torch.Generator().manual_seed(EVAL_SEED)
        truth, labels = self.mixture.sample(n, generator)
        second_truth, _ = self.mixture.sample(n, generator)
        noise = torch.randn(n, 2, generator=generator)
        device = next(teacher.parameters()).device
        cond = {"labels": labels.to(device)}

        def draw(model: nn.Module, settings: SamplerSettings) -> Tensor:
            sampler_gen = torch.Generator(device=device).manual_seed(EVAL_SEED + settings.nfe)
            return sample(model, noise.to(device), cond, settings, generator=sampler_gen).float().cpu()  # type: ignore[arg-type]

        sets = {"teacher_50": draw(teacher, TEACHER_MULTI_STEP), "teacher_1": draw(teacher, TEACHER_ONE_STEP)}
        if student is not None:
            for nfe in (1, 2, 4):
                sets[f"student_{nfe}"] = draw(student, sampler_settings(self.recipe.sampler, nfe))
        metrics: dict[str, Any] = {
            "energy_distance": {name: energy_distance(points, truth) for name, points in sets.items()},
            "floor": energy_distance(second_truth, truth),
            "eval_samples": n,
            "eval_seed": EVAL_SEED,
            "data": self.recipe.data.model_dump(mode="json"),
        }
        metrics["outputs"] = {"metrics": str(run_dir / "metrics.json"), "scatter": str(run_dir / "scatter.png")}
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
        _scatter(run_dir / "scatter.png", truth, sets, metrics)
        return metrics

    def summary_table(self, metrics: dict[str, Any]) -> Table:
        """The energy distances of a run as a table (the CLI prints it)."""
        return summary_table(metrics, self.recipe.name)


def summary_table(metrics: dict[str, Any], title: str) -> Table:
    """The energy distances of a run as a table (the CLI prints it)."""
    table = Table(title=f"{title}: energy distance to the true mixture (lower is better)")
    table.add_column("samples")
    table.add_column("energy distance", justify="right")
    for name, value in metrics["energy_distance"].items():
        table.add_row(name.replace("_", ", NFE "), f"{value:.4f}")
    table.add_row("floor (two true sets)", f"{metrics['floor']:.4f}")
    return table


def _scatter(path: Path, truth: Tensor, sets: dict[str, Tensor], metrics: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("data", truth, metrics["floor"])]
    titles = {"teacher_50": "teacher, 50 steps", "teacher_1": "teacher, 1 step", "student_1": "student, 1 step"}
    panels += [(titles[k], sets[k], metrics["energy_distance"][k]) for k in titles if k in sets]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), sharex=True, sharey=True)
    lim = float(truth.abs().max()) * 1.25
    for ax, (title, points, distance) in zip(axes, panels, strict=True):
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4)
        label = "floor" if title == "data" else "energy distance"
        ax.set_title(f"{title}\n{label} {distance:.4f}", fontsize=10)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
