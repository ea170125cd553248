"""The exported sampler (ApexSampler, apex_sampler.json) against apex's own: same grids, same steps, same settings."""

from __future__ import annotations

import itertools

import pytest
import torch

from apex_cli.config import load_recipe
from apex_cli.core.sampler import SamplerSettings, sample, time_grid
from apex_cli.errors import DataError
from apex_cli.export.loading import sampler_record, settings_from_record
from apex_cli.export.scheduling_apex import ApexSampler
from apex_cli.train.sampling import checkpoint_sampler


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and immune to a busy machine


@pytest.mark.parametrize(
    ("nfe", "gap", "kumaraswamy"),
    [
        (1, (0.001, 0.0), (1.0, 1.0, 1.0)),
        (2, (0.001, 0.6), (1.0, 1.0, 1.0)),
        (4, (0.001, 0.5), (1.0, 1.0, 1.0)),
        (3, (0.0, 0.0), (2.0, 0.5, 1.5)),
        (50, (0.0, 0.0), (1.0, 1.0, 1.0)),
    ],
)
def test_scheduler_grid_is_apex_grid_exactly(nfe, gap, kumaraswamy):
    scheduler = ApexSampler(nfe=nfe, gap=gap, kumaraswamy=kumaraswamy)
    assert scheduler.sigmas == time_grid(nfe, gap, kumaraswamy).tolist()


class Linear:
    """A velocity model F(x, t, r, c) = W x + t - 2 r + c, so every input matters; c is a per-row offset.

    float32, like the pipeline: apex draws its re-noising in float32 and casts, diffusers' randn_tensor in the dtype.
    """

    def __init__(self):
        self.weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) / 4

    def velocity(self, x, t, r, cond):
        return x @ self.weight.T + t[:, None] - 2 * r[:, None] + cond["offset"]


def run_scheduler(model, noise, cond, uncond, scheduler, generators):
    """The loop of ApexShapesPipeline.__call__ with the toy model in place of the UNet."""
    guidance = scheduler.config.guidance
    x = noise
    ones = torch.ones(noise.shape[0], dtype=noise.dtype)
    for index in range(scheduler.num_inference_steps):
        t, r = ones * scheduler.sigmas[index], ones * scheduler.target_time(index)
        v_cond = model.velocity(x, t, r, cond)
        velocity = v_cond + guidance * (v_cond - model.velocity(x, t, r, uncond)) if guidance else v_cond
        x = scheduler.step(velocity, index, x, generator=generators)
    return x


@pytest.mark.parametrize(
    ("style", "nfe", "guidance"), [("few", 1, 0.0), ("few", 4, 0.0), ("any", 3, 0.0), ("mul", 5, 2.0)]
)
def test_scheduler_steps_reproduce_apex_sample(style, nfe, guidance):
    model = Linear()
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    cond = {"offset": torch.tensor([[0.1], [0.2], [-0.3]])}
    uncond = {"offset": torch.zeros(3, 1)}
    settings = SamplerSettings(style=style, nfe=nfe, gap=(0.001, 0.0), stochastic_ratio=0.7, guidance=guidance)
    expected = sample(
        model, noise, cond, settings, uncond=uncond, generator=[torch.Generator().manual_seed(s) for s in range(3)]
    )
    scheduler = ApexSampler(style=style, nfe=nfe, stochastic_ratio=0.7, guidance=guidance)
    actual = run_scheduler(model, noise, cond, uncond, scheduler, [torch.Generator().manual_seed(s) for s in range(3)])
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("recipe_name", ["shapes-apex-cpu", "shapes-teacher-cpu"])
@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_sampler_record_gives_the_checkpoint_sampler_at_every_nfe(recipe_name, kind):
    recipe = load_recipe(recipe_name)
    meta = {"kind": kind}
    record = sampler_record(recipe, meta)
    assert record["time_grid"] == time_grid(record["nfe"], tuple(record["gap"]), tuple(record["kumaraswamy"])).tolist()
    for nfe in (None, 1, 2, 3, 4, 8):
        assert settings_from_record(record, nfe) == checkpoint_sampler(recipe, meta, nfe or recipe.sampler.nfe), nfe
        scheduler = ApexSampler(**record)
        scheduler.set_timesteps(nfe)
        expected = checkpoint_sampler(recipe, meta, nfe or recipe.sampler.nfe)
        assert scheduler.sigmas == time_grid(expected.nfe, expected.gap, expected.kumaraswamy).tolist(), nfe


def test_overrides_and_a_bad_style():
    record = sampler_record(load_recipe("shapes-apex-cpu"), {"kind": "student"})
    settings = settings_from_record(record, nfe=2, style="any", stochastic_ratio=0.0, guidance=1.5)
    assert (settings.style, settings.nfe, settings.gap, settings.stochastic_ratio, settings.guidance) == (
        "any",
        2,
        (0.001, 0.6),
        0.0,
        1.5,
    )
    with pytest.raises(DataError, match="--style 'fast' is not a sampler style; expected one of few, any, mul"):
        settings_from_record(record, style="fast")


def test_scheduler_refuses_an_edited_config_that_no_longer_adds_up():
    record = sampler_record(load_recipe("shapes-apex-cpu"), {"kind": "student"})
    assert ApexSampler(**record).sigmas == record["time_grid"]
    with pytest.raises(ValueError, match="does not match nfe, gap and kumaraswamy"):
        ApexSampler(**{**record, "nfe": 2})
    with pytest.raises(ValueError, match="unknown sampler style"):
        ApexSampler(style="fast")


def test_pairs_of_grid_times_are_what_sample_walks():
    scheduler = ApexSampler(style="any", nfe=4, gap=(0.001, 0.5))
    pairs = [(scheduler.sigmas[i], scheduler.target_time(i)) for i in range(4)]
    assert pairs == list(itertools.pairwise(time_grid(4, (0.001, 0.5)).tolist()))
