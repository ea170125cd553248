import math

import pytest
import torch
from torch import nn

from apex_cli.core import objective
from apex_cli.core.objective import (
    ObjectiveModels,
    ObjectiveSettings,
    adversarial_direction,
    apex_loss,
    consistency_target,
    guidance_target,
    per_sample_loss,
    split_roles,
    teacher_target,
    time_weight,
)
from apex_cli.core.shift import ConditionShift
from apex_cli.models.toy2d import Toy2dMLP

D64 = torch.float64


class Affine(nn.Module):
    """F(x, t, r, c) = 2 x + t - r + c (1 + t): simple enough to derive every target by hand."""

    def __init__(self):
        super().__init__()
        self.text_projection = nn.Identity()

    def velocity(self, x_t, t, r, cond):
        h = self.text_projection(cond["c"])
        return 2 * x_t + (t - r).view(-1, 1) + h * (1 + t).view(-1, 1)


def scalar(value):
    return torch.tensor([[value]], dtype=D64)


def times(*values):
    return torch.tensor(values, dtype=D64)


# ---- role split -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "fractions", "expected"),
    [
        (8, (1, 1, 1, 1), (2, 2, 2, 2)),
        (10, (1, 1, 1, 1), (3, 3, 2, 2)),  # largest remainder, ties to the earlier role
        (8, (1, 1, 0, 1), (3, 3, 0, 2)),
        (4, (0, 1, 0, 0), (0, 4, 0, 0)),
        (5, (1, 0, 0, 0.01), (4, 0, 0, 1)),  # an active role always gets a row
        (6, (2, 1, 1, 0), (3, 2, 1, 0)),
    ],
)
def test_role_split_sizes(batch, fractions, expected):
    sizes = split_roles(batch, fractions)
    assert (sizes.e2e, sizes.mul, sizes.any, sizes.adv) == expected
    assert sizes.total == batch


def test_role_split_rejects_batch_smaller_than_active_roles():
    with pytest.raises(ValueError, match="batch size 3 is smaller than the 4 active roles"):
        split_roles(3, (1, 1, 1, 1))


# ---- E7 ---------------------------------------------------------------------------------------------------


def test_guidance_target_is_cond_plus_lambda_cond_minus_uncond():
    model = Affine()
    x_t = torch.tensor([[0.5], [1.0], [2.0]], dtype=D64)
    t = times(0.25, 0.5, 1.0)  # the last row has t = 1: no guidance there
    v = torch.tensor([[0.1], [0.2], [0.3]], dtype=D64)
    cond, uncond = {"c": torch.tensor([[1.0], [3.0], [1.0]], dtype=D64)}, {"c": torch.zeros(3, 1, dtype=D64)}
    out = guidance_target(model, x_t, t, v, cond, uncond, scale=0.5)
    # F(c) - F(e) = c (1 + t): row 0: 1.25 -> 0.1 + 0.625 ; row 1: 4.5 -> 0.2 + 2.25 ; row 2 unchanged
    torch.testing.assert_close(out, torch.tensor([[0.725], [2.45], [0.3]], dtype=D64))


def test_teacher_target_is_the_guided_teacher_velocity_at_every_row():
    model = Affine()
    x_t = torch.tensor([[0.5], [1.0], [2.0]], dtype=D64)
    t = times(0.25, 0.5, 1.0)  # t = 1 too: the teacher's guided sampler starts there
    cond, uncond = {"c": torch.tensor([[1.0], [3.0], [1.0]], dtype=D64)}, {"c": torch.zeros(3, 1, dtype=D64)}
    # F(c) at r = t is 2 x + c (1 + t) = 2.25, 6.5, 6.0; F(c) - F(e) = c (1 + t) = 1.25, 4.5, 2.0
    out = teacher_target(model, x_t, t, cond, uncond, scale=0.5)
    torch.testing.assert_close(out, torch.tensor([[2.875], [8.75], [7.0]], dtype=D64))
    torch.testing.assert_close(
        teacher_target(model, x_t, t, cond, uncond, 0.0), torch.tensor([[2.25], [6.5], [6.0]], dtype=D64)
    )


