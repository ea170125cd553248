"""The shapes task: the renderer's (prompt, image) stream, the shapes UNet, and a GenEval report."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor, nn

from apex_cli.config import Recipe
from apex_cli.core.sampler import SamplerSettings
from apex_cli.data import shapes
from apex_cli.eval.detectors import ShapesDetector
from apex_cli.eval.generate import generate, generate_fn
from apex_cli.eval.geneval import generate_images, one_prompt_at_a_time, score_folder, summarize
from apex_cli.models.shapes import ShapesModel, images_to_tensor
from apex_cli.train.checkpoint import atomic_write_text
from apex_cli.train.sampling import TEACHER_MULTI_STEP, sampler_settings
from apex_cli.train.tasks import WHOLE, Shard

SHORT_TASK_NAMES = {
    "single_object": "single",
    "two_object": "two",
    "counting": "count",
    "position": "pos",
    "color_attr": "attr",
}
REPORT_SEED = 0
REPORT_IMAGES_PER_PROMPT = 4  # GenEval's protocol
REPORT_BATCH = 240  # images a forward batch
REPORT_FID_REFERENCE = 2000  # renderer images behind the FID reference statistics
TEACHER_REPORT_NFE = (50, 4, 1)
REPORT_COUNTS = shapes.QUICK_COUNTS  # prompts a task: the quick suite, 60 prompts
TEACHER_REPORT_CACHE = "report-teacher.json"  # the teacher's report rows, next to its weights


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
        self, model: nn.Module, batch_size: int, seed: int, device: torch.device, skip: int = 0, shard: Shard = WHOLE
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """``(images in [-1, 1] [B, 3, H, W], cached text embeddings)`` from the renderer.

        Batch ``k`` is rendered from its own seed ``(seed, k)``, so a resumed run starts at batch ``skip`` at once;
        process ``shard = (rank, world)`` gets its share of the rows.
        """
        size = self.recipe.data.image_size  # type: ignore[union-attr]
        for prompts, images in shapes.training_batches(seed, batch_size, size, skip):
            rank, world = shard
            rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
            cond = model.encode_prompts(prompts[rows])  # type: ignore[operator]
            yield images_to_tensor(images[rows]).to(device), {k: v.to(device) for k, v in cond.items()}

    def report(
        self, run_dir: Path, student: nn.Module | None, teacher: nn.Module, console: Console | None = None
    ) -> dict[str, Any]:
        """GenEval-shapes (quick suite, 4 images a prompt), FID and images per second for each sample set.

        Sets: the renderer itself (the ceiling of both metrics at this sample size), the teacher at NFE 50 / 4 / 1
        (Euler, the teacher's guidance) and, for a distillation run, the student at NFE 1 / 2 / 4 (its recipe's
        sampler). Also writes ``samples.png``: one row per GenEval task, columns teacher 50, teacher 1, student 1.
        A distillation run reuses the teacher rows stored beside its weights when they match (``report-teacher.json``,
        see :func:`write_teacher_report`): they depend only on the teacher, suite, seeds and guidance.
        """
        guidance = self.teacher_guidance()
        sets: dict[str, tuple[nn.Module, SamplerSettings]] = {
            f"teacher_{nfe}": (teacher, replace(TEACHER_MULTI_STEP, nfe=nfe, guidance=guidance))
            for nfe in TEACHER_REPORT_NFE
        }
        cached = self.cached_teacher_rows(guidance) if student is not None else {}
        if student is not None:
            sets.update({f"student_{nfe}": (student, sampler_settings(self.recipe.sampler, nfe)) for nfe in (1, 2, 4)})
        rows = {**cached, **self.measure(run_dir, {k: v for k, v in sets.items() if k not in cached}, console)}
        results = {name: rows[name] for name in ("renderer", *sets)}
        grid = run_dir / "samples.png"
        _grid(grid, {k: v for k, v in sets.items() if k in ("teacher_50", "teacher_1", "student_1")})
        metrics: dict[str, Any] = {
            "geneval": results,
            "suite": f"GenEval-shapes, {sum(REPORT_COUNTS.values())} prompts x {REPORT_IMAGES_PER_PROMPT} images",
            "fid_reference": f"renderer, {REPORT_FID_REFERENCE} images (shapes features)",
            "teacher_guidance": guidance,
            "outputs": {"metrics": str(run_dir / "metrics.json"), "samples": str(grid)},
        }
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
        return metrics

    def measure(
        self, run_dir: Path, sets: dict[str, tuple[nn.Module, SamplerSettings]], console: Console | None = None
    ) -> dict[str, dict[str, Any]]:
        """Report rows (GenEval-shapes overall and per task, FID, images/s) for the renderer and each sample set.

        Images go to ``run_dir/geneval/<set>/``; a set's folder is cleared first, so its timing is always fresh.
        """
        from apex_cli.eval.fid import compute_fid, shapes_reference

        rows = shapes.prompt_suite(seed=0, counts=REPORT_COUNTS)
        size = self.recipe.data.image_size  # type: ignore[union-attr]
        reference = shapes_reference(seed=0, n_images=REPORT_FID_REFERENCE, image_size_px=size)
        results: dict[str, dict[str, Any]] = {}
        folders = {"renderer": run_dir / "geneval" / "renderer"}
        with _report_progress(console) as progress:
            bar = progress.add_task("renderer", total=len(rows))
            render = one_prompt_at_a_time(_render)
            generate_images(rows, folders["renderer"], render, REPORT_IMAGES_PER_PROMPT, REPORT_SEED)
            progress.update(bar, completed=len(rows))
            results["renderer"] = {"images_per_second": None}
            for name, (model, settings) in sets.items():
                folders[name] = run_dir / "geneval" / name
                shutil.rmtree(folders[name], ignore_errors=True)  # a fresh timing every report
                timed = _Timed(generate_fn(model, settings))
                bar = progress.add_task(name.replace("_", ", NFE "), total=len(rows))
                generate_images(
                    rows,
                    folders[name],
                    timed,
                    REPORT_IMAGES_PER_PROMPT,
                    REPORT_SEED,
                    progress=lambda done, _total, bar=bar: progress.update(bar, completed=done),
                    batch_size=REPORT_BATCH,
                )
                results[name] = {"images_per_second": round(timed.images / timed.seconds, 2)}
            bar = progress.add_task("GenEval + FID", total=len(folders))
            for name, folder in folders.items():
                summary = summarize(score_folder(folder, ShapesDetector()))
                fid = compute_fid(folder, reference, features="shapes")
                results[name].update(_compact(summary), fid=round(fid.fid, 3))
                progress.advance(bar)
        return results

    def teacher_report_key(self, checkpoint: Path, guidance: float) -> dict[str, Any]:
        """What the teacher's report rows depend on: its weights, the suite, the seeds, guidance and FID reference."""
        from apex_cli.train.checkpoint import weights_sha256, weights_stem

        return {
            "weights_sha256": weights_sha256(checkpoint, weights_stem(checkpoint)),
            "suite_counts": dict(REPORT_COUNTS),
            "images_per_prompt": REPORT_IMAGES_PER_PROMPT,
            "seed": REPORT_SEED,
            "nfe": list(TEACHER_REPORT_NFE),
            "guidance": guidance,
            "fid_reference": REPORT_FID_REFERENCE,
            "image_size": self.recipe.data.image_size,  # type: ignore[union-attr]
        }

    def cached_teacher_rows(self, guidance: float) -> dict[str, dict[str, Any]]:
        """The teacher's rows measured when it was shipped (``report-teacher.json`` beside its weights), if that file
        was measured on exactly this teacher, suite, seeds, guidance and FID reference; else ``{}`` (measure them).

        Sampling the teacher at 50 guided steps is most of a report's time, and its rows only depend on the key.
        """
        from apex_cli.train.checkpoint import resolve_checkpoint

        if self.recipe.model.init is None:
            return {}
        checkpoint = resolve_checkpoint(self.recipe.model.init)
        path = checkpoint / TEACHER_REPORT_CACHE
        if not path.is_file():
            return {}
        cache = json.loads(path.read_text())
        if cache.get("key") != self.teacher_report_key(checkpoint, guidance):
            return {}
        return {name: {**row, "cached": str(path)} for name, row in cache["rows"].items()}

    def teacher_guidance(self) -> float:
        """The classifier-free guidance the teacher samples with: its own recipe's ``sampler.guidance``."""
        if self.recipe.model.init is None:
            return self.recipe.sampler.guidance
        from apex_cli.train.checkpoint import read_checkpoint

        _, init_recipe, meta = read_checkpoint(self.recipe.model.init)
        return init_recipe.sampler.guidance if meta.get("kind") == "teacher" else 0.0

    def summary_table(self, metrics: dict[str, Any]) -> Table:
        """GenEval-shapes overall and per task, FID and images per second for each sample set."""
        table = Table(  # fits 80 columns
            box=box.SIMPLE_HEAD,
            collapse_padding=True,
            pad_edge=False,
            caption_justify="left",
            title=f"{self.recipe.name}: {metrics['suite']}; FID vs {metrics['fid_reference']}",
        )
        tasks = list(shapes.TASKS)
        table.add_column("samples", no_wrap=True)
        table.add_column("NFE", no_wrap=True)
        table.add_column("GenEval", justify="right")
        for task in tasks:
            table.add_column(SHORT_TASK_NAMES.get(task, task), justify="right")
        table.add_column("FID", justify="right")
        table.add_column("img/s", justify="right")
        cached = sorted({score["cached"] for score in metrics["geneval"].values() if "cached" in score})
        table.caption = "renderer: the scene renderer itself, the ceiling of both metrics at this sample size"
        if cached:
            table.caption += (
                f"\n* measured when the teacher was shipped, same suite, seeds and code: {', '.join(cached)}"
            )
        for name, score in metrics["geneval"].items():
            speed = score.get("images_per_second")
            sampler, _, nfe = name.partition("_")
            table.add_row(
                sampler,
                nfe + (" *" if "cached" in score else ""),
                f"{score['overall']:.3f}",
                *(f"{score['tasks'][t]:.2f}" for t in tasks),
                f"{score['fid']:.1f}",
                "-" if speed is None else f"{speed:.1f}",
            )
        return table


