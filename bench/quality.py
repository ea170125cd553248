"""Quality of APEX against its rivals: same teacher, data, batch, learning rate and wall-clock budget, three seeds.

Each method distils the shipped shapes teacher (``shipped:shapes-teacher``) with its recipe (``recipes/shapes-*-cpu``,
all ``shapes-apex-cpu`` but for the method) for the same training time, set by ``train.max_minutes``: the run stops
when one more step would pass the budget and writes ``final/``. The budget is spent in stages (``--resume`` continues
each stage exactly where the last one stopped), and after each stage the student (its EMA weights) is measured at
NFE 1, after the last at NFE 1, 2 and 4: GenEval-shapes overall and per task (the quick suite, 60 prompts x 4
images, detector ``shapes``) and FID against 2000 renderer images (shapes features), with the code of the end-of-run
report (``ShapesTask.measure``). The teacher's rows at NFE 50 / 4 / 1 come from the rows stored beside its weights
(measured once when they do not match). The measuring time is not training time.

Methods: ``apex`` (shift negate), ``apex-affine``, ``apex-negate+negative_time``, ``twinflow`` (negative time only),
``consistency`` (no adv rows, no E12) and ``dmd2`` (a separate fake-score network).

Budget: the whole command, training and measuring, is planned to fit 78 minutes on the 2-core machine in full mode
(6 methods x 3 seeds; ``make bench`` leaves the other 12 of its 90 minutes to bench/speed.py) and 10 minutes with
``--quick`` (6 methods x seed 0). A share of it (``Mode.train_share``) is training, split equally over the runs:
182 s a run in 3 stages (full), 55 s in 2 stages (quick).

    python bench/quality.py                 # full: writes bench/results/quality.json and docs/benchmarks-*.svg
    python bench/quality.py --quick         # quick: bench/results/quality-quick.json and bench/results/*-quick.svg
    python bench/quality.py --from-scratch  # forget earlier runs of this mode first
    python bench/quality.py --render        # tables, plots and docs again from bench/results/quality.json

A full run also rewrites its tables in docs/benchmarks.md (between the ``<!-- bench:quality -->`` markers).

Resumable: a run's finished stages are kept in ``<runs>/<method>/seed<k>/bench.json`` and skipped on the next call;
an interrupted stage is trained again from the previous stage's checkpoint. Changing the budget starts runs anew.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from docs_tables import replace_block, to_markdown  # bench/docs_tables.py (this script's folder is on sys.path)
from rich.console import Console
from rich.table import Table

from apex_cli import __version__
from apex_cli.config import load_recipe
from apex_cli.data.shapes import TASKS
from apex_cli.errors import ApexError
from apex_cli.train.checkpoint import FINAL, atomic_write_text
from apex_cli.train.loop import run_distillation
from apex_cli.train.sampling import TEACHER_MULTI_STEP, sampler_settings
from apex_cli.train.shapes import SHORT_TASK_NAMES, TEACHER_REPORT_NFE, ShapesTask
from apex_cli.train.tasks import load_checkpoint_model

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
METHODS: dict[str, tuple[str, list[str]]] = {
    "apex": ("shapes-apex-cpu", []),
    "apex-affine": ("shapes-apex-cpu", ["method.shift=affine"]),
    "apex-negate+negative_time": ("shapes-apex-cpu", ["method.shift=negate+negative_time"]),
    "twinflow": ("shapes-twinflow-cpu", []),
    "consistency": ("shapes-consistency-cpu", []),
    "dmd2": ("shapes-dmd2-cpu", []),
}
"""Method -> (recipe in recipes/, overrides)."""
FINAL_NFE = (1, 2, 4)
STEPS_CEILING = 1_000_000
"""``train.steps`` of a benchmark run: the time budget stops it long before."""


@dataclass(frozen=True)
class Mode:
    """Seeds, total budget (training and measuring), stages, and the share of the budget that is training.

    The rest of the budget is measuring (each stage's NFE 1, the last stage's NFE 2 and 4: generating the 240
    images is the largest part), building the run at each stage, and the teacher's rows if they are not stored. On
    the 2-core machine, busy with other work, at one thread: measuring NFE 1 took 9 s, NFE 1, 2 and 4 together 45 s
    (the renderer's row included each time).
    """

    seeds: tuple[int, ...]
    budget_seconds: float
    stages: int
    train_share: float


MODES = {"full": Mode((0, 1, 2), 78 * 60, 3, 0.7), "quick": Mode((0,), 10 * 60, 2, 0.55)}


def run_overrides(method: str, seed: int, run_dir: Path, stage_minutes: float, threads: int) -> list[str]:
    """The ``--set`` items of one stage of one run."""
    return [
        *METHODS[method][1],
        f"train.seed={seed}",
        f"train.steps={STEPS_CEILING}",
        f"train.max_minutes={stage_minutes}",
        "train.checkpoint_every=0",  # final/ at the end of each stage is the only checkpoint
        "monitor.every=0",  # the budget goes to training (the monitor's samples would cost it)
        "output.evaluate=false",  # measured here, per stage
        f"output.dir={run_dir}",
        f"hardware.num_threads={threads}",
    ]


def measure(run_dir: Path, nfes: tuple[int, ...], stage: int) -> dict[str, Any]:
    """GenEval-shapes, FID and images/s of the run's current student (EMA weights) at ``nfes``."""
    model, recipe, _ = load_checkpoint_model(run_dir)
    sets = {f"student_{nfe}": (model, sampler_settings(recipe.sampler, nfe)) for nfe in nfes}
    folder = run_dir / f"eval-stage{stage}"
    rows = ShapesTask(recipe).measure(folder, sets)
    shutil.rmtree(folder)  # the scores are kept; the images are not needed again
    return rows


def run_one(
    method: str, seed: int, runs: Path, mode: Mode, train_seconds: float, threads: int, console: Console
) -> dict:
    """Train and measure one method x seed, stage by stage, skipping the stages a previous call finished."""
    run_dir = runs / method / f"seed{seed}"
    record_path = run_dir / "bench.json"
    key = {"recipe": METHODS[method][0], "overrides": METHODS[method][1], "seed": seed}
    key |= {"train_seconds": train_seconds, "stages": mode.stages, "apex": __version__}
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if record is None or record["key"] != key:  # new, or planned with another budget: start afresh
        shutil.rmtree(run_dir, ignore_errors=True)
        record = {"method": method, "seed": seed, "key": key, "stages": []}
    if record["stages"] and _final_step(run_dir) != record["stages"][-1]["step"]:  # killed before recording a stage
        shutil.rmtree(run_dir, ignore_errors=True)
        record["stages"] = []
    stage_minutes = train_seconds / mode.stages / 60
    recipe_path = str(REPO / "recipes" / f"{METHODS[method][0]}.yaml")
    for stage in range(mode.stages):
        done = record["stages"][stage] if stage < len(record["stages"]) else None
        if done is None:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a stage killed by a signal left one
            if stage == 0:
                shutil.rmtree(run_dir, ignore_errors=True)
            recipe = load_recipe(recipe_path, run_overrides(method, seed, run_dir, stage_minutes, threads))
            quiet = Console(stderr=True, quiet=True)  # one line a stage below instead of a bar to a million steps
            result = run_distillation(recipe, resume=str(run_dir / FINAL) if stage else False, console=quiet)
            previous = record["stages"][-1]["train_seconds"] if stage else 0.0
            step = _final_step(run_dir)
            done = {"stage": stage, "step": step, "train_seconds": round(previous + result.train_seconds, 2)}
            console.print(
                f"[bold]{method}[/] seed {seed}, stage {stage + 1}/{mode.stages}: step {step} after "
                f"{done['train_seconds']:.1f} s of training"
            )
            record["stages"].append(done)
            atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
        if "rows" not in done:
            torch.set_num_threads(threads)
            done["rows"] = measure(run_dir, FINAL_NFE if stage == mode.stages - 1 else (1,), stage)
            atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    return record


def _final_step(run_dir: Path) -> int | None:
    meta = run_dir / FINAL / "meta.json"
    return json.loads(meta.read_text())["step"] if meta.is_file() else None


def teacher_rows(console: Console) -> dict[str, dict[str, Any]]:
    """The teacher's rows at NFE 50 / 4 / 1 with its guidance: stored beside its weights, else measured now."""
    recipe = load_recipe(str(REPO / "recipes" / "shapes-apex-cpu.yaml"))
    task = ShapesTask(recipe)
    guidance = task.teacher_guidance()
    rows = task.cached_teacher_rows(guidance)
    if rows:
        return rows
    console.print("the stored teacher rows do not match this code: measuring the teacher (NFE 50 / 4 / 1) ...")
    from dataclasses import replace

    from apex_cli.train.checkpoint import load_as_base

    model = task.build_model()
    load_as_base(model, recipe.model.init)  # type: ignore[arg-type, union-attr]
    model.eval()
    sets = {f"teacher_{n}": (model, replace(TEACHER_MULTI_STEP, nfe=n, guidance=guidance)) for n in TEACHER_REPORT_NFE}
    folder = ROOT / "runs" / "quality-teacher"
    rows = task.measure(folder, sets, console)
    shutil.rmtree(folder)
    return rows


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value), min, max and n."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(records: list[dict]) -> dict[str, Any]:
    """One method over its seeds: each set's overall, per-task and FID spreads, and the quality-time curve."""
    last = [r["stages"][-1] for r in records]
    sets = {}
    for name in (n for n in last[0]["rows"] if n.startswith("student_")):  # (the renderer's row is apart)
        rows = [stage["rows"][name] for stage in last]
        sets[name] = {
            "overall": spread([row["overall"] for row in rows]),
            "tasks": {task: spread([row["tasks"][task] for row in rows]) for task in TASKS},
            "fid": spread([row["fid"] for row in rows]),
            "images_per_second": spread([row["images_per_second"] for row in rows]),
        }
    curve = [
        {
            "stage": k,
            "train_seconds": spread([r["stages"][k]["train_seconds"] for r in records]),
            "step": spread([r["stages"][k]["step"] for r in records]),
            "overall_nfe1": spread([r["stages"][k]["rows"]["student_1"]["overall"] for r in records]),
        }
        for k in range(len(records[0]["stages"]))
    ]
    return {"sets": sets, "curve": curve, "steps": curve[-1]["step"], "train_seconds": curve[-1]["train_seconds"]}


