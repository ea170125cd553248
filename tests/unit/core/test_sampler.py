import pytest
import torch
from torch import nn

from apex_cli.core.sampler import SamplerSettings, sample, time_grid


@pytest.mark.parametrize(
    ("nfe", "gap", "expected"),
    [
        (1, (0.001, 0.0), [0.999, 0.0]),
        (2, (0.001, 0.6), [0.999, 0.6, 0.0]),
        (4, (0.001, 0.5), [0.999, 0.833, 0.667, 0.5, 0.0]),
        (4, (0.0, 0.0), [1.0, 0.75, 0.5, 0.25, 0.0]),
    ],
)
def test_grids_of_method_section_6(nfe, gap, expected):
    grid = time_grid(nfe, gap)
    torch.testing.assert_close(
        grid, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-3
    )  # method.md rounds to 3 digits


def test_kumaraswamy_warp():
    # k(t; 2, 1, 1) = t^2 on the points linspace(0, 1, 3)[:-1] = [0, 0.5] -> [0, 0.25] -> 1 - . = [1, 0.75]
    torch.testing.assert_close(time_grid(2, (0.0, 0.0), (2.0, 1.0, 1.0)), torch.tensor([1.0, 0.75, 0.0]).double())


def test_grid_rejects_zero_nfe():
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        time_grid(0, (0.001, 0.0))


class Constant(nn.Module):
    """F = noise_point - data_point everywhere: the exact velocity of a point mass at `target`."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.text_projection = nn.Identity()

    def velocity(self, x_t, t, r, cond):
        # the straight line from x_t at time t to `target` at time 0 has velocity (x_t - target) / t
        return (x_t - self.target) / t.view(-1, 1)


@pytest.mark.parametrize("style", ["few", "any", "mul"])
@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_every_style_lands_on_a_point_mass(style, nfe):
    target = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    noise = torch.randn(3, 2, dtype=torch.float64)
    settings = SamplerSettings(style=style, nfe=nfe, gap=(0.001, 0.0), stochastic_ratio=1.0)
    out = sample(Constant(target), noise, {}, settings, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target.expand(3, 2))


def test_few_style_is_seeded():
    model = nn.Linear(2, 2).double()
    wrapped = type("W", (), {"velocity": lambda self, x, t, r, c: model(x), "text_projection": nn.Identity()})()
    noise = torch.randn(4, 2, dtype=torch.float64)
    settings = SamplerSettings(style="few", nfe=4, gap=(0.001, 0.5))
    a = sample(wrapped, noise, {}, settings, generator=torch.Generator().manual_seed(7))
    b = sample(wrapped, noise, {}, settings, generator=torch.Generator().manual_seed(7))
    c = sample(wrapped, noise, {}, settings, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_per_sample_generators_make_a_sample_independent_of_its_batch():
    model = nn.Linear(2, 2).double()
    wrapped = type("W", (), {"velocity": lambda self, x, t, r, c: model(x), "text_projection": nn.Identity()})()
    noise = torch.randn(3, 2, dtype=torch.float64)
    settings = SamplerSettings(style="few", nfe=4, gap=(0.001, 0.5))
    batch = sample(wrapped, noise, {}, settings, generator=[torch.Generator().manual_seed(s) for s in (4, 5, 6)])
    alone = sample(wrapped, noise[1:2], {}, settings, generator=[torch.Generator().manual_seed(5)])
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample(wrapped, noise, {}, settings, generator=[torch.Generator(), torch.Generator()])


def test_mul_style_is_euler():
    # F(x, t, r) = x: Euler from 1 to 0 in 2 steps of 0.5: x -> 0.5 x -> 0.25 x
    wrapped = type("W", (), {"velocity": lambda self, x, t, r, c: x, "text_projection": nn.Identity()})()
    noise = torch.ones(1, 2, dtype=torch.float64)
    out = sample(wrapped, noise, {}, SamplerSettings(style="mul", nfe=2, gap=(0.0, 0.0)))
    torch.testing.assert_close(out, 0.25 * noise)