def _teacher_velocity_loss(scale):
    """Flow-matching rows (l2, no E8) whose target is the guided velocity of a teacher equal to the student."""
    model = _toy()
    models = ObjectiveModels(model, model, model, teacher=model)
    x, cond = torch.randn(6, 2, dtype=D64), {"labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    settings = ObjectiveSettings(
        role_fractions=(0, 1, 0, 0), consistency_ratio=0.0, estimate_order=0, loss="l2", dist_match_coef=0.0,
        enhanced_ratio=scale, target_velocity="teacher",
    )  # fmt: skip
    torch.manual_seed(11)
    out = apex_loss(models, x, cond, model.unconditional(6), settings, None)
    torch.manual_seed(11)
    t = torch.rand(6, dtype=D64)
    torch.rand(6, dtype=D64)  # u, unused when k = 0
    x_t = (1 - t[:, None]) * x + t[:, None] * torch.randn_like(x)
    gap = model.velocity(x_t, t, t, cond) - model.velocity(x_t, t, t, model.unconditional(6))
    return out.total, gap


def test_teacher_velocity_replaces_the_data_velocity():
    loss, _ = _teacher_velocity_loss(0.0)
    assert loss.item() == 0.0  # the student is the teacher: the data (z - x) no longer enter the target
    loss, gap = _teacher_velocity_loss(2.0)
    # the target is F(c) + 2 (F(c) - F(e)), so the residual is 2 x the guidance gap; w(t, t) = tan(pi / 2.5) + 1
    expected = ((2 * gap) ** 2).mean(1).mean() * (math.tan(math.pi / 2.5) + 1)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_teacher_velocity_needs_the_teacher():
    model = _toy()
    settings = ObjectiveSettings(role_fractions=(0, 1, 0, 0), estimate_order=0, target_velocity="teacher")
    x, cond = torch.randn(4, 2, dtype=D64), {"labels": torch.arange(4) % 3}
    with pytest.raises(ValueError, match="frozen teacher"):
        apex_loss(ObjectiveModels(model, model, model), x, cond, model.unconditional(4), settings, None)


# ---- E8 ---------------------------------------------------------------------------------------------------


def _e8(order, r, clip=10.0):
    model = Affine()
    x_t, t, v = scalar(1.0), times(0.5), scalar(0.3)
    cond = {"c": scalar(0.0)}
    velocity = model.velocity(x_t, t, times(r), cond)
    return consistency_target(model, velocity, x_t, t, times(r), v, cond, order, delta=0.1, clip=clip)


def test_e8_with_order_zero_is_plain_flow_matching():
    assert _e8(0, 0.1).item() == pytest.approx(0.3)


def test_e8_order_one_is_the_finite_difference():
    # F = F(1, .5, .1) = 2.4 ; x' = 1 - .1 * .3 = .97 ; F(x', .4, .1) = 2.24 ; D = 2.24 * .3 = .672
    # R = (.4 / .1)(2.4 - (.03 + .672) / .4) = 2.58 ; target = 2.4 - 2.58
    assert _e8(1, 0.1).item() == pytest.approx(-0.18)
    assert _e8(1, 0.1, clip=1.0).item() == pytest.approx(1.4)  # R clipped to 1


def test_e8_order_two_rolls_two_euler_steps():
    # tau = .4, .25, .1 ; f0 = F(.97, .4, .25) = 2.09 ; x1 = .97 - .15 * 2.09 = .6565 ; f1 = F(.6565, .25, .1) = 1.463
    # D = .15 (2.09 + 1.463) = .53295 ; R = 4 (2.4 - (.03 + .53295) / .4) = 3.9705 ; target = 2.4 - 3.9705
    assert _e8(2, 0.1).item() == pytest.approx(-1.5705)


