"""Reaction and treatment terms r_k and s_k of Eq. 2, written as transfers between classes.

Every function here moves probability from one channel to others and adds nothing overall:
the channel sum of each voxel is unchanged, so the state stays on the simplex without relying
on the projection. That matters for the dynamics: a Euclidean projection would take an excess
back from *every* class equally (including the tumour), silently halving growth.

Fields are (B, C, *S). ``tumour`` is the channel of viable tumour. When radiotherapy has
delayed death, channel ``dying`` holds lethally hit tumour cells that still occupy space and
are imaged as tumour until they are cleared (seed 002's dying compartment); it is merged back
into the tumour class for every output.

Units: time in days, rates in 1/day, doses in Gy, α in 1/Gy, β in 1/Gy².
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage


def channel_vector(num_channels: int, index: int, like: torch.Tensor) -> torch.Tensor:
    """One-hot (1, C, 1, ..., 1) vector selecting channel ``index``, broadcastable against ``like``."""
    shape = [1, num_channels] + [1] * (like.dim() - 2)
    e = torch.zeros(shape, dtype=like.dtype, device=like.device)
    e.view(-1)[index] = 1.0
    return e


def transfer(field: torch.Tensor, amount: torch.Tensor, source: int, target: int) -> torch.Tensor:
    """Move ``amount`` (B, 1, *S) of probability from channel ``source`` to channel ``target``."""
    if source == target:
        return field
    c = field.shape[1]
    return field + amount * (channel_vector(c, target, field) - channel_vector(c, source, field))


def tumour_total(field: torch.Tensor, tumour: int, dying: int | None) -> torch.Tensor:
    """Imaged tumour probability (viable + dying), shaped (B, 1, *S)."""
    total = field[:, tumour:tumour + 1]
    if dying is not None:
        total = total + field[:, dying:dying + 1]
    return total


def logistic_growth(field: torch.Tensor, growth_rate, carrying_capacity, dt: float, tumour: int, sink: int,
                    dying: int | None = None, domain: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit Euler step of r = α(x)·v·(1 - T/κ(x)) for viable tumour v, total tumour T (1/day).

    Growth (r > 0) is taken from the other tissues of the voxel in proportion to their local
    share, so the tumour replaces the tissue it grows into; it is capped at what those tissues
    hold, which keeps every channel in [0, 1] even for α·Δt > 1. Shrinkage (T > κ) hands
    tumour to ``sink``. With one background class this is exactly Fisher–KPP's logistic term.
    """
    viable = field[:, tumour:tumour + 1]
    total = tumour_total(field, tumour, dying)
    gain = dt * growth_rate * viable * (1.0 - total / carrying_capacity)
    if domain is not None:
        gain = gain * domain
    c = field.shape[1]
    tumour_like = channel_vector(c, tumour, field) + (channel_vector(c, dying, field) if dying is not None else 0.0)
    others = field * (1.0 - tumour_like)
    others_sum = others.sum(dim=1, keepdim=True)
    growth = torch.minimum(torch.clamp(gain, min=0.0), others_sum)
    shrink = torch.clamp(gain, max=0.0)
    share = others / torch.where(others_sum > 0, others_sum, torch.ones_like(others_sum))
    e_t = channel_vector(c, tumour, field)
    e_s = channel_vector(c, sink, field)
    return field + (growth + shrink) * e_t - growth * share - shrink * e_s


def exponential_kill(field: torch.Tensor, rate_per_day: float, dt: float, tumour: int, target: int,
                     domain: torch.Tensor | None = None) -> torch.Tensor:
    """Kill viable tumour at a constant rate for ``dt`` days, exactly: v ← v·exp(-rate·dt).

    Used for chemotherapy exposure windows. The exact exponential factor cannot overshoot,
    whatever the step. Killed probability goes to ``target``.
    """
    if rate_per_day <= 0 or dt <= 0:
        return field
    killed = field[:, tumour:tumour + 1] * (1.0 - math.exp(-rate_per_day * dt))
    if domain is not None:
        killed = killed * domain
    return transfer(field, killed, tumour, target)


def linear_quadratic_survival(dose_gy, alpha_per_gy: float, beta_per_gy2: float):
    """Surviving fraction after one fraction of ``dose_gy``: S = exp(-α d - β d²)."""
    if isinstance(dose_gy, torch.Tensor):
        return torch.exp(-alpha_per_gy * dose_gy - beta_per_gy2 * dose_gy * dose_gy)
    return np.exp(-alpha_per_gy * np.asarray(dose_gy) - beta_per_gy2 * np.asarray(dose_gy) ** 2)


def oxygen_enhancement(tumour_share: torch.Tensor, hypoxia) -> torch.Tensor:
    """OER(ρ) = 1 + (OER_max − 1)·smoothstep(ρ; dense_from, dense_to) of a tumour share ρ (living +
    dying cells, 0..1) for a :class:`~AnatomyDTLib.plan.HypoxicRadioresistance`; the dose a fraction
    delivers is divided by it. Smooth in ρ, so the kill stays differentiable."""
    t = ((tumour_share - hypoxia.dense_from) / (hypoxia.dense_to - hypoxia.dense_from)).clamp(0.0, 1.0)
    return 1.0 + (hypoxia.oxygen_enhancement_ratio - 1.0) * (t * t * (3.0 - 2.0 * t))


