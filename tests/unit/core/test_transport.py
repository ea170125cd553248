import pytest
import torch

from apex_cli.core.transport import broadcast_time, interpolate, predict_data, predict_noise, step_to


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    x_data = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    return x_data, noise, t


def test_endpoints_follow_time_convention(batch):
    x_data, noise, _ = batch
    assert torch.equal(interpolate(x_data, noise, torch.zeros(5, dtype=torch.float64)), x_data)
    assert torch.equal(interpolate(x_data, noise, torch.ones(5, dtype=torch.float64)), noise)


def test_path_derivative_is_noise_minus_data(batch):
    x_data, noise, t = batch
    _, dx_dt = torch.func.jvp(lambda s: interpolate(x_data, noise, s), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(dx_dt, noise - x_data)


def test_endpoint_predictions_invert_the_path_with_the_true_velocity(batch):
    x_data, noise, t = batch
    x_t = interpolate(x_data, noise, t)
    v = noise - x_data
    torch.testing.assert_close(predict_data(x_t, v, t), x_data, rtol=0, atol=1e-12)
    torch.testing.assert_close(predict_noise(x_t, v, t), noise, rtol=0, atol=1e-12)


def test_step_to_moves_along_the_path_with_the_true_velocity(batch):
    x_data, noise, t = batch
    r = t * 0.5
    x_t = interpolate(x_data, noise, t)
    torch.testing.assert_close(step_to(x_t, noise - x_data, t, r), interpolate(x_data, noise, r))


def test_golden_value():
    # x_t = 0.75 * 2 + 0.25 * (-4) = 0.5 ; x_hat with F = 3 at t = 0.25: 0.5 - 0.75 = -0.25 ; z_hat: 0.5 + 2.25 = 2.75
    x_t = interpolate(
        torch.tensor([[2.0]], dtype=torch.float64),
        torch.tensor([[-4.0]], dtype=torch.float64),
        torch.tensor([0.25], dtype=torch.float64),
    )
    assert x_t.item() == 0.5
    assert predict_data(x_t, torch.tensor([[3.0]], dtype=torch.float64), torch.tensor([0.25])).item() == -0.25
    assert predict_noise(x_t, torch.tensor([[3.0]], dtype=torch.float64), torch.tensor([0.25])).item() == 2.75


def test_rejects_time_with_wrong_shape(batch):
    x_data, _, _ = batch
    with pytest.raises(ValueError, match=r"t must have shape \[5\], got \(5, 1\)"):
        broadcast_time(torch.zeros(5, 1), x_data)
