"""Package a trained shapes teacher into apex (apex_cli/weights/<name>/) with a card written from measurements.

    python bench/ship_teacher.py runs/shapes-teacher-cpu                    # its final/ (or latest) checkpoint
    python bench/ship_teacher.py runs/shapes-teacher-cpu --checkpoint runs/shapes-teacher-cpu/checkpoints/step_0005000
    python bench/ship_teacher.py runs/shapes-teacher-cpu --suite quick      # the card on the 60-prompt quick suite

It scores the checkpoint on the full GenEval-shapes suite (4 images a prompt, seed 0) at 50 / 4 / 1 Euler steps
with `apex eval geneval` (resumable: an interrupted evaluation continues where it stopped; with `--suite quick`
the report rows below are the card's scores), reads the training
time from the run's metrics.jsonl, and writes, atomically: model.safetensors (the EMA weights), recipe.yaml (the
run's recipe with train.steps = the checkpoint's step, so the command on the card reproduces exactly these
weights), meta.json, scores.json, CARD.md and report-teacher.json (the teacher rows of the distillation report,
quick suite, so `make demo` need not sample the teacher at 50 guided steps again).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console

from apex_cli import __version__
from apex_cli.config import dump_recipe, validate_recipe
from apex_cli.data.shapes import QUICK_COUNTS
from apex_cli.train.checkpoint import SHIPPED_DIR, latest_checkpoint, read_checkpoint, weights_stem
from apex_cli.train.shapes import write_teacher_report

NFES = (50, 4, 1)
PROMPTS = {"full": "shapes", "quick": "shapes-quick"}
SUITES = {
    "full": "Full suite (553 prompts)",
    "quick": "Quick suite (60 prompts, 10 a task; the full suite, 553 prompts, was not measured for this card: at"
    " 50 guided steps it takes over an hour on these 2 cores; `python bench/ship_teacher.py RUN --suite full` does it,"
    " resumably)",
}
TASK_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def training_seconds(metrics_jsonl: Path, last_step: int) -> tuple[float, float]:
    """``(training seconds, seconds left out)`` for steps 1..``last_step``: ``last_step`` x the mean step time.

    ``seconds`` in metrics.jsonl is wall time since the (re)start of the process, logged every 10 steps. Step
    times come from consecutive records of one process; an interval slower than 3x the median (the process was
    paused, or shared the CPU with another job) counts as a median one, and its excess is reported as left out.
    """
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    records = [r for r in records if r["step"] <= last_step]
    per_step = [
        (b["seconds"] - a["seconds"]) / (b["step"] - a["step"])
        for a, b in itertools.pairwise(records)
        if b["step"] > a["step"] and b["seconds"] > a["seconds"]
    ]
    median = statistics.median(per_step)
    capped = [min(t, median) if t > 3 * median else t for t in per_step]
    mean_raw, mean_capped = statistics.fmean(per_step), statistics.fmean(capped)
    return last_step * mean_capped, last_step * (mean_raw - mean_capped)


def evaluate(checkpoint: Path, out: Path, threads: int) -> dict[str, dict]:
    """GenEval-shapes, full suite, 4 images a prompt, at 50 / 4 / 1 steps: ``apex eval geneval --json`` (resumable)."""
    command = [
        sys.executable,
        "-m",
        "apex_cli",
        "eval",
        "geneval",
        "--ckpt",
        str(checkpoint),
        "--nfe",
        ",".join(map(str, NFES)),
        "--prompts",
        "shapes",
        "--n",
        "4",
        "--seed",
        "0",
        "--out",
        str(out),
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env)
    return json.loads(result.stdout)["scores"]


def card(
    name: str, recipe_name: str, step: int, seed: int, seconds: float, excluded: float, scores: dict, suite: str
) -> str:
    rows = []
    for nfe in NFES:
        summary = scores[f"NFE {nfe}"]
        tasks = " | ".join(f"{summary['tasks'][t]['accuracy']:.3f}" for t in TASK_ORDER)
        rows.append(f"| {nfe} | {summary['overall']:.3f} | {tasks} |")
    header = " | ".join(TASK_ORDER)
    images = scores[f"NFE {NFES[0]}"]["total_images"]
    return f"""# {name}

The text-to-image teacher of the built-in shapes world (32x32 pixels, pixel-space UNet with cross-attention,
1.7M parameters, frozen random text encoder), trained from scratch by flow matching on a CPU. apex's shapes
distillation recipes start from it: `model.init: shipped:{name}`.

