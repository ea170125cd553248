import pytest
import torch
from torch import nn

from apex_cli.core.objective import evaluate
from apex_cli.core.shift import SHIFT_NAMES, ConditionShift, shifted_condition


class Recorder(nn.Module):
    """A model whose text projection is a Linear; velocity returns the projected condition and the times."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4).double()
        self.seen_t = None

    @property
    def text_projection(self):
        return self.proj

    def velocity(self, x_t, t, r, cond):
        self.seen_t, self.seen_r = t, r
        return self.proj(cond["tokens"])


@pytest.mark.parametrize("name", SHIFT_NAMES)
def test_each_operator_changes_only_the_masked_rows(name):
    model = Recorder()
    tokens = torch.randn(6, 5, 3, dtype=torch.float64)  # [B, S, D]
    t = torch.linspace(0.1, 0.9, 6, dtype=torch.float64)
    mask = torch.tensor([True, False, True, False, False, True])
    plain = model.velocity(None, t, t, {"tokens": tokens})
    shifted = evaluate(model, None, t, t, {"tokens": tokens}, ConditionShift(name), mask)
    assert torch.equal(shifted[~mask], plain[~mask])
    if name == "negative_time":
        assert torch.equal(shifted, plain)
    else:
        assert (shifted[mask] - plain[mask]).abs().min() > 0
    expected_t = torch.where(mask, -t, t) if name.endswith("negative_time") else t
    assert torch.equal(model.seen_t, expected_t)
    assert torch.equal(model.seen_r, expected_t)


def test_negate_and_affine_values():
    h = torch.tensor([[1.0, -2.0], [3.0, 4.0]], dtype=torch.float64)
    assert torch.equal(ConditionShift("negate").transform(h), -h)
    affine = ConditionShift("affine", seed=3)
    out = affine.transform(h)
    matrix, offset = affine._affine(2, h)
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(2, dtype=torch.float64))  # orthogonal
    torch.testing.assert_close(out, h @ matrix.T + offset)
    torch.testing.assert_close(ConditionShift("affine", seed=3).transform(h), out)  # seeded: reproducible


def test_hook_is_removed_after_the_context():
    model = Recorder()
    tokens = torch.randn(2, 3, dtype=torch.float64)
    with shifted_condition(model.proj, ConditionShift("negate"), torch.tensor([True, True])):
        inside = model.proj(tokens)
    after = model.proj(tokens)
    torch.testing.assert_close(inside, -after)


def test_unknown_operator_is_rejected():
    with pytest.raises(ValueError, match="unknown condition shift 'flip'"):
        ConditionShift("flip")