def _report_progress(console: Console | None) -> Progress:
    """One bar a sample set (prompts done), then one for scoring; silent without a console."""
    return Progress(
        TextColumn("[bold]report[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=console is None,
    )


class _Timed:
    """A ``generate_fn`` that counts its images and the seconds spent generating them."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.images, self.seconds = fn, 0, 0.0

    def __call__(self, prompts: list[str], seeds: list[int]) -> Any:
        start = time.perf_counter()
        images = self.fn(prompts, seeds)
        self.seconds += time.perf_counter() - start
        self.images += len(images)
        return images


def _render(prompt: str, seeds: list[int]) -> list[np.ndarray]:
    return [shapes.render_prompt(prompt, s) for s in seeds]


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


def write_teacher_report(checkpoint: str | Path, console: Console | None = None) -> Path:
    """Measure a shapes teacher's report rows (NFE 50 / 4 / 1 with its guidance) and store them beside its weights
    as ``report-teacher.json``, keyed by :meth:`ShapesTask.teacher_report_key`; distillation reports reuse them.
    """
    import tempfile

    from apex_cli import __version__
    from apex_cli.train.checkpoint import load_as_base, read_checkpoint

    directory, recipe, _ = read_checkpoint(checkpoint)
    task = ShapesTask(recipe)
    model = task.build_model()
    load_as_base(model, directory)  # exactly the teacher a distillation run reports
    model.eval()
    guidance = recipe.sampler.guidance
    sets = {
        f"teacher_{nfe}": (model, replace(TEACHER_MULTI_STEP, nfe=nfe, guidance=guidance)) for nfe in TEACHER_REPORT_NFE
    }
    with tempfile.TemporaryDirectory(prefix="apex-teacher-report-") as tmp:
        rows = task.measure(Path(tmp), sets, console)
    rows.pop("renderer")
    path = directory / TEACHER_REPORT_CACHE
    cache = {"key": task.teacher_report_key(directory, guidance), "rows": rows, "apex": __version__}
    atomic_write_text(path, json.dumps(cache, indent=2) + "\n")
    return path
