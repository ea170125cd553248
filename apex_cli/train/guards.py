"""Guards of a running distillation: non-finite steps are skipped and counted, one-step samples are watched.

Both report through the training loop's log (``metrics.jsonl``) and console; neither changes what a healthy run
computes, so a run with guards is bit-identical to one without (the monitor draws its noise under a forked RNG).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from apex_cli.config import MonitorConfig, Recipe
from apex_cli.core.objective import Condition, one_step
from apex_cli.errors import TrainingError


@dataclass
class NonFiniteGuard:
    """Counts steps whose loss or gradient norm is NaN or infinite; ``limit`` of them in a row stop the run.

    The loop skips such a step: no optimizer, scheduler or EMA update, so the weights stay as they were.
    """

    recipe: Recipe
    in_a_row: int = 0
    total: int = 0

    def check(self, loss: float | None, grad_norm: float | None) -> str | None:
        """``None`` when the step may update the weights; else what was non-finite (``"loss"`` or ``"gradient"``)."""
        if loss is not None and math.isfinite(loss) and grad_norm is not None and math.isfinite(grad_norm):
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        self.total += 1
        return "gradient" if loss is not None and math.isfinite(loss) else "loss"

    def raise_if_exceeded(self, step: int) -> None:
        """Stop the run once ``train.max_nonfinite_steps`` steps in a row were non-finite.

        Raises:
            TrainingError: With the likely causes and the recipe fields to change.
        """
        limit = self.recipe.train.max_nonfinite_steps
        if self.in_a_row < limit:
            return
        train, precision = self.recipe.train, self.recipe.hardware.precision
        raise TrainingError(
            f"{self.in_a_row} steps in a row (steps {step - self.in_a_row + 1} to {step}) had a non-finite loss or "
            f"gradient, so the run stopped (train.max_nonfinite_steps={limit}); likely causes: a learning rate too "
            f"high (train.lr={train.lr:g}), exploding gradients (train.grad_clip={train.grad_clip:g}), overflow in "
            f"reduced precision (hardware.precision={precision}), or a model.init that already outputs NaN",
            hint=f"lower train.lr (e.g. --set train.lr={train.lr / 10:g}) or train.grad_clip, or set "
            "hardware.precision=fp32, then continue from the last checkpoint with --resume --force",
        )


def sample_statistics(samples: Tensor, data: Tensor, constant_std: float) -> dict[str, Tensor]:
    """How varied a batch of generated samples is, next to a batch of real data (no ``.item()``).

    Args:
        samples: Generated samples ``[B, ...]``.
        data: Real data of the same shape, the yardstick.
        constant_std: An image is near-constant when its own std over pixels is below ``constant_std`` times the
            mean per-image std of ``data``.

    Returns:
        ``diversity``: mean over features of the std across the batch, relative to the same for ``data``
        (1 = as varied as the data, 0 = every sample the same); for images (``ndim >= 3``) also
        ``constant_fraction``: the share of near-constant (flat colour) samples.
    """
    images = samples.ndim >= 3
    samples, data = samples.detach().float().flatten(1), data.detach().float().flatten(1)
    stats = {"diversity": _spread(samples) / _spread(data).clamp_min(1e-12)}
    if images:
        flat = samples.std(dim=1, correction=0) < constant_std * data.std(dim=1, correction=0).mean()
        stats["constant_fraction"] = flat.float().mean()
    return stats


def _spread(x: Tensor) -> Tensor:
    """Mean over features of the std across the batch of ``x [B, D]``."""
    return x.std(dim=0, correction=0).mean()


@dataclass
class CollapseMonitor:
    """Measures one-step samples of the student every ``monitor.every`` steps and warns when they look collapsed.

    A warning is given when the run enters the collapsed state (diversity below ``monitor.min_diversity`` or more
    than ``monitor.max_constant_fraction`` near-constant images), not again until it has left it.
    """

    config: MonitorConfig
    collapsed: bool = False

    def due(self, step: int) -> bool:
        """Whether ``step`` is a measuring step."""
        return self.config.every > 0 and step % self.config.every == 0

    def measure(
        self,
        model: nn.Module,
        x_data: Tensor,
        cond: Condition,
        step: int,
        autocast: contextlib.AbstractContextManager,
    ) -> dict[str, float]:
        """One-step samples of ``model`` from noise seeded by ``step``, on ``cond``, measured against ``x_data``.

        The training RNG is forked around the draw, so measuring does not change the run.
        """
        devices = [x_data.device] if x_data.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast:
            torch.manual_seed(step)
            samples = one_step(model, torch.randn_like(x_data), cond)  # type: ignore[arg-type]
        stats = sample_statistics(samples, x_data, self.config.constant_std)
        values = torch.stack(list(stats.values())).tolist()  # one sync
        return {name: round(value, 4) for name, value in zip(stats, values, strict=True)}

    def warning(self, values: dict[str, float], step: int) -> str | None:
        """The warning to show for the values measured at ``step``, if the run has just entered a collapse."""
        cfg = self.config
        reasons = []
        if values["diversity"] < cfg.min_diversity:
            reasons.append(f"diversity {values['diversity']:.3f} < monitor.min_diversity {cfg.min_diversity:g}")
        if values.get("constant_fraction", 0.0) > cfg.max_constant_fraction:
            reasons.append(
                f"{values['constant_fraction']:.0%} near-constant images > monitor.max_constant_fraction "
                f"{cfg.max_constant_fraction:g}"
            )
        was_collapsed, self.collapsed = self.collapsed, bool(reasons)
        if not reasons or was_collapsed:
            return None
        return (
            f"the student's one-step samples look collapsed at step {step} ({'; '.join(reasons)}); if this persists, "
            "lower train.lr or method.dist_match_coef, or resume from an earlier checkpoint"
        )
