"""The guards on their own: non-finite step counting and its stop message; the collapse statistics and warning."""

from __future__ import annotations

import math

import pytest
import torch

from apex_cli.config import MonitorConfig, load_recipe
from apex_cli.errors import TrainingError
from apex_cli.train.guards import CollapseMonitor, NonFiniteGuard, sample_statistics


def test_non_finite_steps_are_counted_and_a_finite_one_resets_the_streak() -> None:
    guard = NonFiniteGuard(load_recipe("toy2d-apex", ["train.max_nonfinite_steps=3"]))
    assert guard.check(1.0, 2.0) is None
    assert guard.check(None, None) == "loss"
    assert guard.check(math.nan, 1.0) == "loss"
    assert guard.check(1.0, math.inf) == "gradient"
    assert (guard.in_a_row, guard.total) == (3, 3)
    assert guard.check(1.0, 1.0) is None
    assert (guard.in_a_row, guard.total) == (0, 3)
    guard.raise_if_exceeded(5)  # no streak: nothing happens


def test_k_non_finite_steps_in_a_row_stop_with_causes_and_fields() -> None:
    recipe = load_recipe("toy2d-apex", ["train.max_nonfinite_steps=2", "hardware.precision=bf16"])
    guard = NonFiniteGuard(recipe)
    guard.check(None, None)
    guard.raise_if_exceeded(7)
    guard.check(None, None)
    with pytest.raises(TrainingError) as info:
        guard.raise_if_exceeded(8)
    message = str(info.value)
    assert message.startswith("2 steps in a row (steps 7 to 8) had a non-finite loss or gradient")
    for field in ("train.lr=0.0003", "train.grad_clip=1", "hardware.precision=bf16", "model.init"):
        assert field in message
    assert "--set train.lr=3e-05" in info.value.hint and "--resume --force" in info.value.hint


def test_sample_statistics_of_real_like_and_collapsed_images() -> None:
    generator = torch.Generator().manual_seed(0)
    data = torch.rand(16, 3, 8, 8, generator=generator) * 2 - 1
    varied = sample_statistics(data.flip(0), data, constant_std=0.05)
    assert varied["diversity"].item() == pytest.approx(1.0)
    assert varied["constant_fraction"].item() == 0.0
    flat = torch.zeros(16, 3, 8, 8)
    flat[:, 0] = 0.5  # every image the same flat red
    collapsed = sample_statistics(flat, data, constant_std=0.05)
    assert collapsed["diversity"].item() == 0.0
    # A flat colour per image, each different: diverse across the batch, yet every image near-constant.
    tinted = torch.linspace(-1, 1, 16).view(16, 1, 1, 1).expand(16, 3, 8, 8)
    stats = sample_statistics(tinted, data, constant_std=0.05)
    assert stats["diversity"].item() > 0.5 and stats["constant_fraction"].item() == 1.0


def test_points_have_no_constant_fraction() -> None:
    points = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    assert set(sample_statistics(points, points, 0.05)) == {"diversity"}


def test_the_warning_fires_when_entering_a_collapse_not_on_every_measurement() -> None:
    monitor = CollapseMonitor(MonitorConfig(every=5, min_diversity=0.1, max_constant_fraction=0.5))
    assert not monitor.due(4) and monitor.due(5) and monitor.due(10)
    assert monitor.warning({"diversity": 0.8, "constant_fraction": 0.0}, 5) is None
    warning = monitor.warning({"diversity": 0.01, "constant_fraction": 1.0}, 10)
    assert "collapsed at step 10" in warning
    assert "diversity 0.010 < monitor.min_diversity 0.1" in warning
    assert "100% near-constant images > monitor.max_constant_fraction 0.5" in warning
    assert monitor.warning({"diversity": 0.01, "constant_fraction": 1.0}, 15) is None  # still collapsed
    assert monitor.warning({"diversity": 0.9, "constant_fraction": 0.0}, 20) is None  # recovered
    assert monitor.warning({"diversity": 0.05}, 25) is not None  # collapsed again


def test_measuring_does_not_move_the_training_rng() -> None:
    class Constant(torch.nn.Module):
        def velocity(self, x_t, t, r, cond):
            return x_t - 0.5  # one step: x_hat = noise - (noise - 0.5) = 0.5 everywhere

    monitor = CollapseMonitor(MonitorConfig())
    data = torch.rand(8, 3, 4, 4) * 2 - 1
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    values = monitor.measure(Constant(), data, {}, step=10, autocast=torch.autocast("cpu", enabled=False))
    assert torch.equal(torch.rand(3), expected)
    assert values == {"diversity": 0.0, "constant_fraction": 1.0}
