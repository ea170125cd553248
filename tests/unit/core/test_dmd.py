"""The DMD2 baseline's math (apex_cli/core/dmd.py) on models simple enough to derive every number by hand."""

import pytest
import torch
from torch import nn

from apex_cli.core.dmd import distribution_matching_direction, dmd_loss, fake_score_loss
from apex_cli.core.objective import ObjectiveModels, ObjectiveSettings, renoise

D64 = torch.float64


class Constant(nn.Module):
    """F(x, t, r, c) = value + c: independent of x and t, so v_fake - v_real is known exactly."""

    def __init__(self, value):
        super().__init__()
        self.value = value
        self.text_projection = nn.Identity()

    def velocity(self, x_t, t, r, cond):
        return torch.full_like(x_t, self.value) + cond["c"]


class KnowsTheData(nn.Module):
    """F(x_t, t, r, c) = (x_t - x_g) / t + offset: the exact flow-matching velocity z - x_g, plus ``offset``."""

    def __init__(self, x_generated, offset):
        super().__init__()
        self.x_generated, self.offset = x_generated, offset
        self.text_projection = nn.Identity()

    def velocity(self, x_t, t, r, cond):
        return (x_t - self.x_generated) / t.view(-1, 1) + self.offset


class OneStepParameter(nn.Module):
    """A generator G(z) = z - p: its velocity is a trainable vector ``p`` ([D]), the same for every row."""

    def __init__(self, dim):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(dim, dtype=D64))
        self.text_projection = nn.Identity()

    def velocity(self, x_t, t, r, cond):
        return self.p.expand_as(x_t)


def _cond(n, value):
    return {"c": torch.full((n, 1), value, dtype=D64)}


def test_direction_is_fake_minus_guided_real():
    # v_fake = 0.3 + c; v_real = F_c + g (F_c - F_u) with F = 0.1 + c, c = 0.2, e = 0: 0.3 + 1.5 (0.2) = 0.6.
    x_g = torch.randn(3, 4, dtype=D64)
    dv = distribution_matching_direction(Constant(0.3), Constant(0.1), x_g, _cond(3, 0.2), _cond(3, 0.0), 1.5)
    torch.testing.assert_close(dv, torch.full((3, 4), 0.5 - 0.6, dtype=D64))


def test_direction_without_guidance_needs_no_unconditional_forward_and_is_clipped():
    x_g = torch.randn(2, 3, dtype=D64)
    dv = distribution_matching_direction(Constant(5.0), Constant(0.0), x_g, _cond(2, 0.0), None, 0.0)
    assert torch.equal(dv, torch.ones(2, 3, dtype=D64))  # 5 - 0 clipped to 1


def test_direction_uses_the_kl_weight_at_the_renoised_time():
    x_g = torch.randn(4, 2, dtype=D64)
    torch.manual_seed(3)
    _, t = renoise(x_g)
    torch.manual_seed(3)
    dv = distribution_matching_direction(Constant(0.2), Constant(0.0), x_g, _cond(4, 0.0), None, 0.0, "kl", clip=10)
    expected = 0.2 * (1 - t).pow(2) / t
    torch.testing.assert_close(dv, expected.view(-1, 1).expand(4, 2))


def test_fake_score_loss_is_zero_for_the_exact_velocity_and_offset_squared_otherwise():
    x_g = torch.randn(5, 3, dtype=D64)
    cond = _cond(5, 0.0)
    exact = fake_score_loss(KnowsTheData(x_g, 0.0), x_g, cond, loss="l2")
    off = fake_score_loss(KnowsTheData(x_g, 0.5), x_g, cond, loss="l2")
    torch.testing.assert_close(exact, torch.tensor(0.0, dtype=D64), atol=1e-12, rtol=0)
    torch.testing.assert_close(off, torch.tensor(0.25, dtype=D64))


def test_generator_gradient_moves_the_sample_along_fake_minus_real():
    # e2e rows only, estimate order 0, l2, lambda_dm = 1: L = mean_i mean_d dv^2 with F held at sg(F) - dv, so
    # dL/dp = 2 dv / D summed over the rows' mean = 2 dv / D. Descent on p moves G = z - p along +dv.
    dim = 4
    generator = OneStepParameter(dim)
    models = ObjectiveModels(generator, generator, generator)
    settings = ObjectiveSettings(
        role_fractions=(1, 0, 0, 0), estimate_order=0, loss="l2", dist_match_coef=1.0, enhanced_ratio=0.0
    )
    x_data = torch.randn(3, dim, dtype=D64)
    out = dmd_loss(models, Constant(0.3), Constant(0.1), x_data, _cond(3, 0.2), _cond(3, 0.0), settings, 1.5)
    dv = 0.5 - 0.6
    assert out.terms["main"] == 0
    torch.testing.assert_close(out.total, torch.tensor(dv**2, dtype=D64))
    out.total.backward()
    torch.testing.assert_close(generator.p.grad, torch.full((dim,), 2 * dv / dim, dtype=D64))
    noise = torch.zeros(1, dim, dtype=D64)
    before = noise - generator.p.detach().clone()
    with torch.no_grad():
        generator.p -= 0.1 * generator.p.grad
    torch.testing.assert_close((noise - generator.p) - before, torch.full((1, dim), 0.1 * 2 * dv / dim, dtype=D64))


def test_dmd_loss_refuses_adv_rows():
    generator = OneStepParameter(2)
    settings = ObjectiveSettings(role_fractions=(1, 0, 0, 1), estimate_order=0)
    with pytest.raises(ValueError, match="no adv rows"):
        dmd_loss(
            ObjectiveModels(generator, generator, generator),
            Constant(0.0),
            Constant(0.0),
            torch.zeros(2, 2, dtype=D64),
            _cond(2, 0.0),
            _cond(2, 0.0),
            settings,
            0.0,
        )