def test_e8_below_delta_falls_back_to_the_velocity_residual():
    # Delta = .05 < delta: R = F - v = 2.05 - .3 ; the target is v (unclipped) or F - 1 (clipped)
    assert _e8(2, 0.45).item() == pytest.approx(0.3)
    assert _e8(2, 0.45, clip=1.0).item() == pytest.approx(1.05)
    assert torch.isfinite(_e8(2, 0.5)).all()  # Delta = 0 does not divide by zero


# ---- E9, E10 ----------------------------------------------------------------------------------------------


def test_barron_value_and_gradient_match_the_closed_form():
    target = torch.zeros(1, 2, dtype=D64)
    pred = torch.tensor([[0.003, 0.004]], dtype=D64, requires_grad=True)
    loss = per_sample_loss(pred, target, "barron", c=1e-3)
    m = 12.5e-6  # mean of squares
    assert loss.item() == pytest.approx(m / math.sqrt(m + 1e-6), rel=1e-12)  # m w / c = m / sqrt(m + c^2)
    loss.sum().backward()
    expected = 2 * pred.detach() / 2 / math.sqrt(m + 1e-6)  # (w / c) dm/dF with w detached
    torch.testing.assert_close(pred.grad, expected, rtol=1e-12, atol=0)


def test_l2_loss_is_the_mean_square():
    assert per_sample_loss(scalar(3.0), scalar(1.0), "l2").item() == 4.0


@pytest.mark.parametrize(("gap", "expected"), [(0.0, 4.078), (0.5, 1.727), (1.0, 1.0)])
def test_time_weight_values(gap, expected):
    assert time_weight(times(1.0), times(1.0 - gap)).item() == pytest.approx(expected, abs=1e-3)
    assert time_weight(times(-1.0), times(-(1.0 - gap))).item() == pytest.approx(expected, abs=1e-3)  # |t|


# ---- E12 --------------------------------------------------------------------------------------------------


def test_adversarial_direction_is_fake_minus_real_velocity():
    model = Affine()
    x_gen = torch.randn(4, 1, dtype=D64)
    cond = {"c": torch.full((4, 1), 0.2, dtype=D64)}
    torch.manual_seed(3)
    dv = adversarial_direction(model, x_gen, cond, ConditionShift("negate"))
    torch.manual_seed(3)
    t = torch.rand(4, dtype=D64)
    # v_fake - v_real = (-c - c)(1 + t) = -0.4 (1 + t), within the clip
    torch.testing.assert_close(dv, (-0.4 * (1 + t)).view(-1, 1))


def test_adversarial_gradient_moves_the_sample_along_plus_dv():
    f = torch.tensor([[0.5, -0.5]], dtype=D64, requires_grad=True)
    dv = torch.tensor([[0.2, -0.1]], dtype=D64)
    per_sample_loss(f, f.detach() - dv, "l2").sum().backward()
    # dL/dF = dv (l2 on 2 elements: 2 (F - y) / 2): descent lowers F along dv, so G = z - F moves along +dv
    torch.testing.assert_close(f.grad, dv)


# ---- the whole step ---------------------------------------------------------------------------------------


def _toy(seed=0):
    torch.manual_seed(seed)
    return Toy2dMLP(num_classes=3, hidden_dim=16, depth=2, embed_dim=8).double()


def test_flow_matching_is_the_objective_with_only_mul_rows():
    model = _toy()
    models = ObjectiveModels(model, model, model)
    x = torch.randn(6, 2, dtype=D64)
    cond, uncond = {"labels": torch.tensor([0, 1, 2, 0, 1, 2])}, model.unconditional(6)
    settings = ObjectiveSettings(
        role_fractions=(0, 1, 0, 0), consistency_ratio=0.0, estimate_order=0, loss="l2", dist_match_coef=0.0
    )
    torch.manual_seed(11)
    out = apex_loss(models, x, cond, uncond, settings, ConditionShift("negate"))
    torch.manual_seed(11)
    t = torch.rand(6, dtype=D64)
    torch.rand(6, dtype=D64)  # u, unused when k = 0
    noise = torch.randn_like(x)
    x_t = (1 - t[:, None]) * x + t[:, None] * noise
    expected = ((model.velocity(x_t, t, t, cond) - (noise - x)) ** 2).mean(1).mean() * (math.tan(math.pi / 2.5) + 1)
    torch.testing.assert_close(out.total, expected, rtol=1e-12, atol=0)
    assert set(out.terms) == {"main", "total"}


