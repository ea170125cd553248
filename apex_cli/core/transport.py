"""The linear (rectified-flow) path between data and noise and its endpoint predictions.

Time convention for all of apex_cli: ``t = 0`` is clean data, ``t = 1`` is pure noise (``t`` equals the
sigma of diffusers' flow-match schedulers). The network output ``F(x_t, t, r, c)`` is the *average*
velocity from time ``t`` to a target time ``r <= t``, so ``x_r = x_t - (t - r) F``; at ``r = t`` it is the
instantaneous velocity of the pretrained teacher.

    (E1)  x_t = (1 - t) x_data + t noise,        v = noise - x_data
    (E2)  x_hat = x_t - t F,                     z_hat = x_t + (1 - t) F
"""

from __future__ import annotations

from torch import Tensor


def broadcast_time(t: Tensor, like: Tensor) -> Tensor:
    """Reshape ``t`` of shape ``[B]`` to ``[B, 1, ..., 1]`` so that it broadcasts against ``like`` (``[B, ...]``)."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape [{like.shape[0]}], got {tuple(t.shape)}")
    return t.view(-1, *([1] * (like.ndim - 1)))


def interpolate(x_data: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Point ``x_t`` on the straight path from ``x_data`` (t = 0) to ``noise`` (t = 1) (E1).

    Args:
        x_data: Clean samples, shape ``[B, ...]``.
        noise: Gaussian noise, same shape as ``x_data``.
        t: Times, shape ``[B]``.

    Returns:
        ``x_t = (1 - t) x_data + t noise``, shape ``[B, ...]``.
    """
    if x_data.shape != noise.shape:
        raise ValueError(f"x_data and noise differ in shape: {tuple(x_data.shape)} vs {tuple(noise.shape)}")
    t_b = broadcast_time(t, x_data)
    return (1 - t_b) * x_data + t_b * noise


def predict_data(x_t: Tensor, velocity: Tensor, t: Tensor) -> Tensor:
    """Data endpoint ``x_hat = x_t - t F`` implied by a velocity at ``(x_t, t)`` (E2); ``t: [B]``."""
    return x_t - broadcast_time(t, x_t) * velocity


def predict_noise(x_t: Tensor, velocity: Tensor, t: Tensor) -> Tensor:
    """Noise endpoint ``z_hat = x_t + (1 - t) F`` implied by a velocity at ``(x_t, t)`` (E2)."""
    return x_t + (1 - broadcast_time(t, x_t)) * velocity


def step_to(x_t: Tensor, velocity: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """Move along an average velocity from ``t`` to ``r``: ``x_r = x_t - (t - r) F``."""
    return x_t - broadcast_time(t - r, x_t) * velocity
