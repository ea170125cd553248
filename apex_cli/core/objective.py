"""The APEX training objective (method.md section 5, E6-E14), with plain flow matching as a special case.

A batch of ``B`` rows is split into four role groups, in this order along the batch axis::

    [ e2e | mul | any | adv ]

    e2e  t = 1, r = 0                        the one-step map G(z, c) = z - F(z, 1, 0, c)        (E3)
    mul  r = t - u t min(0.05, k)            near-instantaneous velocity: flow matching
    any  r = t - u k t                       any-step average velocity
    adv  data replaced by sg(G(z', c)),      the fake branch: shifted condition S(c), r = t      (E5)

Teacher training (plain flow matching) is this objective with only ``mul`` rows, ``k = 0`` (so r = t),
estimate order 0 and no adversarial term: no second code path.

Randomness comes from torch's global generator (seeded by the training loop, saved with checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from apex_cli.core.shift import ConditionShift, shifted_condition
from apex_cli.core.transport import broadcast_time, interpolate, predict_data

Condition = Mapping[str, Tensor]
"""A text (or class) condition: named tensors, every one with the batch on axis 0."""

ROLES = ("e2e", "mul", "any", "adv")

Direction = Callable[[Tensor, Condition, Condition], Tensor]
"""``(x_generated [n, ...], cond, uncond) -> dv [n, ...]``: the distribution-matching direction of the e2e rows'
one-step samples (E12). APEX's is :func:`adversarial_direction` (the online network's own fake branch); the DMD2
baseline's is ``apex_cli.core.dmd.distribution_matching_direction`` (a separate fake-score network)."""


class VelocityModel(Protocol):
    """What the objective and the sampler need from a network: ``F(x_t, t, r, c)`` and its text projection."""

    @property
    def text_projection(self) -> nn.Module:
        """The module whose output is the projected condition ``h`` that the shift acts on (E5)."""
        ...

    def velocity(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Condition) -> Tensor:
        """Average velocity from ``t`` to ``r`` (``[B, ...]``), with ``t, r: [B]``."""
        ...


def cat_conditions(*conds: Condition) -> dict[str, Tensor]:
    """Concatenate conditions along the batch axis (for batched cond + uncond forwards)."""
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def slice_condition(cond: Condition, start: int, stop: int) -> dict[str, Tensor]:
    """Rows ``start:stop`` of every tensor of ``cond``."""
    return {key: value[start:stop] for key, value in cond.items()}


def where_condition(mask: Tensor, if_true: Condition, if_false: Condition) -> dict[str, Tensor]:
    """Row-wise choice between two conditions of the same batch size (``mask: [B]`` bool)."""
    out = {}
    for key, value in if_true.items():
        out[key] = torch.where(mask.view(-1, *([1] * (value.ndim - 1))), value, if_false[key])
    return out


def evaluate(
    model: VelocityModel,
    x_t: Tensor,
    t: Tensor,
    r: Tensor,
    cond: Condition,
    shift: ConditionShift | None = None,
    fake_mask: Tensor | None = None,
) -> Tensor:
    """``F(x_t, t, r, c)``, with the rows of ``fake_mask`` evaluated under the shifted condition ``S(c)``.

    ``v_real(x, t, c) = F(x, t, t, c)`` and ``v_fake(x, t, c) = F(x, t, t, S(c))`` (section 4).
    """
    if shift is None or fake_mask is None:
        return model.velocity(x_t, t, r, cond)
    t_in, r_in = shift.apply_time(t, fake_mask), shift.apply_time(r, fake_mask)
    with shifted_condition(model.text_projection, shift, fake_mask):
        return model.velocity(x_t, t_in, r_in, cond)


def one_step(model: VelocityModel, noise: Tensor, cond: Condition) -> Tensor:
    """The one-step generator (E3): ``G(z, c) = z - F(z, 1, 0, c)``. Shapes ``[B, ...]``."""
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    return predict_data(noise, model.velocity(noise, ones, torch.zeros_like(ones), cond), ones)


# ----------------------------------------------------------------------------------------------------------
# Roles and times


@dataclass(frozen=True)
class RoleSizes:
    """Number of rows of each role; rows are laid out ``[e2e | mul | any | adv]``."""

    e2e: int
    mul: int
    any: int
    adv: int

    @property
    def real(self) -> int:
        """Rows that use real data and the real condition (e2e + mul + any)."""
        return self.e2e + self.mul + self.any

    @property
    def total(self) -> int:
        """All rows."""
        return self.real + self.adv


