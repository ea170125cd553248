"""Speed and memory of APEX against its rivals on the shapes model: training steps, and sampling by NFE.

Training, for each method at one batch size (the recipes' 16 by default), each built exactly as `apex distill`
builds it (``apex_cli.train.memory.prepare_step``: the student, its EMA, the frozen teacher, the DMD2 fake score and
both optimizers; the weights' values do not change the cost, so nothing is loaded):

- step time: the median of ``--steps`` whole steps (fake-score updates, loss, backward, clip, AdamW, EMA) after
  ``--warmup`` untimed ones, and its ratio to a plain flow-matching step on the same model and batch;
- peak memory of one step, measured by torch's ``MemTracker`` (``measure_step_memory``, as the memory-estimate tests
  do), and its ratio to flow matching and to the DMD2 baseline; also the model states alone (parameters, gradients
  and optimizer moments held at the peak), which is what an extra network costs however small the batch: on the
  1.7M-parameter shapes UNet the activations dominate the peak, on a 20B model the states do;
- the same peak with ``hardware.gradient_checkpointing`` on for every method (each block keeps only its inputs, as
  the recipes of large models run): the activations shrink to what the networks' count and rows decide, which is the
  regime where an extra network shows; every network of a method (the fake score too) is checkpointed;
- forward passes a step: network calls and rows, with and without gradient, counted by forward hooks on every
  network the step evaluates.

Methods: flow matching (``shapes-apex-cpu``'s model with only mul rows, r = t, no targets, no EMA: the teacher's
objective at its least cost), APEX (``shapes-apex-cpu``), consistency, TwinFlow and DMD2 (their ``shapes-*-cpu``
recipes).

Sampling, end to end (prompts to uint8 images, text encoding included: the prompt cache is emptied before each run):
images per second of the teacher (Euler, its guidance, NFE 50 / 4 / 1) and of the student (the few-step sampler,
NFE 1 / 2 / 4), and the headline ratio student NFE 1 over teacher NFE 50. The student's weights do not change its
speed; without ``--student`` the student is the shipped teacher loaded as every distillation starts (E4a), sampled
with the student's sampler.

    python bench/speed.py                  # batch 16, 10 timed steps after 3, sampling batch 16, median of 5
    python bench/speed.py --quick          # 3 timed steps after 1, median of 2 (a couple of minutes)
    python bench/speed.py --student runs/shapes-apex-cpu

Writes bench/results/speed.json (``--quick``: speed-quick.json, atomically) and prints two tables; without ``--quick``
(and with the default ``--out``) it also rewrites them in docs/benchmarks.md (the ``<!-- bench:speed-training -->`` and
``<!-- bench:speed-sampling -->`` blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from docs_tables import DOCS, replace_block, to_markdown
from rich.console import Console
from rich.table import Table
from sample_speed import images_per_second

from apex_cli.config import Recipe, load_recipe
from apex_cli.data import shapes
from apex_cli.eval.generate import generate
from apex_cli.train.checkpoint import atomic_write_text, load_as_base, read_checkpoint
from apex_cli.train.memory import measure_step_memory, prepare_step
from apex_cli.train.sampling import TEACHER_MULTI_STEP, sampler_settings
from apex_cli.train.shapes import ShapesTask
from apex_cli.train.tasks import load_checkpoint_model

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "speed.json"
REPO = ROOT.parent
TEACHER = "shipped:shapes-teacher"
FLOW_MATCHING = [
    "method.roles={e2e: 0, mul: 1, any: 0, adv: 0}",
    "method.consistency_ratio=0",
    "method.estimate_order=0",
    "method.enhanced_ratio=0",
    "method.dist_match_coef=0",
    "method.reference=online",
]
METHODS: dict[str, tuple[str, list[str]]] = {
    "flow matching": ("shapes-apex-cpu", FLOW_MATCHING),
    "apex": ("shapes-apex-cpu", []),
    "consistency": ("shapes-consistency-cpu", []),
    "twinflow": ("shapes-twinflow-cpu", []),
    "dmd2": ("shapes-dmd2-cpu", []),
}
"""Method -> (recipe in recipes/, overrides)."""


def method_recipe(name: str, batch: int, threads: int, checkpointing: bool = False) -> Recipe:
    """The recipe of a benchmarked method at ``batch`` rows and ``threads`` CPU threads, optionally checkpointed."""
    recipe, overrides = METHODS[name]
    path = REPO / "recipes" / f"{recipe}.yaml"
    extra = [f"train.batch_size={batch}", f"hardware.num_threads={threads}"]
    extra += [f"hardware.gradient_checkpointing={str(checkpointing).lower()}"]
    return load_recipe(str(path), [*overrides, *extra])


class ForwardCounter:
    """Counts the forward calls and rows of each network (hooks on its denoiser), split by gradient mode."""

    def __init__(self, networks: dict[str, torch.nn.Module]) -> None:
        self.counts = {name: {"calls": 0, "rows": 0, "rows_with_grad": 0} for name in networks}
        self.handles = []
        for name, network in networks.items():
            module = getattr(network, getattr(network, "ADAPTED_MODULE", ""), network)
            self.handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name: str) -> Any:
        def count(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            rows = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)).shape[0]
            self.counts[name]["calls"] += 1
            self.counts[name]["rows"] += rows
            if torch.is_grad_enabled():
                self.counts[name]["rows_with_grad"] += rows

        return count

    def remove(self) -> None:
        """Take the hooks off."""
        for handle in self.handles:
            handle.remove()


def measure_training(name: str, batch: int, threads: int, warmup: int, steps: int) -> dict[str, Any]:
    """Step time, forward passes and peak memory of one method (see the module docstring)."""
    recipe = method_recipe(name, batch, threads)
    torch.set_num_threads(threads)
    prepared = prepare_step(recipe)
    for _ in range(warmup):
        prepared.step()
    counter = ForwardCounter(prepared.networks)
    prepared.step()  # the counted step (also a warm-up for the timed ones)
    counter.remove()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        prepared.step()
        times.append(time.perf_counter() - start)
    del prepared
    memory = measure_step_memory(recipe)
    checkpointed = measure_step_memory(method_recipe(name, batch, threads, checkpointing=True))
    fake = recipe.method.fake_score
    return {
        "recipe": METHODS[name][0],
        "overrides": METHODS[name][1],
        "median_step_seconds": statistics.median(times),
        "step_seconds": [round(t, 4) for t in times],
        "fake_score_updates": fake.updates if fake is not None else 0,
        "forwards": counter.counts,
        "forward_calls": sum(c["calls"] for c in counter.counts.values()),
        "forward_rows": sum(c["rows"] for c in counter.counts.values()),
        "peak_memory_bytes": memory["peak"],
        "state_memory_bytes": memory["parameters"] + memory["gradients"] + memory["optimizer"],
        "memory_bytes": memory,
        "peak_memory_bytes_checkpointed": checkpointed["peak"],
        "memory_bytes_checkpointed": checkpointed,
    }


def measure_sampling(student: str | None, batch: int, repeats: int, threads: int) -> dict[str, Any]:
    """Images per second, end to end, of the teacher at NFE 50 / 4 / 1 and the student at NFE 1 / 2 / 4."""
    torch.set_num_threads(threads)
    directory, teacher_recipe, _ = read_checkpoint(TEACHER)
    teacher = ShapesTask(teacher_recipe).build_model()
    load_as_base(teacher, directory)  # as every distillation starts: E4a's Emb2 := Emb1
    teacher.eval()
    if student is None:
        student_model, student_recipe = teacher, load_recipe(str(REPO / "recipes" / "shapes-apex-cpu.yaml"))
        student_weights = f"{TEACHER} loaded as a distillation starts (speed does not depend on the weights)"
    else:
        student_model, student_recipe, _ = load_checkpoint_model(student)
        student_weights = student
    guidance = teacher_recipe.sampler.guidance
    stream = shapes.training_stream(1, size=teacher.image_size)
    prompts = [next(stream)[0] for _ in range(batch)]
    seeds = list(range(batch))
    sets = {f"teacher_{nfe}": (teacher, replace(TEACHER_MULTI_STEP, nfe=nfe, guidance=guidance)) for nfe in (50, 4, 1)}
    sets |= {f"student_{nfe}": (student_model, sampler_settings(student_recipe.sampler, nfe)) for nfe in (1, 2, 4)}
    rows = {}
    for name, (model, settings) in sets.items():

        def run(model: Any = model, settings: Any = settings) -> None:
            model.clear_text_cache()
            generate(model, prompts, seeds, settings)

        median, speeds = images_per_second(run, batch, repeats)
        rows[name] = {
            "images_per_second": round(median, 2),
            "runs": [round(s, 2) for s in speeds],
            "nfe": settings.nfe,
            "style": settings.style,
            "guidance": settings.guidance,
        }
    ratio = rows["student_1"]["images_per_second"] / rows["teacher_50"]["images_per_second"]
    return {"batch": batch, "repeats": repeats, "student_weights": student_weights, "sets": rows, "ratio": ratio}


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _training_table(results: dict[str, dict[str, Any]], batch: int, steps: int) -> Table:
    table = Table(title=f"one training step, shapes UNet, batch {batch}, median of {steps}")
    table.caption = (
        "peak: one step's peak (MemTracker); ckpt: the same with hardware.gradient_checkpointing on for every "
        "network; states: parameters + gradients + optimizer moments held at the peak"
    )
    columns = (
        "method",
        "step (s)",
        "x flow matching",
        "peak MiB",
        "x flow matching",
        "x dmd2",
        "ckpt peak MiB",
        "x flow matching",
        "x dmd2",
        "states MiB",
        "x dmd2",
        "fwd calls",
        "rows",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, row in results.items():
        table.add_row(
            name,
            f"{row['median_step_seconds']:.3f}",
            f"{row['step_time_ratio']:.2f}",
            f"{row['peak_memory_bytes'] / 2**20:.1f}",
            f"{row['memory_ratio']:.2f}",
            _ratio(row["memory_ratio_to_dmd2"]),
            f"{row['peak_memory_bytes_checkpointed'] / 2**20:.1f}",
            f"{row['memory_ratio_checkpointed']:.2f}",
            _ratio(row["memory_ratio_to_dmd2_checkpointed"]),
            f"{row['state_memory_bytes'] / 2**20:.1f}",
            _ratio(row["state_memory_ratio_to_dmd2"]),
            str(row["forward_calls"]),
            str(row["forward_rows"]),
        )
    return table


def _sampling_table(sampling: dict[str, Any]) -> Table:
    table = Table(title=f"sampling, end to end, batch {sampling['batch']}, median of {sampling['repeats']}")
    for column in ("samples", "NFE", "images/s"):
        table.add_column(column, justify="left" if column == "samples" else "right")
    for name, row in sampling["sets"].items():
        table.add_row(name.split("_")[0], str(row["nfe"]), f"{row['images_per_second']:.2f}")
    table.caption = f"student NFE 1 / teacher NFE 50: {sampling['ratio']:.1f}x"
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 timed steps after 1, sampling median of 2")
    parser.add_argument("--batch", type=int, default=16, help="training rows a step (the recipes' batch)")
    parser.add_argument("--steps", type=int, help="timed steps a method (default 10; --quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3; --quick 1)")
    parser.add_argument("--sample-batch", type=int, default=16, help="images a sampling run")
    parser.add_argument("--repeats", type=int, help="timed sampling runs a set (default 5; --quick 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (flow matching first)")
    parser.add_argument("--student", help="a student run or checkpoint to sample (default: see the docstring)")
    parser.add_argument(
        "--out", type=Path, help="results JSON (default bench/results/speed.json; --quick: speed-quick.json)"
    )
    args = parser.parse_args()
    docs = not args.quick and args.out is None  # the page shows the full measurement only
    args.out = args.out or (ROOT / "results" / "speed-quick.json" if args.quick else DEFAULT_OUT)
    steps = args.steps or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    repeats = args.repeats or (2 if args.quick else 5)
    names = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in names if m not in METHODS]
    if unknown or names[0] != "flow matching":
        parser.error(f"--methods: known are {', '.join(METHODS)}, with 'flow matching' first; got {args.methods!r}")
    console = Console(stderr=True)

    training = {}
    for name in names:
        console.print(f"training step: {name} ...")
        training[name] = measure_training(name, args.batch, args.threads, warmup, steps)
    base = training["flow matching"]
    dmd2 = training.get("dmd2")
    for row in training.values():
        row["step_time_ratio"] = row["median_step_seconds"] / base["median_step_seconds"]
        row["memory_ratio"] = row["peak_memory_bytes"] / base["peak_memory_bytes"]
        row["memory_ratio_to_dmd2"] = row["peak_memory_bytes"] / dmd2["peak_memory_bytes"] if dmd2 else None
        row["state_memory_ratio_to_dmd2"] = row["state_memory_bytes"] / dmd2["state_memory_bytes"] if dmd2 else None
        checkpointed = row["peak_memory_bytes_checkpointed"]
        row["memory_ratio_checkpointed"] = checkpointed / base["peak_memory_bytes_checkpointed"]
        row["memory_ratio_to_dmd2_checkpointed"] = (
            checkpointed / dmd2["peak_memory_bytes_checkpointed"] if dmd2 else None
        )
    console.print("sampling ...")
    sampling = measure_sampling(args.student, args.sample_batch, repeats, args.threads)

    record = {
        "mode": "quick" if args.quick else "full",
        "batch": args.batch,
        "warmup": warmup,
        "steps": steps,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine slows every row
        "python": platform.python_version(),
        "torch": torch.__version__,
        "training": training,
        "sampling": sampling,
    }
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    out = Console(width=200)
    tables = {"training": _training_table(training, args.batch, steps), "sampling": _sampling_table(sampling)}
    for table in tables.values():
        out.print(table)
    out.print(f"-> {args.out}")
    if docs:
        run = (
            f"Machine: {record['machine']}, {args.threads} threads, load average {record['load_average_1min']} at "
            f"the end; Python {record['python']}, torch {record['torch']}."
        )
        replace_block("speed-training", to_markdown(tables["training"]) + "\n\n" + run)
        replace_block("speed-sampling", to_markdown(tables["sampling"]))
        out.print(f"-> {DOCS}")


if __name__ == "__main__":
    main()
