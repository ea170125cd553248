"""The training loop of `apex distill`, readable top to bottom: setup, steps, checkpoints, report.

One loop serves teacher training (plain flow matching: the objective with only ``mul`` rows), APEX
distillation and its baselines (consistency distillation, TwinFlow, and DMD2 with a separate fake-score network,
``method.fake_score``); the recipe's ``method`` section is the only difference. The same loop runs as one of several
processes (launched by torchrun, ``train/parallel.py``): DDP or FSDP2 around the online model, each process its
share of every batch, the logged values averaged over processes, and process 0 writing the files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from apex_cli.config import DiffusersModelConfig, Recipe, TrainConfig, dump_recipe, load_recipe
from apex_cli.core.objective import ObjectiveModels, ObjectiveSettings, apex_loss, split_roles
from apex_cli.core.sampler import SamplerSettings
from apex_cli.core.shift import ConditionShift
from apex_cli.errors import ApexError, CheckpointError, RecipeError, RunInterruptedError
from apex_cli.train.checkpoint import (
    FINAL,
    SHIPPED_PREFIX,
    atomic_write_text,
    checkpoint_problem,
    latest_checkpoint,
    load_as_base,
    load_training_state,
    load_weights,
    read_checkpoint,
    read_weights,
    remove_staging,
    resolve_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
    weights_sha256,
    weights_stem,
)
from apex_cli.train.ema import EMA, AdapterEMA, AdaptersDisabled
from apex_cli.train.fake_score import WEIGHTS_STEM as FAKE_SCORE_STEM
from apex_cli.train.fake_score import FakeScore
from apex_cli.train.guards import CollapseMonitor, NonFiniteGuard
from apex_cli.train.pairs import FILENAME as PAIRS_FILENAME
from apex_cli.train.pairs import GENERATE_BATCH, TeacherPairs, generate_pairs
from apex_cli.train.parallel import (
    Layout,
    Replicated,
    full_state_dict,
    full_tensors,
    init_layout,
    load_full_state_dict,
    shard,
)
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


def lr_factor(train: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based), as a share of ``train.lr``.

    A linear warm-up over ``warmup_steps``, then constant, or a cosine from 1 down to ``final_lr_ratio`` at
    the last step (``steps - 1``). The cosine follows ``train.steps``, so a shorter run (``--set
    train.steps=N``) decays over its own budget.
    """
    done = step + 1
    warmup = max(train.warmup_steps, 1)
    if done < warmup:
        return done / warmup
    if train.lr_schedule == "constant" or train.steps <= warmup:
        return 1.0
    progress = min((done - warmup) / (train.steps - warmup), 1.0)
    return train.final_lr_ratio + (1 - train.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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
        adversarial_loss=m.dist_match_loss,
        fake_weight=m.fake_weight,
        e2e_weight=m.e2e_weight,
        cond_dropout=m.cond_dropout,
        target_velocity=m.target_velocity,
    )


def warmed_up(settings: ObjectiveSettings, warmup: int, step: int) -> ObjectiveSettings:
    """The settings of step ``step`` (1-based): ``lambda_dm`` ramps linearly to its value over ``warmup`` steps.

    At initialisation the fake branch is the teacher under the shifted condition, not the generator's velocity,
    so ``v_fake - v_real`` (E12) starts as noise; the ramp keeps it from steering the generator until the adv
    rows have trained the branch.
    """
    if step >= warmup:
        return settings
    return dataclasses.replace(settings, dist_match_coef=settings.dist_match_coef * step / warmup)