def _cell(value: dict[str, Any], digits: int) -> str:
    std = value["std"]
    return f"{value['mean']:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def results_table(results: dict[str, Any]) -> Table:
    """GenEval-shapes overall and per task (mean ± std over seeds), FID, steps, next to the teacher and renderer."""
    table = Table(
        title=f"GenEval-shapes and FID, {results['mode']} mode: {results['train_seconds_per_run']:.0f} s of training "
        f"per run, seeds {results['seeds']} (mean ± sample std)"
    )
    for column in ("method", "NFE", "GenEval", *(SHORT_TASK_NAMES.get(t, t) for t in TASKS), "FID", "steps"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, row in results["teacher"].items():
        tasks = [f"{row['tasks'][t]:.2f}" for t in TASKS]
        table.add_row("teacher", name.split("_")[1], f"{row['overall']:.3f}", *tasks, f"{row['fid']:.1f}", "-")
    renderer = results["renderer"]
    tasks = [f"{renderer['tasks'][t]:.2f}" for t in TASKS]
    table.add_row("renderer", "-", f"{renderer['overall']:.3f}", *tasks, f"{renderer['fid']:.1f}", "-")
    for method, summary in results["methods"].items():
        table.add_section()
        for name, value in summary["sets"].items():
            table.add_row(
                method,
                name.split("_")[1],
                _cell(value["overall"], 3),
                *(f"{value['tasks'][t]['mean']:.2f}" for t in TASKS),
                _cell(value["fid"], 1),
                f"{summary['steps']['mean']:.0f}",
            )
    return table


def plot(results: dict[str, Any], folder: Path, suffix: str) -> list[Path]:
    """Two SVG plots: GenEval at NFE 1 against training time per method, and GenEval against NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "apex-bench"  # the same data give the same file
    teacher = results["teacher"]
    paths = []
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for method, summary in results["methods"].items():
        x = [point["train_seconds"]["mean"] / 60 for point in summary["curve"]]
        y = [point["overall_nfe1"]["mean"] for point in summary["curve"]]
        error = [point["overall_nfe1"]["std"] or 0.0 for point in summary["curve"]]
        axis.errorbar(x, y, yerr=error, marker="o", capsize=3, label=method)
    axis.axhline(teacher["teacher_50"]["overall"], color="black", linestyle="--", label="teacher, NFE 50")
    axis.set(xlabel="training time (minutes)", ylabel="GenEval-shapes at NFE 1", ylim=(0, 1))
    axis.set_title(f"quality vs training time ({results['mode']}, mean ± std over seeds {results['seeds']})")
    axis.legend(fontsize=7)
    paths.append(_save_svg(figure, folder / f"benchmarks-quality-vs-time{suffix}.svg"))
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for method, summary in results["methods"].items():
        nfes = sorted(int(name.split("_")[1]) for name in summary["sets"])
        sets = [summary["sets"][f"student_{n}"]["overall"] for n in nfes]
        means, errors = [s["mean"] for s in sets], [s["std"] or 0.0 for s in sets]
        axis.errorbar(nfes, means, yerr=errors, marker="o", capsize=3, label=method)
    nfes = sorted(int(name.split("_")[1]) for name in teacher)
    axis.plot(nfes, [teacher[f"teacher_{n}"]["overall"] for n in nfes], "k--", marker="s", label="teacher")
    axis.set(xscale="log", xlabel="NFE", ylabel="GenEval-shapes", ylim=(0, 1))
    axis.set_xticks([1, 2, 4, 50], ["1", "2", "4", "50"])
    axis.set_title(f"quality vs NFE ({results['mode']}, same training time per method)")
    axis.legend(fontsize=7)
    paths.append(_save_svg(figure, folder / f"benchmarks-quality-vs-nfe{suffix}.svg"))
    return paths


def _save_svg(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.tight_layout()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(figure)
    atomic_write_text(path, buffer.getvalue())
    return path


def main() -> None:
    try:
        _main()
    except ApexError as err:  # e.g. Ctrl-C: the stage saved a checkpoint; the next call trains that stage again
        Console(stderr=True).print(f"[bold red]Error:[/] {err}", highlight=False)
        raise SystemExit(err.exit_code) from None


def publish(results: dict[str, Any], out: Path, plots: Path, suffix: str, docs: bool) -> None:
    """Print the table, draw the plots and, for the full mode, rewrite the page's ``quality`` block."""
    console = Console(stderr=True)
    table = results_table(results)
    Console(width=180).print(table)
    paths = [out, *plot(results, plots, suffix)]
    if docs:
        run = (
            f"Machine: {results['machine']}, {results['threads']} threads, load average {results['load_average_1min']} "
            f"at the end; Python {results['python']}, torch {results['torch']}, apex {results['apex']}; "
            f"{results['elapsed_seconds_this_call'] / 60:.1f} min for the whole call."
        )
        replace_block("quality", to_markdown(table) + "\n\n" + run)
        paths.append(REPO / "docs" / "benchmarks.md")
    for path in paths:
        console.print(f"-> {path}")


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seed 0 only, 10 minutes in all")
    parser.add_argument("--from-scratch", action="store_true", help="delete this mode's earlier runs first")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=Path, help="run folders (default bench/runs/quality-<mode>)")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/quality[-quick].json)")
    parser.add_argument("--plots", type=Path, help="folder of the SVG plots (default: docs/; quick: bench/results/)")
    parser.add_argument("--render", action="store_true", help="no training: tables, plots and docs from --out")
    parser.add_argument("--budget-seconds", type=float, help=argparse.SUPPRESS)  # smoke tests: a tiny total budget
    args = parser.parse_args()
    name = "quick" if args.quick else "full"
    mode = MODES[name]
    if args.budget_seconds is not None:
        mode = Mode(mode.seeds, args.budget_seconds, mode.stages, mode.train_share)
    methods = [m.strip() for m in args.methods.split(",")]
    if any(m not in METHODS for m in methods):
        parser.error(f"--methods: known methods are {', '.join(METHODS)}; got {args.methods!r}")
    suffix = "-quick" if args.quick else ""
    runs = args.runs or ROOT / "runs" / f"quality-{name}"
    out = args.out or ROOT / "results" / f"quality{suffix}.json"
    plots = args.plots or (ROOT / "results" if args.quick else REPO / "docs")
    docs = not args.quick and args.out is None and args.budget_seconds is None  # the page shows the full mode only
    if args.render:
        if not out.is_file():
            raise ApexError(
                f"{out} does not exist", hint=f"run python bench/quality.py{' --quick' if args.quick else ''}"
            )
        publish(json.loads(out.read_text()), out, plots, suffix, docs)
        return
    if args.from_scratch:
        shutil.rmtree(runs, ignore_errors=True)
    train_seconds = mode.budget_seconds * mode.train_share / (len(methods) * len(mode.seeds))
    console = Console(stderr=True)
    console.print(
        f"{name} mode: {len(methods)} methods x {len(mode.seeds)} seeds, {train_seconds:.0f} s of training each "
        f"({mode.stages} stages), {mode.budget_seconds / 60:.0f} min in all"
    )
    start = time.perf_counter()
    teacher = teacher_rows(console)
    records = {
        m: [run_one(m, s, runs, mode, train_seconds, args.threads, console) for s in mode.seeds] for m in methods
    }
    renderer = records[methods[0]][0]["stages"][-1]["rows"]["renderer"]
    results = {
        "mode": name,
        "budget_seconds": mode.budget_seconds,
        "train_share": mode.train_share,
        "train_seconds_per_run": train_seconds,
        "stages": mode.stages,
        "seeds": list(mode.seeds),
        "suite": "GenEval-shapes quick suite, 60 prompts x 4 images; FID vs 2000 renderer images (shapes features)",
        "teacher": {k: teacher[k] for k in sorted(teacher, key=lambda k: -int(k.split("_")[1]))},
        "renderer": renderer,
        "methods": {m: summarize(records[m]) for m in methods},
        "runs": records,
        "elapsed_seconds_this_call": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "threads": args.threads,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "apex": __version__,
    }
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    publish(results, out, plots, suffix, docs)
    if results["elapsed_seconds_this_call"] > mode.budget_seconds:
        console.print(
            f"[yellow]Warning:[/] took {results['elapsed_seconds_this_call'] / 60:.1f} min, over the "
            f"{mode.budget_seconds / 60:.0f} min budget (a busy machine slows the measuring; the training time per "
            "run is fixed)"
        )


if __name__ == "__main__":
    main()
