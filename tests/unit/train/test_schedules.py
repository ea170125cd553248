"""Schedules of the training loop: the learning rate (warm-up, constant or cosine) and the lambda_dm warm-up."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from apex_cli.config import TrainConfig
from apex_cli.train.loop import lr_factor


def _train(**overrides: object) -> TrainConfig:
    return TrainConfig(**{"steps": 10, "batch_size": 4, "lr": 1.0, "warmup_steps": 2, **overrides})


def test_constant_schedule_is_warmup_then_one() -> None:
    assert [lr_factor(_train(), s) for s in range(10)] == [0.5] + [1.0] * 9


def test_cosine_schedule_by_hand() -> None:
    train = _train(lr_schedule="cosine", final_lr_ratio=0.1)
    factors = [lr_factor(train, s) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    # step s (0-based) has done = s + 1 updates; progress = (done - 2) / 8 after the 2 warm-up steps
    for s in range(2, 10):
        progress = (s + 1 - 2) / 8
        assert factors[s] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert factors[-1] == pytest.approx(0.1)  # the last step runs at final_lr_ratio x lr
    assert all(a >= b for a, b in itertools.pairwise(factors[1:]))


def test_cosine_follows_a_shorter_budget() -> None:
    assert lr_factor(_train(steps=4, lr_schedule="cosine"), 3) == pytest.approx(0.0)


def test_schedule_drives_the_optimizer() -> None:
    """The factor is what LambdaLR applies: the lr read after each scheduler step."""
    train = _train(steps=5, warmup_steps=1, lr_schedule="cosine", final_lr_ratio=0.5)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(train, s))
    seen = []
    for _ in range(5):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([2.0 * lr_factor(train, s) for s in range(5)])
    assert seen[-1] == pytest.approx(1.0)


def test_dist_match_warmup_ramps_lambda_dm() -> None:
    from apex_cli.core.objective import ObjectiveSettings
    from apex_cli.train.loop import warmed_up

    settings = ObjectiveSettings(dist_match_coef=0.8)
    assert [warmed_up(settings, 4, s).dist_match_coef for s in (1, 2, 3, 4, 9)] == pytest.approx(
        [0.2, 0.4, 0.6, 0.8, 0.8]
    )
    assert warmed_up(settings, 0, 1) is settings  # no warm-up: the recipe's settings, untouched
    assert warmed_up(settings, 4, 2).estimate_order == settings.estimate_order


@pytest.mark.parametrize("dist_match_loss", [None, "l2", "barron"])
def test_dist_match_loss_reaches_the_objective(dist_match_loss) -> None:
    """The recipe's null stays None: the objective reads it as ``method.loss`` (tested in test_objective)."""
    from apex_cli.config import load_recipe
    from apex_cli.train.loop import objective_settings

    overrides = [f"method.dist_match_loss={dist_match_loss}"] if dist_match_loss else []
    settings = objective_settings(load_recipe("shapes-apex-cpu", ["method.loss=l2", *overrides]))
    assert (settings.loss, settings.adversarial_loss) == ("l2", dist_match_loss)
