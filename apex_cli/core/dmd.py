"""The DMD2 baseline in the APEX objective framework: a SEPARATE fake-score network instead of a condition shift.

Source: Yin, Gharbi, Park, Zhang, Shechtman, Durand, Freeman, "Improved Distribution Matching Distillation for Fast
Image Synthesis" (DMD2), NeurIPS 2024, arXiv 2405.14867. DMD2 trains a one-step generator G with the gradient of
KL(q_fake || p_real), estimated as the difference of two scores at re-noised generator samples:

- the *real* score: the frozen teacher, with classifier-free guidance (DMD2's "real guidance scale");
- the *fake* score: a second network, initialised as a copy of the teacher and trained alongside G by the ordinary
  diffusion (here: flow-matching) loss on G's detached samples, with its own optimizer and several updates per
  generator update (DMD2's two-time-scale update rule, 5 in the paper). DMD2's GAN head on the fake score and its
  backward simulation are left out: APEX has neither, and the comparison is about the critic.

With the linear path the score gap is a velocity gap (method.md E13), so the generator loss is E12's form with
``v_fake`` from the fake network and ``v_real`` from the guided teacher::

    x_t' = (1 - t') sg(G(z, c)) + t' z'',  t' ~ U(0, 1)
    dv   = clip(v_fake(x_t', t', c) - [F_T(x_t', t', c) + g (F_T(x_t', t', c) - F_T(x_t', t', e))], -1, 1)
    L_dm = mean rho(F_e2e, sg(F_e2e - dv))                                    (E9 per-sample loss)
    L_fake = mean rho(F_fake(x_t, t, t, c), z - sg(G(z', c))),  x_t = (1 - t) sg(G) + t z,  t ~ time_dist

APEX replaces the fake network by the student itself under a shifted condition (E5): no second copy of the
weights, its gradients or its optimizer states. The generator's loss here is :func:`apex_loss` with this module's
direction (so e2e / mul / any rows, E7 and E8 work as for APEX when a recipe turns them on), and no adv rows.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from apex_cli.core.objective import (
    Condition,
    LossOutput,
    ObjectiveModels,
    ObjectiveSettings,
    RoleSizes,
    VelocityModel,
    apex_loss,
    matching_direction,
    per_sample_loss,
    renoise,
    sample_times,
)
from apex_cli.core.sampler import guided_velocity
from apex_cli.core.transport import interpolate


def distribution_matching_direction(
    fake: VelocityModel,
    real: VelocityModel,
    x_generated: Tensor,
    cond: Condition,
    uncond: Condition,
    guidance: float,
    weighting: str = "uniform",
    clip: float = 1.0,
) -> Tensor:
    """DMD2's ``dv = clip(v_fake - v_real)`` at re-noised generator samples, in E12's form.

    ``v_fake = F_fake(x_t', t', t', c)``; ``v_real = F_T(x_t', t', t', c) + g (F_T(., c) - F_T(., e))`` with the
    teacher's cond and uncond in one batched forward (one forward on ``c`` when ``g = 0``).

    Args:
        fake: The fake-score network (trained on the generator's samples).
        real: The frozen teacher.
        x_generated: Detached one-step samples ``[n, ...]``.
        cond: Their conditions, batch ``n``.
        uncond: The unconditional condition ``e``, batch ``n``.
        guidance: ``g`` of the real score (DMD2's real guidance; the effective CFG scale is ``1 + g``).
        weighting: ``"uniform"`` or ``"kl"`` (E13), as for APEX.
        clip: Clip of ``dv``.

    Returns:
        ``dv`` of shape ``[n, ...]`` (call under ``torch.no_grad``: it is a target).
    """
    x_t, t = renoise(x_generated)
    v_fake = fake.velocity(x_t, t, t, cond)
    v_real = guided_velocity(real, x_t, t, t, cond, uncond, guidance)
    return matching_direction(v_fake - v_real, t, weighting, clip)


def fake_score_loss(
    fake: VelocityModel,
    x_generated: Tensor,
    cond: Condition,
    time_dist: tuple[float, float, float] = (1.0, 1.0, 1.0),
    loss: str = "barron",
    barron_c: float = 1e-3,
) -> Tensor:
    """Flow matching (``r = t``) of the fake-score network on detached generator samples.

    ``t ~ Beta(a, b) s`` (the recipe's ``time_dist``), ``x_t = (1 - t) x_g + t z``, target ``z - x_g`` (E6), the E9
    per-sample loss with weight 1, as APEX's adv rows (which are the same loss on the student's fake branch).

    Args:
        fake: The fake-score network (with gradient).
        x_generated: Detached one-step samples ``[n, ...]``.
        cond: Their conditions, batch ``n``.
        time_dist: ``(a, b, s)``.
        loss: ``"barron"`` or ``"l2"``.
        barron_c: ``c`` of the Barron loss.

    Returns:
        The scalar loss.
    """
    n = x_generated.shape[0]
    t, r = sample_times(RoleSizes(0, 0, 0, n), time_dist, 0.0, x_generated.device, x_generated.dtype)
    noise = torch.randn_like(x_generated)
    x_t = interpolate(x_generated, noise, t)
    return per_sample_loss(fake.velocity(x_t, t, r, cond), noise - x_generated, loss, barron_c).mean()


def dmd_loss(
    models: ObjectiveModels,
    fake: VelocityModel,
    real: VelocityModel,
    x_data: Tensor,
    cond: Condition,
    uncond: Condition,
    settings: ObjectiveSettings,
    guidance: float,
) -> LossOutput:
    """The DMD2 baseline's generator loss: :func:`apex_loss` with the fake network's direction and no shift.

    ``L = L_main + lambda_dm L_dm`` (E14's form); ``L_dm`` is in the ``adversarial`` term. A pure DMD2 generator
    (the ``shapes-dmd2-cpu`` recipe) has only e2e rows and estimate order 0, so ``L_main`` is 0.

    Args:
        models: Online, reference and rollout networks of the student (E7 / E8 for mul and any rows, if any).
        fake: The fake-score network.
        real: The frozen teacher.
        x_data: Data ``[B, ...]``.
        cond: Conditions, batch ``B``.
        uncond: The unconditional condition, batch ``B``.
        settings: Objective knobs; the role fractions must give no adv rows.
        guidance: ``g`` of the real score.

    Raises:
        ValueError: If the settings give adv rows (they belong to APEX's self-adversarial fake branch).
    """
    if settings.role_fractions[3] > 0:
        raise ValueError("the DMD2 baseline has no adv rows: its fake score is a separate network; set adv to 0")
    direction = partial(
        distribution_matching_direction, fake, real, guidance=guidance, weighting=settings.adversarial_weighting
    )
    return apex_loss(models, x_data, cond, uncond, settings, None, direction=direction)
