"""How exact is the shapes detector? Per-object accuracy on rendered scenes, and GenEval scores of reference images.

Measured, at 32x32 unless said otherwise:

* ``objects``: 2,000 scenes from ``sample_scene`` (all six tasks, seed 7001, used nowhere else); every drawn
  object is matched to the detection with the same box; shape, colour and box accuracy, plus detections that
  match no object (false positives). The same on 500 scenes at 64x64.
* ``geneval``: the full GenEval protocol (generate_images -> score_folder -> summarize) on the default shapes suite
  (553 prompts, 4 images a prompt) for: the renderer itself (target >= 0.99), all-black images and uniform-noise
  images (targets <= 0.05), and, for information, the renderer's images plus Gaussian pixel noise (sigma 16 of 255),
  which shows how the score degrades on imperfect images.

Run (CPU, one process, about 40 s):

    PYTHONPATH=. python bench/geneval_detector.py [--out bench/results/geneval_detector.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from apex_cli.data import shapes
from apex_cli.eval import geneval
from apex_cli.eval.detectors import ShapesDetector

OBJECT_SEED = 7001
NOISE_SEED = 7002


def object_accuracy(n_images: int, size: int, seed: int) -> dict:
    """Match every drawn object to the detection with the same box and compare shape and colour."""
    detector = ShapesDetector()
    rng = np.random.default_rng(seed)
    objects = shape_ok = colour_ok = found = extra = 0
    min_score = 1.0
    start = time.perf_counter()
    for _ in range(n_images):
        scene = shapes.sample_scene(rng, None, size)
        detections = [d for dets in detector.detect(shapes.render(scene, size)).values() for d in dets]
        boxes = {o.box for o in scene.objects}
        extra += sum(d.box not in boxes for d in detections)
        for obj in scene.objects:
            objects += 1
            match = [d for d in detections if d.box == obj.box]
            if match:
                found += 1
                shape_ok += match[0].class_name == obj.shape
                colour_ok += match[0].color == obj.color
                min_score = min(min_score, match[0].score)
    seconds = time.perf_counter() - start
    return {
        "images": n_images,
        "size": size,
        "seed": seed,
        "objects": objects,
        "box_found": found / objects,
        "shape_accuracy": shape_ok / objects,
        "color_accuracy": colour_ok / objects,
        "false_positives": extra,
        "min_score_of_matched": min_score,
        "ms_per_image": 1000 * seconds / n_images,
    }


def geneval_scores(images_per_prompt: int) -> dict:
    """The GenEval score of the renderer, of black images and of uniform noise on the default shapes suite."""
    suite = shapes.prompt_suite()
    noise_rng = np.random.default_rng(NOISE_SEED)
    generators = {
        "renderer": lambda prompt, seeds: [shapes.render_prompt(prompt, s) for s in seeds],
        "renderer_plus_noise16": lambda prompt, seeds: [
            np.clip(shapes.render_prompt(prompt, s) + noise_rng.normal(0, 16, (32, 32, 3)), 0, 255).astype(np.uint8)
            for s in seeds
        ],
        "black": lambda prompt, seeds: [np.zeros((32, 32, 3), np.uint8) for _ in seeds],
        "uniform_noise": lambda prompt, seeds: [noise_rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in seeds],
    }
    results = {}
    with tempfile.TemporaryDirectory(prefix="apex-geneval-bench-") as tmp:
        for name, generate in generators.items():
            outdir = Path(tmp) / name
            start = time.perf_counter()
            geneval.generate_images(
                suite, outdir, geneval.one_prompt_at_a_time(generate), images_per_prompt=images_per_prompt
            )
            rows = geneval.score_folder(outdir, ShapesDetector())
            summary = geneval.summarize(rows)
            results[name] = {
                "overall": summary["overall"],
                "tasks": {tag: task["accuracy"] for tag, task in summary["tasks"].items()},
                "images": summary["total_images"],
                "seconds": time.perf_counter() - start,
            }
    return {"prompts": len(suite), "images_per_prompt": images_per_prompt, "by_generator": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "geneval_detector.json")
    args = parser.parse_args()

    objects = [object_accuracy(2000, 32, OBJECT_SEED), object_accuracy(500, 64, OBJECT_SEED)]
    scores = geneval_scores(images_per_prompt=4)
    record = {
        "objects": objects,
        "geneval": scores,
        "targets": {
            "shape_and_color_accuracy": ">= 0.995",
            "renderer_geneval": ">= 0.99",
            "black_and_noise": "<= 0.05",
        },
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")

    console = Console()
    table = Table(title="Shapes detector on rendered objects")
    for column in ("images", "size", "objects", "box found", "shape acc.", "colour acc.", "false pos.", "ms/image"):
        table.add_column(column, justify="right")
    for row in objects:
        table.add_row(
            str(row["images"]),
            f"{row['size']}x{row['size']}",
            str(row["objects"]),
            f"{row['box_found']:.4%}",
            f"{row['shape_accuracy']:.4%}",
            f"{row['color_accuracy']:.4%}",
            str(row["false_positives"]),
            f"{row['ms_per_image']:.2f}",
        )
    console.print(table)
    table = Table(
        title=f"GenEval on the shapes suite ({scores['prompts']} prompts x {scores['images_per_prompt']} images)"
    )
    table.add_column("generator")
    for tag in shapes.TASKS:
        table.add_column(tag, justify="right")
    table.add_column("overall", justify="right")
    for name, result in scores["by_generator"].items():
        table.add_row(name, *(f"{result['tasks'][t]:.4f}" for t in shapes.TASKS), f"{result['overall']:.5f}")
    console.print(table)
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