def test_no_gradient_reaches_any_target(monkeypatch):
    online, reference = _toy(0), _toy(1)
    recorded = []
    original = objective.per_sample_loss

    def recording(pred, target, kind="barron", c=1e-3):
        recorded.append((pred, target))
        return original(pred, target, kind, c)

    monkeypatch.setattr(objective, "per_sample_loss", recording)
    x = torch.randn(8, 2, dtype=D64)
    cond = {"labels": torch.arange(8) % 3}
    settings = ObjectiveSettings(enhanced_ratio=0.5, estimate_order=2)
    out = apex_loss(
        ObjectiveModels(online, reference, reference),
        x,
        cond,
        online.unconditional(8),
        settings,
        ConditionShift("negate"),
    )
    out.total.backward()
    assert len(recorded) == 2  # main loss and the self-adversarial term
    for pred, target in recorded:
        assert pred.requires_grad
        assert not target.requires_grad
    assert all(p.grad is None for p in reference.parameters())
    assert all(p.grad is not None for p in online.parameters() if p.requires_grad)
    assert set(out.terms) == {"main", "fake", "adversarial", "total"}
    assert torch.isfinite(out.total)


@pytest.mark.parametrize(
    ("main", "adversarial", "expected"),
    [("barron", "l2", "l2"), ("l2", "barron", "barron"), ("l2", None, "l2"), ("barron", None, "barron")],
)
def test_the_adversarial_term_uses_its_own_loss(monkeypatch, main, adversarial, expected):
    kinds = []
    original = objective.per_sample_loss

    def recording(pred, target, kind="barron", c=1e-3):
        kinds.append(kind)
        return original(pred, target, kind, c)

    monkeypatch.setattr(objective, "per_sample_loss", recording)
    model = _toy()
    settings = ObjectiveSettings(loss=main, adversarial_loss=adversarial, estimate_order=1)
    x, cond = torch.randn(8, 2, dtype=D64), {"labels": torch.arange(8) % 3}
    apex_loss(ObjectiveModels(model, model, model), x, cond, model.unconditional(8), settings, ConditionShift("negate"))
    assert kinds == [main, expected]


def _weighted_losses(roles, estimate_order, **weights):
    """The objective (l2, no E12) on one fixed batch and seed, once per value of the one weight knob given."""
    ((name, values),) = weights.items()
    model = _toy()
    x, cond = torch.randn(8, 2, dtype=D64), {"labels": torch.arange(8) % 3}
    outs = {}
    for value in values:
        settings = ObjectiveSettings(
            role_fractions=roles, estimate_order=estimate_order, loss="l2", dist_match_coef=0.0, **{name: value}
        )
        torch.manual_seed(5)
        outs[value] = apex_loss(
            ObjectiveModels(model, model, model), x, cond, model.unconditional(8), settings, ConditionShift("negate")
        )
    return outs


def test_fake_weight_scales_only_the_adv_rows():
    outs = _weighted_losses((0, 1, 0, 1), 0, fake_weight=(1.0, 3.0))
    # 4 mul rows and 4 adv rows over 8 included rows: the extra 2 x (sum of adv rho) / 8 is the adv rows' mean
    torch.testing.assert_close(outs[3.0].total - outs[1.0].total, outs[1.0].terms["fake"], rtol=1e-12, atol=0)
    torch.testing.assert_close(outs[3.0].terms["fake"], outs[1.0].terms["fake"], rtol=0, atol=0)