def split_roles(batch_size: int, fractions: tuple[float, float, float, float]) -> RoleSizes:
    """Split ``batch_size`` rows over (e2e, mul, any, adv) in proportion to ``fractions``.

    Largest-remainder rounding; a role with fraction 0 gets exactly 0 rows and every role with a positive
    fraction gets at least one row.

    Raises:
        ValueError: If no fraction is positive or the batch is smaller than the number of active roles.
    """
    if any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"role fractions must be >= 0 with a positive sum, got {fractions}")
    active = [f > 0 for f in fractions]
    if batch_size < sum(active):
        raise ValueError(f"batch size {batch_size} is smaller than the {sum(active)} active roles")
    quotas = [batch_size * f / sum(fractions) for f in fractions]
    sizes = [max(math.floor(q), 1) if a else 0 for q, a in zip(quotas, active, strict=True)]
    while sum(sizes) < batch_size:  # hand out the rest by largest remainder, ties to the earlier role
        i = max((k for k in range(4) if active[k]), key=lambda k: (quotas[k] - sizes[k], -k))
        sizes[i] += 1
    while sum(sizes) > batch_size:  # the forced minimum of 1 overshot: take from the largest surplus
        i = max((k for k in range(4) if sizes[k] > 1), key=lambda k: (sizes[k] - quotas[k], -k))
        sizes[i] -= 1
    return RoleSizes(*sizes)


