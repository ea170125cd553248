"""Speed of `apex sample` on a shapes student at NFE 1, batch 16: end to end, and the same images three ways.

Rows (each the median of ``--repeats`` timed runs after one warm-up; text encoding is part of every run):

- ``apex sample``: what the command does after loading the model: generate the batch (its prompt cache emptied
  first), write one PNG an image, the grid and the manifest into a fresh folder (``write_samples``).
- ``generate()``: the images alone, as uint8 arrays (no files).
- ``exported pipeline``: the student exported with ``apex export --format diffusers`` into a temporary folder and
  loaded with diffusers' own ``DiffusionPipeline.from_pretrained``, called on the same prompts and seeds (PIL
  output). Its images equal ``apex sample``'s; this row shows the exported folder costs no speed.

Model loading (checkpoint to a ready model, first imports of diffusers / transformers included) is timed once and
reported apart, with the machine's load average (other processes slow every row).

    python bench/sample_speed.py --ckpt runs/apex-b/checkpoints/step_0000300
    python bench/sample_speed.py --ckpt runs/demo --batch 16 --repeats 5 --threads 2

Writes bench/results/sample_speed.json and prints a table. Nothing is written next to the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from apex_cli.data import shapes
from apex_cli.eval.generate import generate
from apex_cli.export.loading import load_model, quiet_libraries, resolve_source, settings_from_record
from apex_cli.export.samples import write_samples
from apex_cli.export.writer import export_checkpoint
from apex_cli.train.checkpoint import atomic_write_text

ROOT = Path(__file__).resolve().parent


def images_per_second(run: Callable[[], None], images: int, repeats: int) -> tuple[float, list[float]]:
    """Median images per second of ``run`` over ``repeats`` timed calls (after one warm-up), and every call's value."""
    speeds = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        run()
        if i:
            speeds.append(images / (time.perf_counter() - start))
    return statistics.median(speeds), speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="student run, checkpoint directory or export folder")
    parser.add_argument("--nfe", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="images a run (one forward batch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sample_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    loaded = load_model(resolve_source(args.ckpt))
    load_seconds = time.perf_counter() - start
    model = loaded.model
    settings = settings_from_record(loaded.sampler, args.nfe)
    stream = shapes.training_stream(1, size=model.image_size)
    prompts = [next(stream)[0] for _ in range(args.batch)]
    seeds = list(range(args.batch))

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)

        def apex_sample() -> None:
            model.clear_text_cache()
            write_samples(loaded, prompts, 1, 0, settings, folder / "samples", batch_size=args.batch)

        def generate_only() -> None:
            model.clear_text_cache()
            generate(model, prompts, seeds, settings)

        runs = {"apex sample (PNGs, grid, manifest)": apex_sample, "generate() (arrays only)": generate_only}
        if not loaded.source.is_export:
            from diffusers import DiffusionPipeline

            export = export_checkpoint(args.ckpt, "diffusers", folder / "export")
            with quiet_libraries():
                pipe = DiffusionPipeline.from_pretrained(export.out, trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)

            def exported_pipeline() -> None:
                pipe(prompts, num_inference_steps=args.nfe, generator=[torch.Generator().manual_seed(s) for s in seeds])

            runs["exported diffusers pipeline"] = exported_pipeline
        results = {}
        for name, run in runs.items():
            median, speeds = images_per_second(run, args.batch, args.repeats)
            results[name] = {"images_per_second": round(median, 2), "runs": [round(s, 2) for s in speeds]}

    record = {
        "checkpoint": str(args.ckpt),
        "resolved": str(loaded.source.path),
        "nfe": args.nfe,
        "sampler": settings.style,
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": args.threads,
        "model_load_seconds": round(load_seconds, 2),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine slows every row
        "torch": torch.__version__,
        "sets": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")

    table = Table(title=f"apex sample speed: NFE {args.nfe}, batch {args.batch}, median of {args.repeats}")
    table.add_column("path")
    table.add_column("images/s", justify="right")
    table.add_column("runs", justify="right")
    for name, row in results.items():
        table.add_row(name, f"{row['images_per_second']:.1f}", " ".join(f"{s:.1f}" for s in row["runs"]))
    console = Console()
    console.print(table)
    console.print(f"model load (imports included): {load_seconds:.2f} s  ->  {args.out}")


if __name__ == "__main__":
    main()