def effective_dose(dose_gy: torch.Tensor, tumour_share: torch.Tensor | None, hypoxia) -> torch.Tensor:
    """The dose (Gy) that acts in each voxel: the fraction's dose, divided by the oxygen enhancement
    ratio of the voxel's tumour share when the plan models hypoxia."""
    if hypoxia is None or tumour_share is None:
        return dose_gy
    return dose_gy / oxygen_enhancement(tumour_share, hypoxia)


def radiation_fraction(field: torch.Tensor, dose_gy, alpha_per_gy: float, beta_per_gy2: float, tumour: int,
                       target: int, domain: torch.Tensor | None = None, *, hypoxia=None,
                       dying: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One radiotherapy fraction: viable tumour v ← v·S(d); the lethally hit part goes to ``target``.

    ``target`` is the dying channel when delayed death is modelled (cells stay visible as tumour),
    else the class receiving removed tumour. ``dose_gy`` is a float or a (B|1, 1, *S) dose map of
    this fraction in Gy. With ``hypoxia`` (:class:`~AnatomyDTLib.plan.HypoxicRadioresistance`) the
    dose is divided by the oxygen enhancement ratio of the tumour share (viable plus the ``dying``
    channel) before the fraction. Returns the new field and the killed probability (B, 1, *S).
    """
    dose = dose_gy if isinstance(dose_gy, torch.Tensor) else torch.as_tensor(float(dose_gy), dtype=field.dtype,
                                                                              device=field.device)
    if hypoxia is not None:
        dose = effective_dose(dose, tumour_total(field, tumour, dying), hypoxia)
    survival = linear_quadratic_survival(dose, alpha_per_gy, beta_per_gy2)
    killed = field[:, tumour:tumour + 1] * (1.0 - survival)
    if domain is not None:
        killed = killed * domain
    return transfer(field, killed, tumour, target), killed


def clear_dying(field: torch.Tensor, clearable: torch.Tensor, rate_per_day: float, dt: float, dying: int,
                target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clear lethally hit cells whose delay has passed: pool ← pool·exp(-λ·dt), exactly.

    ``clearable`` (B, 1, *S) is the part of the dying channel past its delay. ``rate_per_day`` may
    be a 0-d tensor (a fitted clearance rate, calibration.py): the result is then differentiable
    in it. Returns the new field and the cleared amount.
    """
    if isinstance(rate_per_day, torch.Tensor):
        cleared = clearable * -torch.expm1(-rate_per_day * dt)
    else:
        cleared = clearable * (1.0 - math.exp(-rate_per_day * dt))
    return transfer(field, cleared, dying, target), cleared


def resect(field: torch.Tensor, removal: torch.Tensor, tumour: int, target: int, dying: int | None = None) -> torch.Tensor:
    """Surgery: remove the fraction ``removal`` (B|1, 1, *S) in [0, 1] of all tumour (viable and dying) per voxel."""
    field = transfer(field, field[:, tumour:tumour + 1] * removal, tumour, target)
    if dying is not None:
        field = transfer(field, field[:, dying:dying + 1] * removal, dying, target)
    return field


def removal_from_extent(tumour_probability: np.ndarray, extent: float, spacing, domain: np.ndarray | None = None) -> np.ndarray:
    """Per-voxel removal fraction that takes ``extent`` of the tumour mass from the core outward.

    The core is where the distance (mm, with the physical spacing) from the voxel to the nearest
    voxel outside the tumour (tumour probability < 0.5) is largest. Voxels are removed whole, deepest first,
    then fringe voxels (probability < 0.5) by decreasing probability; the last voxel is removed
    partially so that exactly ``extent`` × total tumour mass is removed.

    Args:
        tumour_probability: (*S) array of imaged tumour probability.
        extent: fraction of the tumour mass to remove, in (0, 1].
        spacing: mm per axis, in array order.
    Returns:
        (*S) float array of removal fractions in [0, 1].
    """
    prob = np.asarray(tumour_probability, dtype=np.float64)
    if domain is not None:
        prob = prob * domain
    total = prob.sum()
    removal = np.zeros_like(prob)
    if total <= 0:
        return removal
    core = prob >= 0.5
    depth = ndimage.distance_transform_edt(core, sampling=spacing) if core.any() else np.zeros_like(prob)
    # Fringe voxels sort after every core voxel, by probability.
    priority = np.where(core, 1.0 + depth, prob)
    order = np.argsort(-priority, kind="stable", axis=None)
    mass = prob.ravel()[order]
    cumulative = np.cumsum(mass)
    target = extent * total
    full = cumulative <= target
    flat = removal.ravel()
    flat[order[full]] = 1.0
    n_full = int(full.sum())
    if n_full < order.size:
        already = cumulative[n_full - 1] if n_full > 0 else 0.0
        remaining = target - already
        if remaining > 0 and mass[n_full] > 0:
            flat[order[n_full]] = min(1.0, remaining / mass[n_full])
    return flat.reshape(prob.shape)