RESUMABLE_CHANGES = (
    "train.steps",
    "train.max_minutes",
    "train.checkpoint_every",
    "train.keep_last",
    "train.max_nonfinite_steps",
    "monitor.",  # what is watched and when it warns, not what is trained
    "hardware.num_threads",
    "hardware.gpu_memory_gib",
    "hardware.gradient_checkpointing",  # recomputes instead of storing: the same numbers
    "output.evaluate",
    "output.eval_samples",
    "description",
    "sampler.",  # how the result is sampled and reported, not how it trains
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

    Every step appends one line to ``metrics.jsonl`` (loss terms, grad norm, lr, images/s, and on CUDA the peak
    memory; on monitoring steps the collapse monitor's values). With ``train.max_minutes`` the run stops when one
    more step, as long as the last one, would pass that many minutes of training (at least one step is taken), and
    writes ``final/`` at that step (``--resume`` continues).
    A step whose loss or gradient is not finite is skipped (no update) and logged; ``train.max_nonfinite_steps`` of
    them in a row stop the run (TrainingError).

    Args:
        recipe: The resolved recipe.
        overwrite: Replace a finished run in ``output.dir``.
        resume: True: continue from the latest checkpoint of ``output.dir``; a path: from that checkpoint.
        force: Resume even when the checkpoint's recipe differs in a result-affecting field.
        console: Where progress goes (stderr by default).
    """
    layout = init_layout(recipe)
    if console is None or not layout.main:  # launched processes: the first one prints
        console = Console(stderr=True, quiet=not layout.main)
    try:
        return _run(recipe, layout, overwrite, resume, force, console)
    finally:
        if layout.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(
    recipe: Recipe, layout: Layout, overwrite: bool, resume: bool | str, force: bool, console: Console
) -> RunResult:
    """:func:`run_distillation` on one process of ``layout``: process 0 writes the files and prints."""
    run_dir = Path(recipe.output.dir)
    if (run_dir / FINAL).exists() and not overwrite and not resume:
        raise ApexError(
            f"{run_dir} already holds a finished run",
            hint="pass --overwrite to replace it, or choose another directory with --set output.dir=PATH",
        )
    recipe_yaml = dump_recipe(recipe)
    if layout.main:
        atomic_write_text(run_dir / "config.yaml", recipe_yaml)
        remove_staging(run_dir)  # half-written checkpoints of a killed run
    layout.barrier()
    device = _device(recipe.hardware.device, layout)
    if recipe.hardware.num_threads:
        torch.set_num_threads(recipe.hardware.num_threads)
    torch.manual_seed(recipe.train.seed)

    # Models: the online network, the frozen teacher it starts from, and the E7 / E8 references.
    task = build_task(recipe)
    model = task.build_model().to(device)
    teacher = _load_init(recipe, model, console)
    kind = "teacher" if is_teacher_recipe(recipe) else "student"
    meta: dict[str, Any] = {"kind": kind}
    lora = getattr(recipe.model, "lora", None)
    if lora is not None:  # after the teacher copy: adapters on the loaded base, which then stays frozen
        diffusers_teacher = isinstance(recipe.model, DiffusersModelConfig)
        try:
            init = {"init": lora.init} if diffusers_teacher else {}
            model.add_lora(lora.rank, lora.alpha, lora.target_modules, lora.dropout, **init)  # type: ignore[operator]
        except ValueError as err:
            raise RecipeError(f"model.lora.target_modules: {err}") from None
        if diffusers_teacher:  # the base is the pipeline the recipe names (tasks.load_checkpoint_model rebuilds it)
            meta.update(adapters=True, base=recipe.model.path or recipe.model.name, base_sha256=None)
        else:
            base = resolve_checkpoint(recipe.model.init)  # type: ignore[union-attr, arg-type]
            meta.update(adapters=True, base=recipe.model.init, base_sha256=weights_sha256(base, weights_stem(base)))  # type: ignore[union-attr]
    if recipe.hardware.gradient_checkpointing:
        getattr(model, model.ADAPTED_MODULE).enable_gradient_checkpointing()  # type: ignore[attr-defined]
    online, ema, models = _arrange(recipe, model, teacher, layout)
    real = real_score(recipe, model, teacher, models, online)
    critic = FakeScore(recipe, model, real) if real is not None else None  # the DMD2 baseline's fake score
    settings = objective_settings(recipe)
    shift = ConditionShift(recipe.method.shift, seed=recipe.method.shift_seed)
    if layout.world > 1:  # every process draws its own noise (the model above is the same on all of them)
        torch.manual_seed(recipe.train.seed + 7919 * layout.rank)

    train = recipe.train
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, train))
    guard = NonFiniteGuard(recipe)
    monitor = CollapseMonitor(recipe.monitor) if kind == "student" else None
    first_step = 1
    if resume:
        state = _resume(recipe, run_dir, resume, force, model, ema, critic, optimizer, scheduler, meta, layout, console)
        first_step = state["step"] + 1
        guard.total, guard.in_a_row = state.get("nonfinite_steps", 0), state.get("nonfinite_in_a_row", 0)
    shard = (layout.rank, layout.world)
    prepare = getattr(task, "prepare", None)
    if prepare is not None:  # the text / latent cache: encoders run here, never in the steps
        prepare(model, device, shard, layout.barrier)
    pairs = _teacher_pairs(recipe, task, model, teacher, run_dir, device, layout, bool(resume), console)
    batches = task.batches(online, train.batch_size, train.seed, device, first_step - 1, shard)  # type: ignore[arg-type]
    precision = resolve_precision(recipe.hardware.precision, device, console)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    log_path = run_dir / "metrics.jsonl"
    if layout.main:
        _truncate_log(log_path, first_step - 1)  # a resumed run logs the repeated steps once

    def save_periodic(step: int) -> Path:
        """``checkpoints/step_<step>``, then the oldest ones beyond ``train.keep_last`` are deleted."""
        state = _training_state(model, optimizer, scheduler, ema, critic, guard, step, layout)
        saved = _save(
            run_dir / "checkpoints" / f"step_{step:07d}", recipe_yaml, model, ema, critic, meta, state, layout
        )
        if train.keep_last and layout.main:
            rotate_checkpoints(run_dir, train.keep_last)
        return saved

    start = time.perf_counter()
    budget = 60 * train.max_minutes if train.max_minutes is not None else math.inf
    last_step = train.steps
    log = log_path.open("a", buffering=1) if layout.main else contextlib.nullcontext(None)
    with _progress(console) as progress, log as log_file, _stop_signals() as stop:
        task_id = progress.add_task(f"{kind} {recipe.name}", total=train.steps, completed=first_step - 1, loss="")
        for step in range(first_step, train.steps + 1):
            step_start = time.perf_counter()
            x_data, cond = next(batches)
            e2e_noise = None
            if pairs is not None:  # the e2e rows: teacher ODE pairs (method.regression_pairs)
                n_e2e = split_roles(x_data.shape[0], settings.role_fractions).e2e  # this process's share
                e2e_noise, x_pair, cond_pair = pairs.draw(n_e2e)
                x_data = torch.cat([x_pair, x_data[n_e2e:]])
                cond = {key: torch.cat([cond_pair[key], value[n_e2e:]]) for key, value in cond.items()}
            critic_terms = {} if critic is None else critic.update(online, cond, x_data.shape, autocast)
            with autocast:
                step_settings = warmed_up(settings, recipe.method.dist_match_warmup, step)
                uncond = model.unconditional(x_data.shape[0], device)
                if critic is None:
                    out = apex_loss(models, x_data, cond, uncond, step_settings, shift, e2e_noise=e2e_noise)
                else:
                    out = critic.loss(models, x_data, cond, uncond, step_settings)
            out.total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, train.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
            # One sync a step: the logged values (averaged over processes), which also decide whether the step may
            # update the weights, whether a stop was asked on any process and whether the time budget is spent.
            stop_asked = torch.tensor(float(stop.signal is not None), device=grad_norm.device)
            now = time.perf_counter()  # train.max_minutes: stop when another step like this one would pass it
            time_up = torch.tensor(float(now - start + (now - step_start) > budget), device=grad_norm.device)
            terms = {**out.terms, **critic_terms}
            values = [*(v.float() for v in terms.values()), grad_norm.float(), stop_asked, time_up]
            values = layout.mean(torch.stack(values).to(device)).tolist()
            time_up_now = values.pop() > 0
            stop_now = values.pop() > 0
            record: dict[str, Any] = {k: _finite(v, 6) for k, v in zip([*terms, "grad_norm"], values, strict=True)}
            skipped = guard.check(record["total"], record["grad_norm"])
            if skipped is None:
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update(model)
            optimizer.zero_grad(set_to_none=True)  # before the next forward: its peak memory holds no gradients
            record.update(step=step, lr=scheduler.get_last_lr()[0])
            record["images_per_second"] = round(x_data.shape[0] * layout.world / (time.perf_counter() - step_start), 2)
            if device.type == "cuda":
                record["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
            if skipped is not None:
                record.update(skipped=f"non-finite {skipped}", nonfinite_steps=guard.total)
                console.print(
                    f"[yellow]Warning:[/] step {step}: non-finite {skipped}, step skipped (weights unchanged); "
                    f"{guard.in_a_row} in a row, {guard.total} so far"
                )
            if monitor is not None and monitor.due(step):  # every process (a sharded forward is a collective)
                record.update(monitor.measure(online, x_data, cond, step, autocast))  # type: ignore[arg-type]
                warning = monitor.warning(record, step)
                if warning is not None:
                    record["warning"] = "collapse"
                    console.print(f"[yellow]Warning:[/] {warning}")
            record["seconds"] = round(time.perf_counter() - start, 3)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
            guard.raise_if_exceeded(step)
            loss = "non-finite" if record["total"] is None else f"{record['total']:.4f}"
            progress.update(task_id, loss=f"loss {loss}")
            progress.advance(task_id)
            if not console.is_terminal and step % max(train.steps // 10, 1) == 0:  # no live bar: plain lines
                console.print(f"{kind} {recipe.name}: step {step}/{train.steps}, {loss} loss")
            if stop_now and step < train.steps:  # SIGINT / SIGTERM: save, then stop
                saved = save_periodic(step)
                signum = stop.signal or signal.SIGTERM
                raise RunInterruptedError(
                    f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved to {saved}",
                    hint="run the same command with --resume to continue exactly from there",
                )
            if train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.steps:
                save_periodic(step)
            if time_up_now and step < train.steps:  # train.max_minutes: final/ at this step, resumable
                last_step = step
                console.print(f"train.max_minutes={train.max_minutes:g} spent after step {step}: stopping")
                break
    train_seconds = time.perf_counter() - start
    state = _training_state(model, optimizer, scheduler, ema, critic, guard, last_step, layout)
    checkpoint = _save(run_dir / FINAL, recipe_yaml, model, ema, critic, meta, state, layout)

    metrics: dict[str, Any] = {}
    if recipe.output.evaluate and layout.main:
        console.print("[dim]evaluating the run ...[/]")
        sampled = ema.model if ema is not None else model
        model.eval()
        student = None if kind == "teacher" else sampled
        metrics = task.report(run_dir, student, sampled if teacher is None else teacher, console)
    metrics["train_seconds"] = round(train_seconds, 2)
    if layout.main:
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    return RunResult(run_dir=run_dir, checkpoint=checkpoint, metrics=metrics, train_seconds=train_seconds, kind=kind)


def _teacher_pairs(
    recipe: Recipe,
    task: Any,
    model: nn.Module,
    teacher: nn.Module | None,
    run_dir: Path,
    device: torch.device,
    layout: Layout,
    resume: bool,
    console: Console,
) -> TeacherPairs | None:
    """The pool of ``method.regression_pairs`` (``train/pairs.py``): read from the run directory when the run
    resumes, else generated by the teacher and written there (a fresh or overwritten run never reuses a pool that
    another recipe may have made); None when the recipe has none.

    Each process generates and keeps its own share (``teacher-pairs.safetensors``, or ``...-rank<r>...`` for
    several processes), from its own seed.
    """
    method = recipe.method
    if not method.regression_pairs:
        return None
    name = PAIRS_FILENAME if layout.world == 1 else PAIRS_FILENAME.replace(".", f"-rank{layout.rank}.", 1)
    path = run_dir / name
    n = method.regression_pairs // layout.world
    if resume and path.is_file():
        pool = TeacherPairs.load(path, device)
        if len(pool) == n:
            console.print(f"[dim]teacher pairs: {len(pool)} read from {path}[/]")
            return pool
    if resume and teacher is None:  # the online model is no longer the teacher
        raise CheckpointError(
            f"{path} is missing or holds another number of pairs, and a resumed run cannot regenerate its teacher "
            "pairs from trained weights",
            hint="start the run again without --resume (or --overwrite it)",
        )
    source = teacher if teacher is not None else model
    batches = task.batches(source, GENERATE_BATCH, recipe.train.seed + 104_729, device, 0, (layout.rank, layout.world))
    first_x, first_cond = next(batches)

    def conditions() -> Iterator[dict[str, torch.Tensor]]:
        yield first_cond
        for _, cond in batches:
            yield cond

    guidance = method.regression_guidance
    settings = SamplerSettings(style="mul", nfe=method.regression_nfe, gap=(0.0, 0.0), guidance=guidance)
    was_training = source.training
    source.eval()
    with Progress(
        TextColumn("[bold]teacher pairs"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task_id = progress.add_task("pairs", total=n)
        every = max(n // 10, 1)

        def advance(k: int) -> None:
            before = int(progress.tasks[0].completed)
            progress.advance(task_id, k)
            if not console.is_terminal and (before + k) // every > before // every:  # no live bar: plain lines
                console.print(f"teacher pairs: {min(before + k, n)}/{n}")

        pool = generate_pairs(
            source,
            conditions(),
            lambda k: source.unconditional(k, device),  # type: ignore[operator]
            n,
            tuple(first_x.shape[1:]),
            settings,
            seed=recipe.train.seed + 7919 * layout.rank,
            advance=advance,
        )
    source.train(was_training)
    pool.save(path)
    console.print(
        f"teacher pairs: {n} images in {method.regression_nfe} Euler steps (guidance {method.regression_guidance:g}), "
        f"written to {path}"
    )
    return pool


def _arrange(
    recipe: Recipe, model: nn.Module, teacher: nn.Module | None, layout: Layout
) -> tuple[Any, EMA | AdapterEMA | None, ObjectiveModels]:
    """Lay the models out over the processes and build the E7 reference and E8 rollout at the least memory.

    Returns:
        ``(online, ema, models)``: ``online`` is what evaluates the trained network (the model itself, or its DDP
        entry point), ``ema`` the EMA (None without one), ``models`` the objective's three networks.

    Memory: a LoRA model's EMA holds only the adapters (:class:`AdapterEMA`) and its frozen reference is the model
    with the adapters off (:class:`AdaptersDisabled`): neither copies the base. Full fine-tuning copies the model for
    an EMA or a frozen reference (before sharding, so the copy is sharded alike under FSDP).
    """
    method, lora = recipe.method, getattr(model, "has_lora", False)
    full_ema = EMA(model, method.ema_decay) if method.reference == "ema" and not lora else None
    frozen = None  # one frozen teacher serves a frozen reference (E7) and target_velocity: teacher alike
    if not lora and (method.reference == "frozen" or method.target_velocity == "teacher"):
        frozen = teacher if teacher is not None else copy.deepcopy(model).requires_grad_(False).eval()
    online: Any = model
    if layout.sharded:
        shard(model, recipe.hardware.cpu_offload)
        for copy_ in (full_ema.model if full_ema else None, frozen):
            if copy_ is not None:
                shard(copy_, recipe.hardware.cpu_offload)
    elif layout.world > 1:
        online = Replicated(model)
    ema: EMA | AdapterEMA | None = full_ema
    if method.reference == "ema" and lora:
        ema = AdapterEMA(model, method.ema_decay, online.velocity)
    if method.reference == "frozen":
        reference = AdaptersDisabled(model, online.velocity) if lora else frozen
    else:
        reference = {"ema": ema.model if ema else None, "online": online}[method.reference]
    rollout = ema.model if ema is not None else online
    teacher_velocity = None
    if method.target_velocity == "teacher":
        teacher_velocity = reference if method.reference == "frozen" else frozen
        if lora and teacher_velocity is None:
            teacher_velocity = AdaptersDisabled(model, online.velocity)
    models = ObjectiveModels(online=online, reference=reference, rollout=rollout, teacher=teacher_velocity)  # type: ignore[arg-type]
    return online, ema, models


def real_score(
    recipe: Recipe, model: nn.Module, teacher: nn.Module | None, models: ObjectiveModels, online: Any
) -> Any:
    """The frozen teacher that the DMD2 baseline's real score evaluates (None without ``method.fake_score``).

    Call it before the first step. A frozen reference (E7) is that same teacher and is reused, so the two cost one
    copy; a LoRA student's teacher is itself with the adapters off (no copy).
    """
    if recipe.method.fake_score is None:
        return None
    if models.teacher is not None:  # target_velocity: teacher already holds it
        return models.teacher
    if recipe.method.reference == "frozen":
        return models.reference
    if getattr(model, "has_lora", False):
        return AdaptersDisabled(model, online.velocity)
    return teacher if teacher is not None else copy.deepcopy(model).requires_grad_(False).eval()


def _load_init(recipe: Recipe, model: nn.Module, console: Console) -> nn.Module | None:
    """Load ``model.init`` into ``model`` (training it first from ``model.init_recipe`` if it is missing).

    Returns:
        A frozen copy of the loaded model (the teacher), or None when training from scratch.
    """
    init = getattr(recipe.model, "init", None)  # a diffusers teacher is its pipeline: it has no init checkpoint
    if init is None:
        return None
    path = Path(init)
    shipped = init.startswith(SHIPPED_PREFIX)
    if not shipped and not (path / FINAL / "meta.json").is_file() and not (path / "meta.json").is_file():
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
    directory, init_recipe, _ = read_checkpoint(init if shipped else path)
    if init_recipe.data != recipe.data:
        mine, theirs = recipe.data.model_dump(), init_recipe.data.model_dump()
        diff = ", ".join(f"data.{k}: {theirs[k]!r} vs {mine[k]!r}" for k in mine if mine[k] != theirs[k])
        raise CheckpointError(
            f"model.init {directory} was trained on other data ({diff})",
            hint="train a matching teacher with the same --set data.* overrides and point model.init at it",
        )
    mine, theirs = recipe.model.model_dump(), init_recipe.model.model_dump()
    architecture = [k for k in mine if k not in ("init", "init_recipe", "lora")]  # LoRA is how it trains, not what
    diff = ", ".join(f"model.{k}: {theirs.get(k)!r} vs {mine[k]!r}" for k in architecture if mine[k] != theirs.get(k))
    if diff:
        raise CheckpointError(f"model.init {directory} has another architecture ({diff})")
    load_as_base(model, directory)  # EMA weights if any, adapters merged, a teacher's Emb2 := Emb1
    return copy.deepcopy(model).requires_grad_(False).eval()


def _save(
    directory: Path,
    recipe_yaml: str,
    model: nn.Module,
    ema: EMA | AdapterEMA | None,
    critic: FakeScore | None,
    meta: dict[str, Any],
    state: dict[str, Any],
    layout: Layout,
) -> Path:
    """A checkpoint at ``state["step"]``; a LoRA model writes only its trained tensors (adapters and embedder).

    The DMD2 baseline's fake score is saved beside the model (``fake_score.safetensors``), to resume from.
    Every process takes part in gathering the weights (FSDP); process 0 writes them.
    """
    weights = {"model": _weights(model, layout)}
    if ema is not None:
        weights["ema"] = full_tensors(ema.model.shadow) if isinstance(ema, AdapterEMA) else _weights(ema.model, layout)
    if critic is not None:
        weights[FAKE_SCORE_STEM] = _weights(critic.network, layout)
    if layout.main:
        save_checkpoint(directory, recipe_yaml, weights, {"step": state["step"], **meta}, state)
    layout.barrier()
    return directory


def _weights(model: nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    """The full weights a checkpoint holds: everything, or a LoRA model's trained tensors only."""
    keys = model._lora_keys if getattr(model, "has_lora", False) else None  # type: ignore[union-attr]
    return full_state_dict(model, layout, keys)


def _finite(value: float, digits: int) -> float | None:
    """A logged number: rounded, or None (JSON null) when it is NaN or infinite."""
    return round(value, digits) if math.isfinite(value) else None


def _truncate_log(log_path: Path, last_step: int) -> None:
    """Keep the records of steps up to ``last_step`` (none for a fresh run); drop a line cut short by a kill."""
    if last_step == 0 or not log_path.is_file():
        log_path.unlink(missing_ok=True)
        return
    kept = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
    atomic_write_text(log_path, "".join(kept))


def _training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema: EMA | AdapterEMA | None,
    critic: FakeScore | None,
    guard: NonFiniteGuard,
    step: int,
    layout: Layout,
) -> dict[str, Any]:
    """What resuming needs besides the weights; every process takes part (FSDP gathers the optimizer state)."""
    if layout.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    else:
        optimizer_state = optimizer.state_dict()
    state = {
        "step": step,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "ema_decay": ema.current_decay if ema is not None else None,
        "torch_rng": torch.get_rng_state(),
        "nonfinite_steps": guard.total,
        "nonfinite_in_a_row": guard.in_a_row,
    }
    if critic is not None:
        state["fake_score"] = critic.state_dict()
    if layout.world > 1:
        state["torch_rng_ranks"] = layout.gather(torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _resume(
    recipe: Recipe,
    run_dir: Path,
    resume: bool | str,
    force: bool,
    model: nn.Module,
    ema: EMA | AdapterEMA | None,
    critic: FakeScore | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    meta: dict[str, Any],
    layout: Layout,
    console: Console,
) -> dict[str, Any]:
    """Load the weights and training state of a checkpoint; return that state (``state["step"]``: where it was).

    ``resume=True`` takes the newest complete checkpoint of the run, skipping (and naming) any that does not match
    its manifest; an explicit checkpoint that does not match is refused. A LoRA run's ``model`` (and EMA) already
    hold the base and fresh adapters: only the saved adapters are loaded.
    """
    if resume is True:
        skipped: list[Path] = []

        def skip(path: Path, problem: str) -> None:
            skipped.append(path)
            console.print(f"[yellow]Warning:[/] skipping checkpoint {path}: {problem}")

        directory = latest_checkpoint(run_dir, on_skip=skip)
        if directory is None and skipped:
            raise CheckpointError(
                f"--resume: {run_dir} has no complete checkpoint ({len(skipped)} incomplete or corrupt)",
                hint="start the run again without --resume (add --overwrite if it had finished)",
            )
        if directory is None:
            raise CheckpointError(f"--resume: {run_dir} has no checkpoint yet", hint="start the run without --resume")
    else:
        directory = resolve_checkpoint(str(resume))
        problem = checkpoint_problem(directory)
        if problem is not None:
            raise CheckpointError(
                f"checkpoint {directory} is incomplete or corrupt: {problem}",
                hint="resume from an earlier checkpoint, or use --resume alone to take the run's newest complete one",
            )
    _, saved, saved_meta = read_checkpoint(directory)
    differences = _differences(saved.model_dump(mode="json"), recipe.model_dump(mode="json"))
    blocking = [d for d in differences if not d.startswith(RESUMABLE_CHANGES)]
    if blocking and not force:
        raise CheckpointError(
            f"{directory} was written by a different recipe: " + "; ".join(blocking),
            hint="resume with the same recipe, or pass --force to resume anyway",
        )
    if meta.get("adapters") and saved_meta.get("base_sha256") != meta["base_sha256"] and not force:
        raise CheckpointError(
            f"the base model {meta['base']!r} has changed since {directory} was written",
            hint="restore the original base checkpoint, or pass --force to resume on the new one",
        )
    state = load_training_state(directory)
    if state["step"] >= recipe.train.steps:
        raise CheckpointError(
            f"{directory} is at step {state['step']}, the recipe stops at train.steps={recipe.train.steps}",
            hint="raise train.steps with --set train.steps=N to train further",
        )
    if layout.sharded:  # full tensors into the shards
        load_full_state_dict(model, read_weights(directory, "model"), layout)
        if ema is not None:
            load_full_state_dict(ema.model, read_weights(directory, "ema"), layout)
    elif getattr(model, "has_lora", False):
        model.load_trainable_state_dict(read_weights(directory, "model"))  # type: ignore[operator]
        if ema is not None:
            ema.model.load_trainable_state_dict(read_weights(directory, "ema"))  # type: ignore[operator]
        if critic is not None:
            critic.network.load_trainable_state_dict(read_weights(directory, FAKE_SCORE_STEM))
    else:
        load_weights(model, directory, "model")
        if ema is not None:
            load_weights(ema.model, directory, "ema")
        if critic is not None:
            load_weights(critic.network, directory, FAKE_SCORE_STEM)
    if critic is not None:
        critic.load_state_dict(state["fake_score"])
    if ema is not None:
        ema.current_decay = state["ema_decay"]
    if layout.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"], options=options)
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state.get("torch_rng_ranks", [state["torch_rng"]] * layout.world)[layout.rank])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    console.print(f"Resuming from {directory} (step {state['step']}).")
    return state


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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (without it, bf16 autocast is emulated and slow)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # oneDNN: AVX512-BF16 / AMX on x86
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device, console: Console | None = None) -> str:
    """``hardware.precision`` as run: ``auto`` becomes bf16 where the device has it natively, else fp32.

    An explicit ``bf16`` on a device without native bf16 runs as asked, with a warning: on a CPU without
    AVX512-BF16 the shapes teacher's step took 27 s in bf16 against 2.4 s in fp32.
    """
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device) and console is not None:
        console.print(
            f"[yellow]Warning:[/] hardware.precision is bf16 but this {device.type} has no native bf16, so autocast"
            " is emulated and slow; --set hardware.precision=auto picks fp32 here"
        )
    return precision


def _device(name: str, layout: Layout | None = None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ApexError("hardware.device is 'cuda' but no CUDA device is available", hint="--set hardware.device=cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", layout.local_rank if layout is not None else torch.cuda.current_device())


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
