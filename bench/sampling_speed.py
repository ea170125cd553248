"""Sampling speed of the shapes models: the one-step student against the 50-step teacher, end to end.

Each run generates one batch of images from prompts (text encoding with an empty cache, the sampler, the
conversion to uint8 images) and counts images per second; the median of ``--repeats`` runs (after one warm-up)
is reported for each sample set, and the ratio of the student at NFE 1 to the teacher at NFE 50.

    python bench/sampling_speed.py --student runs/shapes-apex-cpu
    python bench/sampling_speed.py --teacher shipped:shapes-teacher --student PATH --batch 16 --repeats 5

Writes bench/results/sampling_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from apex_cli.data import shapes
from apex_cli.eval.generate import generate
from apex_cli.train.checkpoint import atomic_write_text
from apex_cli.train.sampling import checkpoint_sampler
from apex_cli.train.tasks import load_checkpoint_model

ROOT = Path(__file__).resolve().parent


def images_per_second(model, settings, prompts: list[str], repeats: int) -> tuple[float, list[float]]:
    """Median images per second over ``repeats`` timed runs (one warm-up run first), and every run's value."""
    seeds = list(range(len(prompts)))
    speeds = []
    for i in range(repeats + 1):
        model.clear_text_cache()  # text encoding is part of every run
        start = time.perf_counter()
        with torch.no_grad():
            generate(model, prompts, seeds, settings)
        if i:
            speeds.append(len(prompts) / (time.perf_counter() - start))
    return statistics.median(speeds), speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="shipped:shapes-teacher", help="teacher checkpoint")
    parser.add_argument("--student", required=True, help="student checkpoint or run directory")
    parser.add_argument("--batch", type=int, default=16, help="images a run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sampling_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher, teacher_recipe, teacher_meta = load_checkpoint_model(args.teacher)
    student, recipe, meta = load_checkpoint_model(args.student)
    stream = shapes.training_stream(1, size=teacher.image_size)
    prompts = [next(stream)[0] for _ in range(args.batch)]
    sets = {
        "teacher, NFE 50": (teacher, checkpoint_sampler(teacher_recipe, teacher_meta, 50)),
        "teacher, NFE 1": (teacher, checkpoint_sampler(teacher_recipe, teacher_meta, 1)),
        "student, NFE 1": (student, checkpoint_sampler(recipe, meta, 1)),
        "student, NFE 4": (student, checkpoint_sampler(recipe, meta, 4)),
    }
    results = {}
    for name, (model, settings) in sets.items():
        median, runs = images_per_second(model, settings, prompts, args.repeats)
        results[name] = {"images_per_second": round(median, 3), "runs": [round(s, 3) for s in runs]}
    ratio = results["student, NFE 1"]["images_per_second"] / results["teacher, NFE 50"]["images_per_second"]
    record = {
        "teacher": args.teacher,
        "student": args.student,
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__,
        "sets": results,
        "student_1_vs_teacher_50": round(ratio, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")

    table = Table(title=f"Sampling speed, batch {args.batch}, median of {args.repeats} (text encoding included)")
    table.add_column("samples")
    table.add_column("images/s", justify="right")
    table.add_column("runs", justify="right")
    for name, row in results.items():
        table.add_row(name, f"{row['images_per_second']:.2f}", " ".join(f"{s:.2f}" for s in row["runs"]))
    console = Console()
    console.print(table)
    console.print(f"student NFE 1 / teacher NFE 50: {ratio:.1f}x  ->  {args.out}")


if __name__ == "__main__":
    main()