def sample_times(
    roles: RoleSizes,
    time_dist: tuple[float, float, float],
    consistency_ratio: float,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Draw ``(t, r)`` for every row (section 5).

    ``t ~ Beta(a, b) * s`` with ``time_dist = (a, b, s)``; e2e rows have ``t = 1, r = 0``; mul rows
    ``r = t - u t min(0.05, k)``; any rows ``r = t - u k t`` (clamped at 0); adv rows ``r = t``.

    Returns:
        ``t`` and ``r``, each ``[B]``.
    """
    a, b, scale = time_dist
    n = roles.total
    if a == 1 and b == 1:
        t = torch.rand(n, device=device, dtype=dtype) * scale
    else:
        beta = torch.distributions.Beta(torch.tensor(a, device=device), torch.tensor(b, device=device))
        t = beta.sample((n,)).to(dtype) * scale
    u = torch.rand(n, device=device, dtype=dtype)
    k = consistency_ratio
    role = torch.repeat_interleave(
        torch.arange(4, device=device), torch.tensor([roles.e2e, roles.mul, roles.any, roles.adv], device=device)
    )
    t = torch.where(role == 0, torch.ones_like(t), t)
    r_mul = t - u * t * min(0.05, k)
    r_any = (t - u * k * t).clamp_min(0)
    r = torch.stack([torch.zeros_like(t), r_mul, r_any, t])[role, torch.arange(n, device=device)]
    return t, r


# ----------------------------------------------------------------------------------------------------------
# Targets (all computed without gradient)


def cond_and_uncond_velocity(
    model: VelocityModel, x_t: Tensor, t: Tensor, cond: Condition, uncond: Condition
) -> tuple[Tensor, Tensor]:
    """``(F(x_t, t, t, c), F(x_t, t, t, e))`` from one batched forward of ``2 B`` rows."""
    both = model.velocity(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), cat_conditions(cond, uncond))
    v_cond, v_uncond = both.chunk(2)
    return v_cond, v_uncond


def guidance_target(
    reference: VelocityModel, x_t: Tensor, t: Tensor, v: Tensor, cond: Condition, uncond: Condition, scale: float
) -> Tensor:
    """Guidance-enhanced velocity target (E7), cond and uncond in one batched forward.

    ``v + lambda (F_ref(x_t, t, t, c) - F_ref(x_t, t, t, e))`` where ``0 < t < 1``, else ``v``.

    Args:
        reference: The reference model ``F_ref`` (online, EMA or frozen base).
        x_t: Noisy inputs ``[B, ...]``.
        t: Times ``[B]``.
        v: Data velocity ``z - x`` (E6), ``[B, ...]``.
        cond: Condition ``c`` with batch ``B``.
        uncond: Unconditional condition ``e`` with batch ``B``.
        scale: ``lambda`` (recipe ``method.enhanced_ratio``).
    """
    v_cond, v_uncond = cond_and_uncond_velocity(reference, x_t, t, cond, uncond)
    inside = broadcast_time((t > 0) & (t < 1), v)
    return torch.where(inside, v + scale * (v_cond - v_uncond), v)


def teacher_target(
    teacher: VelocityModel, x_t: Tensor, t: Tensor, cond: Condition, uncond: Condition, scale: float
) -> Tensor:
    """The frozen teacher's guided velocity, in place of the data velocity of E6 and E7 ([ours]).

    ``F_T(x_t, t, t, c) + lambda (F_T(x_t, t, t, c) - F_T(x_t, t, t, e))`` at every row (t = 1 included: the
    teacher's guided Euler sampler starts there), cond and uncond in one batched forward (the cond one alone when
    ``lambda`` is 0). E8 then distils the teacher's guided ODE (consistency distillation) instead of estimating
    it from single data samples (consistency training): ``v`` no longer depends on which data sample drew
    ``x_t``, so the targets of E8 are deterministic functions of ``x_t``. The teacher is fixed, so guidance does
    not compound: the guidance scale is ``1 + lambda`` whatever the reference.

    Args:
        teacher: The frozen teacher ``F_T`` (a frozen copy, or a LoRA student with its adapters off).
        x_t: Noisy inputs ``[B, ...]``.
        t: Times ``[B]``.
        cond: Condition ``c`` with batch ``B``.
        uncond: Unconditional condition ``e`` with batch ``B``.
        scale: ``lambda`` (recipe ``method.enhanced_ratio``).
    """
    if scale == 0:
        return teacher.velocity(x_t, t, t, cond)
    v_cond, v_uncond = cond_and_uncond_velocity(teacher, x_t, t, cond, uncond)
    return v_cond + scale * (v_cond - v_uncond)


def consistency_target(
    rollout: VelocityModel,
    velocity: Tensor,
    x_t: Tensor,
    t: Tensor,
    r: Tensor,
    v: Tensor,
    cond: Condition,
    order: int,
    delta: float = 0.01,
    clip: float = 1.0,
) -> Tensor:
    """Recursive-consistency target (E8).

    Step ``x' = x_t - delta v`` to ``t_m = max(t - delta, r)``, roll ``N = order`` Euler steps of the
    student's own weights from ``t_m`` to ``r`` accumulating ``D = sum_k F(x_k, tau_k, tau_k+1, c)(tau_k -
    tau_k+1)``. With ``Delta = t - r``: ``R = (Delta / delta)(F - (delta v + D) / Delta)`` if ``Delta >=
    delta`` else ``R = F - v``. The target is ``F - clip(R, -clip, clip)``. ``order = 0`` returns ``v``
    (plain flow matching).

    Args:
        rollout: The student's EMA copy (or its online weights); never the frozen base.
        velocity: The online prediction ``F(x_t, t, r, c)`` (detached), ``[B, ...]``.
        x_t: Noisy inputs ``[B, ...]``.
        t: Times ``[B]``.
        r: Target times ``[B]``.
        v: The (E7-enhanced) velocity target ``[B, ...]``.
        cond: Condition with batch ``B``.
        order: Estimate order ``N >= 0``.
        delta: Finite-difference step.
        clip: Clip of the residual ``R``.
    """
    if order == 0:
        return v
    gap = t - r
    large = gap >= delta
    t_m = torch.maximum(t - delta, r)
    x_k = torch.where(broadcast_time(large, x_t), x_t - delta * v, x_t)
    displacement = torch.zeros_like(v)
    for k in range(order):
        tau_k = t_m + (r - t_m) * (k / order)
        tau_next = t_m + (r - t_m) * ((k + 1) / order)
        step = broadcast_time(tau_k - tau_next, x_t)
        f_k = rollout.velocity(x_k, tau_k, tau_next, cond)
        displacement = displacement + f_k * step
        x_k = x_k - f_k * step
    gap_b = broadcast_time(torch.where(large, gap, torch.ones_like(gap)), x_t)
    residual_large = (gap_b / delta) * (velocity - (delta * v + displacement) / gap_b)
    residual = torch.where(broadcast_time(large, x_t), residual_large, velocity - v)
    return velocity - residual.clamp(-clip, clip)


# ----------------------------------------------------------------------------------------------------------
# Losses


def per_sample_loss(pred: Tensor, target: Tensor, kind: str = "barron", c: float = 1e-3) -> Tensor:
    """Per-sample loss rho (E9), computed in float32 or wider.

    ``m = mean((F - y)^2)`` over all but the batch axis; ``barron``: ``m * w / c`` with
    ``w = sg((m / c^2 + 1)^(-1/2))`` (about the per-sample RMSE); ``l2``: ``m``.

    Returns:
        ``[B]``.
    """
    dtype = torch.promote_types(pred.dtype, torch.float32)  # never reduce in bf16
    m = (pred.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(dim=1)
    if kind == "l2":
        return m
    if kind != "barron":
        raise ValueError(f"unknown loss {kind!r}; expected 'barron' or 'l2'")
    weight = (m.detach() / c**2 + 1).rsqrt()
    return m * weight / c


def time_weight(t: Tensor, r: Tensor) -> Tensor:
    """Time weight (E10): ``w(t, r) = tan((1 - (|t| - |r|)) pi / 2.5) + 1``. Shapes ``[B]``."""
    return torch.tan((1 - (t.abs() - r.abs())) * math.pi / 2.5) + 1


def renoise(x_generated: Tensor) -> tuple[Tensor, Tensor]:
    """Re-noise generator samples at fresh times (E12): ``t' ~ U(0, 1)``, ``x_t' = (1 - t') x_g + t' z''``.

    Args:
        x_generated: Detached one-step samples ``[n, ...]``.

    Returns:
        ``(x_t', t')``: ``[n, ...]`` and ``[n]``.
    """
    t = torch.rand(x_generated.shape[0], device=x_generated.device, dtype=x_generated.dtype)
    return interpolate(x_generated, torch.randn_like(x_generated), t), t


def matching_direction(gap: Tensor, t: Tensor, weighting: str = "uniform", clip: float = 1.0) -> Tensor:
    """``dv = clip(w(t') (v_fake - v_real), -clip, clip)`` (E12, E13), shared by APEX and the DMD2 baseline.

    Args:
        gap: ``v_fake - v_real`` at the re-noised samples, ``[n, ...]``.
        t: Their times ``t'``, ``[n]``.
        weighting: ``"uniform"`` (``w = 1``, the released code) or ``"kl"`` (``w = (1 - t')^2 / t'``, E13).
        clip: Clip of ``dv``.

    Raises:
        ValueError: On an unknown weighting.
    """
    if weighting == "kl":
        gap = gap * broadcast_time((1 - t).pow(2) / t.clamp_min(1e-4), gap)
    elif weighting != "uniform":
        raise ValueError(f"unknown adversarial weighting {weighting!r}; expected 'uniform' or 'kl'")
    return gap.clamp(-clip, clip)


def adversarial_direction(
    model: VelocityModel,
    x_generated: Tensor,
    cond: Condition,
    shift: ConditionShift,
    weighting: str = "uniform",
    clip: float = 1.0,
) -> Tensor:
    """``dv = clip(v_fake - v_real)`` at re-noised generator samples (E12), fake and real in one forward.

    ``t' ~ U(0, 1)``, ``x_t' = (1 - t') x_g + t' z''``. With ``weighting = "kl"`` the gap is first
    multiplied by the KL weight ``(1 - t')^2 / t'`` of E13; ``"uniform"`` is the released code.

    Args:
        model: The online network (its fake branch learns the generator's velocity).
        x_generated: Detached one-step samples ``[n, ...]``.
        cond: Their conditions, batch ``n``.
        shift: The condition-shift operator.
        weighting: ``"uniform"`` or ``"kl"``.
        clip: Clip of ``dv``.

    Returns:
        ``dv`` of shape ``[n, ...]``, without gradient.
    """
    n = x_generated.shape[0]
    x_t, t = renoise(x_generated)
    fake_mask = torch.arange(2 * n, device=x_generated.device) < n
    t2 = torch.cat([t, t])
    both = evaluate(model, torch.cat([x_t, x_t]), t2, t2, cat_conditions(cond, cond), shift, fake_mask)
    v_fake, v_real = both.chunk(2)
    return matching_direction(v_fake - v_real, t, weighting, clip)


# ----------------------------------------------------------------------------------------------------------
# The whole objective


@dataclass(frozen=True)
class ObjectiveSettings:
    """Knobs of the objective (the recipe's ``method`` section, minus model choices)."""

    role_fractions: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    time_dist: tuple[float, float, float] = (1.0, 1.0, 1.0)
    consistency_ratio: float = 1.0
    enhanced_ratio: float = 0.0
    estimate_order: int = 2
    delta: float = 0.01
    loss: str = "barron"
    barron_c: float = 1e-3
    dist_match_coef: float = 0.5
    adversarial_weighting: str = "uniform"
    adversarial_loss: str | None = None  # rho of E12; None = ``loss``
    fake_weight: float = 1.0
    e2e_weight: float = 1.0
    cond_dropout: float = 0.0
    target_clip: float = 1.0
    target_velocity: str = "data"  # "data": E6 + E7; "teacher": the frozen teacher's guided velocity (needs teacher)


@dataclass(frozen=True)
class ObjectiveModels:
    """The networks one step uses: ``online`` (trained), ``reference`` (E7), ``rollout`` (E8), and the frozen
    ``teacher`` (only for ``target_velocity: teacher``)."""

    online: VelocityModel
    reference: VelocityModel
    rollout: VelocityModel
    teacher: VelocityModel | None = None


@dataclass(frozen=True)
class LossOutput:
    """The scalar to backpropagate and each term, detached, for logging (no ``.item()`` here)."""

    total: Tensor
    terms: dict[str, Tensor]
    generated: Tensor | None


def apex_loss(
    models: ObjectiveModels,
    x_data: Tensor,
    cond: Condition,
    uncond: Condition,
    settings: ObjectiveSettings,
    shift: ConditionShift | None,
    direction: Direction | None = None,
    e2e_noise: Tensor | None = None,
) -> LossOutput:
    """One APEX step's loss (E14): ``L = L_main + lambda_dm L_adv``.

    Args:
        models: Online, reference and rollout networks.
        x_data: Data (latents) ``[B, ...]``; the adv rows' data are replaced by generator samples.
        cond: Conditions of the rows, batch ``B``.
        uncond: The unconditional condition ``e`` repeated to batch ``B``.
        settings: Objective knobs.
        shift: Condition-shift operator of the fake branch (None only without adv rows).
        direction: Where ``dv`` of E12 comes from; None: the online network's fake branch
            (:func:`adversarial_direction`, needs adv rows). The DMD2 baseline passes its separate fake-score
            network's direction here and has no adv rows.
        e2e_noise: Teacher ODE pairs for the e2e rows (``method.regression_pairs``, ``train/pairs.py``): the
            noises ``[n_e2e, ...]`` whose teacher images are ``x_data[:n_e2e]``. The e2e rows then start from these
            noises and regress onto the paired velocity ``z - x`` (no E8 for them). None: E8 as in method.md.

    Returns:
        The total loss, the terms ``main``, ``fake`` (adv rows' flow matching), ``adversarial`` (the
        distribution-matching term, E12), and the one-step samples of the e2e rows (for monitoring), if any.

    Raises:
        ValueError: If there are adv rows but no shift.
    """
    roles = split_roles(x_data.shape[0], settings.role_fractions)
    t, r = sample_times(roles, settings.time_dist, settings.consistency_ratio, x_data.device, x_data.dtype)
    noise = torch.randn_like(x_data)
    if e2e_noise is not None:
        if e2e_noise.shape[0] != roles.e2e:
            raise ValueError(f"e2e_noise has {e2e_noise.shape[0]} rows for {roles.e2e} e2e rows")
        noise = torch.cat([e2e_noise, noise[roles.e2e :]])
    n_real, online = roles.real, models.online
    if settings.cond_dropout > 0:  # condition dropout teaches the unconditional velocity (CFG teachers)
        drop = torch.rand(x_data.shape[0], device=x_data.device) < settings.cond_dropout
        drop[n_real:] = False
        cond = where_condition(drop, uncond, cond)

    # The fake branch's data: one-step samples of the online model (sg).
    x = x_data
    fake_mask = None
    if roles.adv:
        if shift is None:
            raise ValueError("adv rows evaluate the fake branch, which needs a condition shift; got shift=None")
        with torch.no_grad():
            x_fake = one_step(online, torch.randn_like(x_data[n_real:]), slice_condition(cond, n_real, roles.total))
        x = torch.cat([x_data[:n_real], x_fake])
        fake_mask = torch.arange(roles.total, device=x.device) >= n_real
    x_t = interpolate(x, noise, t)
    velocity = evaluate(online, x_t, t, r, cond, shift, fake_mask)

    with torch.no_grad():
        v = noise - x  # (E6)
        target = v
        paired = 0 if e2e_noise is None else roles.e2e  # teacher ODE pairs: their exact velocity is the target
        if n_real > paired:  # E7/E8 for the unpaired real rows (none when the batch is paired e2e rows alone)
            real = _real_target(models, velocity, x_t, t, r, v, cond, uncond, roles, settings, skip=paired)
            target = torch.cat([v[:paired], real, v[n_real:]])
    rho = per_sample_loss(velocity, target, settings.loss, settings.barron_c)
    weight = time_weight(t, r)
    weight[: roles.e2e] *= settings.e2e_weight  # (E10) w(1, 0) = 1, times the recipe's e2e weight (1 by default)
    weight[n_real:] = settings.fake_weight  # (E10): adv rows are not time-weighted (1 by default)
    included = torch.ones_like(weight)
    if settings.estimate_order == 0:  # without E8 only mul and adv rows (and paired e2e rows) have a target
        included[: roles.e2e] = float(e2e_noise is not None)
        included[roles.e2e + roles.mul : n_real] = 0
    unpaired_e2e = roles.e2e if e2e_noise is None else 0
    n_included = roles.total - (0 if settings.estimate_order else unpaired_e2e + roles.any)
    loss_main = (weight * included * rho).sum() / max(n_included, 1)  # (E11)
    terms = {"main": loss_main.detach()}
    if roles.adv:
        terms["fake"] = rho[n_real:].mean().detach()

    total = loss_main
    generated = None
    if roles.e2e:
        generated = predict_data(x_t[: roles.e2e], velocity[: roles.e2e].detach(), t[: roles.e2e])
    if settings.dist_match_coef > 0 and roles.e2e and (roles.adv or direction is not None):
        f_e2e = velocity[: roles.e2e]
        cond_e2e = slice_condition(cond, 0, roles.e2e)
        with torch.no_grad():
            if direction is None:
                dv = adversarial_direction(online, generated, cond_e2e, shift, settings.adversarial_weighting)  # type: ignore[arg-type]
            else:
                dv = direction(generated, cond_e2e, slice_condition(uncond, 0, roles.e2e))
        adversarial_loss = settings.adversarial_loss or settings.loss
        loss_adv = per_sample_loss(f_e2e, f_e2e.detach() - dv, adversarial_loss, settings.barron_c).mean()
        total = total + settings.dist_match_coef * loss_adv  # (E14)
        terms["adversarial"] = loss_adv.detach()
    terms["total"] = total.detach()
    return LossOutput(total=total, terms=terms, generated=generated)


def _real_target(
    models: ObjectiveModels,
    velocity: Tensor,
    x_t: Tensor,
    t: Tensor,
    r: Tensor,
    v: Tensor,
    cond: Condition,
    uncond: Condition,
    roles: RoleSizes,
    settings: ObjectiveSettings,
    skip: int = 0,
) -> Tensor:
    """E7 then E8 for the e2e/mul/any rows (rows ``skip`` to ``roles.real``; the first ``skip`` e2e rows are paired
    with the teacher and need neither)."""
    n = roles.real
    v_real = v[skip:n]
    lo, hi = max(roles.e2e, skip), n  # E7 only matters where 0 < t < 1: mul and any rows (e2e rows have t = 1)
    if settings.target_velocity == "teacher":
        if models.teacher is None:
            raise ValueError("target_velocity 'teacher' needs ObjectiveModels.teacher, the frozen teacher")
        cond_n, uncond_n = slice_condition(cond, skip, n), slice_condition(uncond, skip, n)
        v_real = teacher_target(models.teacher, x_t[skip:n], t[skip:n], cond_n, uncond_n, settings.enhanced_ratio)
    elif settings.enhanced_ratio > 0 and hi > lo:
        guided = guidance_target(
            models.reference,
            x_t[lo:hi],
            t[lo:hi],
            v[lo:hi],
            slice_condition(cond, lo, hi),
            slice_condition(uncond, lo, hi),
            settings.enhanced_ratio,
        )
        v_real = torch.cat([v[skip:lo], guided])
    return consistency_target(
        models.rollout,
        velocity[skip:n].detach(),
        x_t[skip:n],
        t[skip:n],
        r[skip:n],
        v_real,
        slice_condition(cond, skip, n),
        settings.estimate_order,
        settings.delta,
        settings.target_clip,
    )