## Reproduce

```bash
apex distill --recipe {recipe_name} --set train.steps={step}
```

Recipe: `recipe.yaml` in this folder (= `recipes/{recipe_name}.yaml` with `train.steps: {step}`), seed
{seed}. The learning rate is constant after warm-up, so stopping a longer run at step {step} gives the same
weights; the run may be interrupted and continued with `--resume`. These are its EMA weights.

Training time: {seconds / 3600:.2f} h on 2 CPU cores ({step} steps x the mean logged step time; {excluded / 60:.0f} min
of pauses and CPU sharing left out).

## GenEval-shapes

{SUITES[suite]}: {images} images per NFE (4 a prompt, seed 0), Euler steps, guidance
{scores.get("guidance", 0.0)}, the exact shapes detector
(`apex eval geneval --ckpt shipped:{name} --nfe 50,4,1 --prompts {PROMPTS[suite]} --n 4`):

| NFE | overall | {header} |
|---|---|{"---|" * len(TASK_ORDER)}
{chr(10).join(rows)}

What limits it: compute. A step of batch 64 takes {seconds / step:.1f} s on these 2 CPU cores, so the whole
run is {seconds / 3600:.1f} h; the small UNet was chosen because it reached the lowest flow-matching loss per
CPU-minute of the candidates (bench/results/shapes_candidates.json), not because it is the best model.

apex {__version__}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the teacher's run directory")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint of the run (default: final/ or the latest)")
    parser.add_argument("--name", default="shapes-teacher")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--suite", choices=("full", "quick"), default="full", help="the card's GenEval-shapes suite (default: full)"
    )
    args = parser.parse_args()

    checkpoint = args.checkpoint or latest_checkpoint(args.run)
    if checkpoint is None:
        sys.exit(f"error: {args.run} has no checkpoint")
    directory, recipe, meta = read_checkpoint(checkpoint)
    if meta.get("kind") != "teacher":
        sys.exit(f"error: {directory} is a {meta.get('kind')} checkpoint, not a teacher")
    step = int(meta["step"])
    start = time.perf_counter()
    seconds, excluded = training_seconds(args.run / "metrics.jsonl", step)
    raw = yaml.safe_load((directory / "recipe.yaml").read_text())
    raw["train"]["steps"] = step
    shipped_recipe = validate_recipe(raw, str(directory / "recipe.yaml"), [])
    target = SHIPPED_DIR / args.name
    SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=SHIPPED_DIR, prefix=f".{args.name}.") as tmp:
        staging = Path(tmp) / args.name
        staging.mkdir()
        shutil.copyfile(directory / f"{weights_stem(directory)}.safetensors", staging / "model.safetensors")
        (staging / "recipe.yaml").write_text(dump_recipe(shipped_recipe))
        (staging / "meta.json").write_text(json.dumps({**meta, "step": step, "kind": "teacher"}, indent=2) + "\n")
        print("measuring the teacher rows of the shapes distillation report (quick suite) ...", file=sys.stderr)
        rows = json.loads(write_teacher_report(staging, Console(stderr=True)).read_text())["rows"]
        if args.suite == "full":
            scores = evaluate(directory, args.run / "ship-geneval" / directory.name, args.threads)
        else:  # the report rows are the quick suite at 4 images a prompt
            images = sum(QUICK_COUNTS.values()) * 4
            scores = {
                f"NFE {nfe}": {
                    "overall": rows[f"teacher_{nfe}"]["overall"],
                    "tasks": {t: {"accuracy": a} for t, a in rows[f"teacher_{nfe}"]["tasks"].items()},
                    "total_images": images,
                    "fid": rows[f"teacher_{nfe}"]["fid"],
                }
                for nfe in NFES
            }
        scores.update(guidance=recipe.sampler.guidance, suite=args.suite)
        (staging / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        (staging / "CARD.md").write_text(
            card(args.name, recipe.name, step, recipe.train.seed, seconds, excluded, scores, args.suite)
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    print(f"shipped {directory} (step {step}) as {target} in {time.perf_counter() - start:.0f} s")
    for nfe in NFES:
        print(f"  GenEval-shapes ({args.suite} suite) at NFE {nfe}: {scores[f'NFE {nfe}']['overall']:.3f}")


if __name__ == "__main__":
    main()