def test_e2e_weight_scales_only_the_e2e_rows(monkeypatch):
    rhos = []
    original = objective.per_sample_loss

    def recording(pred, target, kind="barron", c=1e-3):
        rhos.append(original(pred, target, kind, c))
        return rhos[-1]

    monkeypatch.setattr(objective, "per_sample_loss", recording)
    outs = _weighted_losses((1, 1, 0, 0), 1, e2e_weight=(0.0, 1.0))
    torch.testing.assert_close(rhos[0], rhos[1], rtol=0, atol=0)  # the same rows and targets both times
    # 4 e2e rows (w(1, 0) = 1) and 4 mul rows over 8 included rows
    torch.testing.assert_close(outs[1.0].total - outs[0.0].total, rhos[0][:4].sum() / 8, rtol=1e-12, atol=1e-15)


def test_fresh_student_reproduces_the_teacher_at_r_equal_t():
    teacher = _toy(0)
    student = _toy(0)
    student.load_state_dict(teacher.state_dict())
    student.init_target_time_embedder()
    x, t = torch.randn(5, 2, dtype=D64), torch.rand(5, dtype=D64)
    cond = {"labels": torch.tensor([0, 1, 2, 3, 0])}
    torch.testing.assert_close(student.velocity(x, t, t, cond), teacher.velocity(x, t, t, cond), rtol=0, atol=0)
    assert not torch.equal(student.velocity(x, t, t * 0.5, cond), student.velocity(x, t, t, cond))


# ---- teacher ODE pairs for the e2e rows (method.regression_pairs) -------------------------------------------


def _paired(estimate_order, e2e_noise_rows=2, roles=(1, 0, 0, 0)):
    model = Affine()
    x = torch.tensor([[0.5], [-1.0]], dtype=D64)  # the teacher's images of the noises below
    z = torch.tensor([[1.5], [0.25]], dtype=D64)[:e2e_noise_rows]
    cond, uncond = {"c": torch.tensor([[1.0], [2.0]], dtype=D64)}, {"c": torch.zeros(2, 1, dtype=D64)}
    settings = ObjectiveSettings(role_fractions=roles, estimate_order=estimate_order, loss="l2", dist_match_coef=0.0)
    models = ObjectiveModels(model, model, model)
    return apex_loss(models, x, cond, uncond, settings, None, e2e_noise=z)


@pytest.mark.parametrize("estimate_order", [0, 2])
def test_paired_e2e_rows_regress_onto_the_teacher_velocity_z_minus_x(estimate_order):
    out = _paired(estimate_order)
    # e2e rows: x_t = z at t = 1, r = 0. F = 2 z + 1 + 2 c = 6, 5.5; targets z - x = 1, 1.25; w(1, 0) = 1
    expected = torch.tensor(((6.0 - 1.0) ** 2 + (5.5 - 1.25) ** 2) / 2, dtype=D64)
    torch.testing.assert_close(out.total, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.generated, torch.tensor([[1.5 - 6.0], [0.25 - 5.5]], dtype=D64))


def test_paired_e2e_rows_need_one_noise_per_e2e_row():
    with pytest.raises(ValueError, match="1 rows for 2 e2e rows"):
        _paired(2, e2e_noise_rows=1)


def test_paired_e2e_rows_leave_the_other_rows_to_e8(monkeypatch):
    """With mul rows too, E8 runs for the mul rows only: the paired e2e rows are sliced off before the rollout."""
    seen = []
    original = objective.consistency_target

    def recording(rollout, velocity, *args, **kwargs):
        seen.append(velocity.shape[0])
        return original(rollout, velocity, *args, **kwargs)

    monkeypatch.setattr(objective, "consistency_target", recording)
    _paired(2, roles=(1, 1, 0, 0), e2e_noise_rows=1)
    assert seen == [1]


def test_a_batch_of_paired_e2e_rows_alone_calls_no_rollout(monkeypatch):
    """roles {e2e: 1} with pairs is a pure regression: no E7/E8 call, not even on zero rows (a UNet's attention
    cannot reshape an empty batch)."""
    calls = []
    monkeypatch.setattr(objective, "consistency_target", lambda *args, **kwargs: calls.append(args))
    _paired(2)  # its loss is checked by test_paired_e2e_rows_regress_onto_the_teacher_velocity_z_minus_x
    assert calls == []
