"""Teacher ODE pairs (method.regression_pairs): generated in seeded batches, saved atomically, drawn consistently."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from apex_cli.core.sampler import SamplerSettings
from apex_cli.train import checkpoint
from apex_cli.train import pairs as pairs_module
from apex_cli.train.pairs import TeacherPairs, generate_pairs


class ConstantVelocity(nn.Module):
    """F(x, t, r, c) = c: Euler integration from z at t = 1 to t = 0 gives exactly z - c, at any NFE."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def velocity(self, x_t, t, r, cond):
        return cond["c"].view(-1, 1, 1) * self.scale.expand_as(x_t)


def _conditions(batch=3):
    for k in itertools.count():
        yield {"c": torch.arange(k * batch, (k + 1) * batch, dtype=torch.float32), "mask": torch.ones(batch, 2)}


def _generate(n=7, guidance=2.0, nfe=3, seed=0):
    settings = SamplerSettings(style="mul", nfe=nfe, gap=(0.0, 0.0), guidance=guidance)
    uncond = lambda k: {"c": torch.zeros(k), "mask": torch.ones(k, 2)}  # noqa: E731
    return generate_pairs(ConstantVelocity(), _conditions(), uncond, n, (2, 2), settings, seed=seed)


def test_pairs_are_the_teachers_guided_euler_solution_in_condition_order(monkeypatch):
    monkeypatch.setattr(pairs_module, "GENERATE_BATCH", 4)  # batches of 4 from condition batches of 3
    pool = _generate(n=7)
    assert len(pool) == 7 and pool.z.shape == (7, 2, 2)
    torch.testing.assert_close(pool.cond["c"], torch.arange(7, dtype=torch.float32))  # every row once, in order
    # guidance 2 with F(e) = 0: F_c + 2 (F_c - F_u) = 3 c, so x = z - 3 c
    torch.testing.assert_close(pool.x, pool.z - 3 * pool.cond["c"].view(-1, 1, 1))
    torch.testing.assert_close(_generate(n=7).z, pool.z)  # the noises are seeded
    assert not torch.equal(_generate(n=7, seed=1).z, pool.z)


def test_the_pool_round_trips_through_its_file_and_draws_whole_pairs(tmp_path):
    pool = _generate(n=5, guidance=0.0)
    path = tmp_path / "run" / pairs_module.FILENAME
    pool.save(path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    loaded = TeacherPairs.load(path, torch.device("cpu"))
    for key in ("z", "x"):
        assert torch.equal(getattr(loaded, key), getattr(pool, key))
    assert loaded.cond.keys() == pool.cond.keys() and all(torch.equal(loaded.cond[k], pool.cond[k]) for k in pool.cond)
    z, x, cond = loaded.draw(16, torch.Generator().manual_seed(0))
    assert z.shape == (16, 2, 2) and cond["mask"].shape == (16, 2)
    torch.testing.assert_close(x, z - cond["c"].view(-1, 1, 1))  # each drawn row keeps its own z, x and c


def test_a_failed_write_keeps_the_previous_pool(tmp_path, monkeypatch):
    path = tmp_path / pairs_module.FILENAME
    _generate(n=3).save(path)
    before = path.read_bytes()

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", broken)  # the temp file is written, the rename fails
    with pytest.raises(OSError, match="disk full"):
        _generate(n=4).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
