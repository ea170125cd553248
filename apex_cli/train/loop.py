"""The training loop of `apex distill`, readable top to bottom: setup, steps, checkpoints, report.

One loop serves teacher training (plain flow matching: the objective with only ``mul`` rows) and APEX
distillation; the recipe's ``method`` section is the only difference.
"""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from apex_cli.config import Recipe, dump_recipe, load_recipe
from apex_cli.core.objective import ObjectiveModels, ObjectiveSettings, apex_loss
from apex_cli.core.shift import ConditionShift
from apex_cli.errors import ApexError, CheckpointError, RunInterruptedError
from apex_cli.train.checkpoint import (
    FINAL,
    atomic_write_text,
    latest_checkpoint,
    load_training_state,
    load_weights,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from apex_cli.train.ema import EMA
from apex_cli.train.tasks import build_task


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced."""

    run_dir: Path
    checkpoint: Path
    metrics: dict[str, Any]
    train_seconds: float
    kind: str


def is_teacher_recipe(recipe: Recipe) -> bool:
    """A recipe trains a teacher when every row is a flow-matching row with ``r = t`` (mul only, k = 0)."""
    roles = recipe.method.roles
    return roles.e2e == roles.any == roles.adv == 0 and recipe.method.consistency_ratio == 0


def objective_settings(recipe: Recipe) -> ObjectiveSettings:
    """The recipe's ``method`` section as the objective's settings."""
    m = recipe.method
    return ObjectiveSettings(
        role_fractions=m.roles.as_tuple(),
        time_dist=m.time_dist,
        consistency_ratio=m.consistency_ratio,
        enhanced_ratio=m.enhanced_ratio,
        estimate_order=m.estimate_order,
        delta=m.delta,
        loss=m.loss,
        barron_c=m.barron_c,
        dist_match_coef=m.dist_match_coef,
        adversarial_weighting=m.adversarial_weighting,
        cond_dropout=m.cond_dropout,
    )


RESUMABLE_CHANGES = (
    "train.steps",
    "train.checkpoint_every",
    "hardware.num_threads",
    "output.evaluate",
    "output.eval_samples",
    "description",
)
"""Recipe fields that may differ between a checkpoint and the run that resumes it."""


def run_distillation(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool | str = False,
    force: bool = False,
    console: Console | None = None,
) -> RunResult:
    """Train the recipe's model and write checkpoints, metrics and the report into ``output.dir``.

    Args:
        recipe: The resolved recipe.
        overwrite: Replace a finished run in ``output.dir``.
        resume: True: continue from the latest checkpoint of ``output.dir``; a path: from that checkpoint.
        force: Resume even when the checkpoint's recipe differs in a result-affecting field.
        console: Where progress goes (stderr by default).
    """
    console = console or Console(stderr=True)
    run_dir = Path(recipe.output.dir)
    if (run_dir / FINAL).exists() and not overwrite and not resume:
        raise ApexError(
            f"{run_dir} already holds a finished run",
            hint="pass --overwrite to replace it, or choose another directory with --set output.dir=PATH",
        )
    recipe_yaml = dump_recipe(recipe)
    atomic_write_text(run_dir / "config.yaml", recipe_yaml)
    device = _device(recipe.hardware.device)
    if recipe.hardware.num_threads:
        torch.set_num_threads(recipe.hardware.num_threads)
    torch.manual_seed(recipe.train.seed)

    # Models: the online network, the frozen teacher it starts from, and the E7 / E8 references.
    task = build_task(recipe)
    model = task.build_model().to(device)
    teacher = _load_init(recipe, model, console)
    kind = "teacher" if is_teacher_recipe(recipe) else "student"
    ema = EMA(model, recipe.method.ema_decay) if recipe.method.reference == "ema" else None
    frozen = teacher if teacher is not None else copy.deepcopy(model).requires_grad_(False)
    reference = {"ema": ema.model if ema else model, "online": model, "frozen": frozen}[recipe.method.reference]
    models = ObjectiveModels(online=model, reference=reference, rollout=ema.model if ema else model)  # type: ignore[arg-type]
    settings = objective_settings(recipe)
    shift = ConditionShift(recipe.method.shift, seed=recipe.method.shift_seed)

    train = recipe.train
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    warmup = max(train.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    first_step = 1
    if resume:
        first_step = _resume(recipe, run_dir, resume, force, model, ema, optimizer, scheduler, console) + 1
    batches = task.batches(model, train.batch_size, train.seed, device, first_step - 1)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if recipe.hardware.precision == "bf16"
        else contextlib.nullcontext()
    )
    log_path = run_dir / "metrics.jsonl"
    if first_step == 1:
        log_path.unlink(missing_ok=True)

    start = time.perf_counter()
    with _progress(console) as progress, log_path.open("a", buffering=1) as log, _stop_signals() as stop:
        task_id = progress.add_task(f"{kind} {recipe.name}", total=train.steps, completed=first_step - 1, loss="")
        for step in range(first_step, train.steps + 1):
            x_data, cond = next(batches)
            with autocast:
                out = apex_loss(models, x_data, cond, model.unconditional(x_data.shape[0], device), settings, shift)
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, train.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            if step % 10 == 0 or step == train.steps:  # .item() syncs: only on logging steps
                record = {k: round(float(v), 6) for k, v in out.terms.items()}
                record.update(step=step, lr=scheduler.get_last_lr()[0], grad_norm=round(float(grad_norm), 4))
                record["seconds"] = round(time.perf_counter() - start, 3)
                log.write(json.dumps(record) + "\n")
                progress.update(task_id, loss=f"loss {record['total']:.4f}")
            progress.advance(task_id)
            if not console.is_terminal and step % max(train.steps // 10, 1) == 0:  # no live bar: plain lines
                console.print(f"{kind} {recipe.name}: step {step}/{train.steps}, {float(out.terms['total']):.4f} loss")
            if stop.signal is not None and step < train.steps:  # SIGINT / SIGTERM: save, then stop
                state = _training_state(optimizer, scheduler, ema, step)
                saved = _save(run_dir / "checkpoints" / f"step_{step:07d}", recipe_yaml, model, ema, step, kind, state)
                raise RunInterruptedError(
                    f"stopped by {signal.Signals(stop.signal).name} after step {step}; checkpoint saved to {saved}",
                    hint="run the same command with --resume to continue exactly from there",
                )
            if train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.steps:
                state = _training_state(optimizer, scheduler, ema, step)
                _save(run_dir / "checkpoints" / f"step_{step:07d}", recipe_yaml, model, ema, step, kind, state)
    train_seconds = time.perf_counter() - start
    state = _training_state(optimizer, scheduler, ema, train.steps)
    checkpoint = _save(run_dir / FINAL, recipe_yaml, model, ema, train.steps, kind, state)

    metrics: dict[str, Any] = {}
    if recipe.output.evaluate:
        console.print("[dim]evaluating the run ...[/]")
        sampled = ema.model if ema is not None else model
        model.eval()
        metrics = task.report(run_dir, None if kind == "teacher" else sampled, sampled if teacher is None else teacher)
    metrics["train_seconds"] = round(train_seconds, 2)
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    return RunResult(run_dir=run_dir, checkpoint=checkpoint, metrics=metrics, train_seconds=train_seconds, kind=kind)


def _load_init(recipe: Recipe, model: nn.Module, console: Console) -> nn.Module | None:
    """Load ``model.init`` into ``model`` (training it first from ``model.init_recipe`` if it is missing).

    Returns:
        A frozen copy of the loaded model (the teacher), or None when training from scratch.
    """
    init = recipe.model.init
    if init is None:
        return None
    path = Path(init)
    if not (path / FINAL / "meta.json").is_file() and not (path / "meta.json").is_file():
        if recipe.model.init_recipe is None:
            raise CheckpointError(
                f"model.init: {path} does not exist",
                hint="train a teacher first (e.g. apex distill --recipe toy2d-teacher) or set model.init_recipe",
            )
        init_recipe = load_recipe(recipe.model.init_recipe)
        raw = init_recipe.model_dump(mode="json")
        raw.update(data=recipe.data.model_dump(mode="json"), hardware=recipe.hardware.model_dump(mode="json"))
        raw["output"]["dir"] = str(path)
        init_recipe = Recipe.model_validate(raw)
        console.print(f"No teacher at {path}: training it first with recipe {recipe.model.init_recipe} on this data.")
        run_distillation(init_recipe, console=console)
    directory, init_recipe, meta = read_checkpoint(path)
    if init_recipe.data != recipe.data:
        mine, theirs = recipe.data.model_dump(), init_recipe.data.model_dump()
        diff = ", ".join(f"data.{k}: {theirs[k]!r} vs {mine[k]!r}" for k in mine if mine[k] != theirs[k])
        raise CheckpointError(
            f"model.init {directory} was trained on other data ({diff})",
            hint="train a matching teacher with the same --set data.* overrides and point model.init at it",
        )
    mine, theirs = recipe.model.model_dump(), init_recipe.model.model_dump()
    architecture = [k for k in mine if k not in ("init", "init_recipe")]
    diff = ", ".join(f"model.{k}: {theirs.get(k)!r} vs {mine[k]!r}" for k in architecture if mine[k] != theirs.get(k))
    if diff:
        raise CheckpointError(f"model.init {directory} has another architecture ({diff})")
    load_weights(model, directory, "ema" if (directory / "ema.safetensors").is_file() else "model")
    if meta.get("kind") == "teacher":
        model.init_target_time_embedder()  # type: ignore[operator]
    return copy.deepcopy(model).requires_grad_(False).eval()


def _save(
    directory: Path, recipe_yaml: str, model: nn.Module, ema: EMA | None, step: int, kind: str, state: dict[str, Any]
) -> Path:
    weights = {"model": model.state_dict()}
    if ema is not None:
        weights["ema"] = ema.model.state_dict()
    return save_checkpoint(directory, recipe_yaml, weights, {"step": step, "kind": kind}, state)


def _training_state(optimizer: torch.optim.Optimizer, scheduler: Any, ema: EMA | None, step: int) -> dict[str, Any]:
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ema_decay": ema.current_decay if ema is not None else None,
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _resume(
    recipe: Recipe,
    run_dir: Path,
    resume: bool | str,
    force: bool,
    model: nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    console: Console,
) -> int:
    """Load the weights and training state of a checkpoint; return the step it was taken at."""
    directory = latest_checkpoint(run_dir) if resume is True else resolve_checkpoint(str(resume))
    if directory is None:
        raise CheckpointError(f"--resume: {run_dir} has no checkpoint yet", hint="start the run without --resume")
    _, saved, _ = read_checkpoint(directory)
    differences = _differences(saved.model_dump(mode="json"), recipe.model_dump(mode="json"))
    blocking = [d for d in differences if not d.startswith(RESUMABLE_CHANGES)]
    if blocking and not force:
        raise CheckpointError(
            f"{directory} was written by a different recipe: " + "; ".join(blocking),
            hint="resume with the same recipe, or pass --force to resume anyway",
        )
    state = load_training_state(directory)
    if state["step"] >= recipe.train.steps:
        raise CheckpointError(
            f"{directory} is at step {state['step']}, the recipe stops at train.steps={recipe.train.steps}",
            hint="raise train.steps with --set train.steps=N to train further",
        )
    load_weights(model, directory, "model")
    if ema is not None:
        load_weights(ema.model, directory, "ema")
        ema.current_decay = state["ema_decay"]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    console.print(f"Resuming from {directory} (step {state['step']}).")
    return int(state["step"])


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths whose values differ, as 'path: old -> new'."""
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{path}.")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


class _StopRequest:
    """Remembers the first SIGINT / SIGTERM instead of dying mid-step."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, _frame: object) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, keep the last periodic checkpoint
        self.signal = signum


@contextlib.contextmanager
def _stop_signals() -> Iterator[_StopRequest]:
    """While training, SIGINT and SIGTERM finish the current step; a second SIGINT stops at once."""
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ApexError("hardware.device is 'cuda' but no CUDA device is available", hint="--set hardware.device=cpu")
    return torch.device(name)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
