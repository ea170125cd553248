"""`apex distill`: load the recipe, hand it to the training loop, print where the results are."""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import Annotated

import typer

from apex_cli.cli._output import stderr, stdout, user_errors
from apex_cli.config import Recipe, dump_recipe, find_recipe, load_recipe

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "  apex distill --recipe toy2d-apex\n\n"
    "  apex distill --recipe toy2d-apex --set train.steps=500 --set method.shift=affine\n\n"
    "  apex distill --recipe my-recipe.yaml --dry-run\n\n"
    "  apex distill --recipe qwen20b-lora --set model.path=/models/Qwen-Image --dry-run"
)


@user_errors
def distill(
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Built-in recipe name or path to a YAML file.")],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a recipe value: key.sub=value (repeatable), e.g. train.lr=1e-4."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", "-n", help="Print the resolved recipe and its per-GPU memory estimate, and exit (no training)."
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished run in output.dir.")] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from the newest complete checkpoint in output.dir (exactly); damaged ones are skipped.",
        ),
    ] = False,
    resume_from: Annotated[str | None, typer.Option(help="Continue from this checkpoint directory.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Resume even if the recipe changed a result field.")] = False,
) -> None:
    """Train a model with a recipe: a teacher by flow matching, or a one-step student by APEX.

    The recipe is a built-in name (see `apex recipes list`) or a YAML file. Results go to the recipe's
    output.dir: config.yaml (the resolved recipe), metrics.jsonl (losses), final/ (the checkpoint),
    metrics.json and the report. A student whose model.init does not exist yet trains it first with
    model.init_recipe. With hardware.processes * hardware.nodes > 1 it relaunches itself through torchrun.
    """
    resolved = load_recipe(recipe, overrides or [])
    if dry_run:
        typer.echo(f"# resolved from {find_recipe(recipe)[0]}\n" + dump_recipe(resolved), nl=False)
        typer.echo(_memory_report(resolved))
        return
    from apex_cli.train.parallel import launch_command

    flags = [
        *(["--overwrite"] if overwrite else []),
        *(["--resume"] if resume else []),
        *(["--force"] if force else []),
    ]
    flags += ["--resume-from", resume_from] if resume_from else []
    command = launch_command(recipe, overrides or [], flags, resolved)
    if command is not None:  # several processes: this command again under torchrun, one process a GPU
        stderr.print(f"launching {resolved.hardware.world_size} processes: {shlex.join(command)}", highlight=False)
        raise typer.Exit(code=subprocess.call(command))
    from apex_cli.train.loop import run_distillation  # torch is imported here, not at `apex --help`
    from apex_cli.train.tasks import build_task

    result = run_distillation(resolved, overwrite=overwrite, resume=resume_from or resume, force=force, console=stderr)
    if int(os.environ.get("RANK", "0")) != 0:  # launched processes: the first one reports
        return
    if resolved.output.evaluate:
        stdout.print(build_task(resolved).summary_table(result.metrics))
    stdout.print(f"trained {result.kind} in {result.train_seconds:.1f} s")
    stdout.print(f"checkpoint: {result.checkpoint}")
    for name, path in result.metrics.get("outputs", {}).items():
        stdout.print(f"{name + ':':11} {path}")


def _memory_report(recipe: Recipe) -> str:
    """The ``--dry-run`` memory section (YAML comments): the per-GPU estimate of a diffusers recipe."""
    from apex_cli.config import DiffusersModelConfig

    if not isinstance(recipe.model, DiffusersModelConfig):
        return "# memory estimate: for diffusers teachers only (this model is small)"
    from apex_cli.train.memory import GIB, TRANSFORMER_CLASSES, estimate_memory

    if recipe.model.family not in TRANSFORMER_CLASSES:
        known = ", ".join(TRANSFORMER_CLASSES)
        return f"# memory estimate: not available for {recipe.model.family} yet (estimated families: {known})"
    hardware = recipe.hardware
    estimate = estimate_memory(recipe)
    layout = f"{hardware.world_size} process(es), {hardware.strategy}, {recipe.model.dtype} weights"
    lines = [f"# memory estimate per GPU ({layout}; formula: apex_cli/train/memory.py):"]
    lines += [f"#{line}" for line in estimate.table().splitlines()]
    if hardware.gpu_memory_gib is not None and estimate.peak / GIB > hardware.gpu_memory_gib:
        lines.append(
            f"# WARNING: {estimate.peak / GIB:.1f} GiB exceeds hardware.gpu_memory_gib={hardware.gpu_memory_gib:g}: "
            "lower train.batch_size, set hardware.gradient_checkpointing: true, or use more processes with fsdp"
        )
    return "\n".join(lines)
