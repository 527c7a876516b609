"""Size-guided spatial forecasts and growth-probability maps (seed 002's guidance, done with our PDE).

Seed 002 steers an image generator so that the tumour it draws has the size a mechanistic burden
model forecasts, and averages many such images, one per bootstrap forecast, into a tumour growth
probability map. Here the spatial model is the Anatomy-DT PDE (:mod:`AnatomyDTLib.solver`) and the
"guidance" is a one-dimensional calibration: the tumour growth rate alpha (1/day, the PDE's logistic
proliferation rate) is chosen so that the predicted tumour volume on ``day`` equals the target volume
(e.g. from :mod:`AnatomyDTLib.burden`). Diffusion, mass effect and treatment stay as the model has them,
so the *shape* of the growth comes from the anatomy and the *amount* from the burden forecast.

Volume, tolerance, search
-------------------------
* Volume = argmax tumour voxels x voxel volume (mL), as a segmentation of the forecast would measure it
  (:meth:`AnatomyDTLib.predict.Prediction.volumes_ml` counts the same way).
* A target is met when ``|V - target| <= max(rtol x target, atol_ml)`` (defaults 2 % and 0.5 mL).
* The volume on ``day`` increases with alpha, so alpha is found within ``growth_rate_range`` (default
  0-0.4 /day; the literature range of glioma proliferation is 0.005-0.1 /day, the margin lets the PDE
  make up for what it lacks) by a safeguarded regula falsi on ``log(V + one voxel)`` between the
  closest computed volumes either side of the target; each new alpha is kept at least 10 % of the
  bracket away from its ends, so the bracket shrinks geometrically.
* Every PDE run is shared: all targets of an ensemble are solved together, round by round, and every
  volume already computed narrows every target's bracket. Runs of one round go through the solver as
  one batch (``members_per_batch`` at a time).
* The argmax volume is a step function of alpha (voxels cross 0.5 one shell at a time); if the bracket
  shrinks below ``1e-4`` /day without meeting the tolerance, the closer end is used and the member is
  reported with ``within_tolerance = False`` (this happens on very coarse grids).

Unreachable targets
-------------------
A target below the volume reached with alpha = 0 (e.g. a large shrinkage the model's treatment
does not produce) or above the volume at the top of the range cannot be met by the growth rate.
``on_unreachable="raise"`` (the default of :func:`volume_guided_forecast`) raises
:class:`~AnatomyDTLib.errors.ParameterError` with both volumes; ``"clamp"`` (the default of the
ensemble functions, where a few extreme bootstrap members are expected) uses the range end, flags
the member ``clamped`` and issues one :class:`GuidedForecastWarning` naming how many were clamped.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import Cancelled, InputError, ParameterError
from .parameters import PDEParameters
from .plan import load_plan
from .schema import BRAIN_SCHEMA, ClassSchema
from .solver import simulate

__all__ = ["GROWTH_RATE_RANGE_PER_DAY", "VOLUME_RTOL", "VOLUME_ATOL_ML", "GuidedForecastWarning", "GuidedForecast",
           "GuidedEnsemble", "volume_guided_forecast", "guided_ensemble", "growth_probability_map",
           "tumour_volumes_ml"]

GROWTH_RATE_RANGE_PER_DAY = (0.0, 0.4)
"""Default search range of the PDE tumour growth rate alpha (1/day)."""
VOLUME_RTOL = 0.02
"""Default relative tolerance on the forecast volume (2 %)."""
VOLUME_ATOL_ML = 0.5
"""Default absolute tolerance on the forecast volume (mL)."""
MIN_BRACKET_PER_DAY = 1e-4
"""A bracket narrower than this (1/day) means the argmax volume jumps across the target."""
MAX_ROUNDS = 30
DEFAULT_MEMBERS = 20
_SAFEGUARD = 0.1


class GuidedForecastWarning(UserWarning):
    """A target volume was out of reach (clamped) or met only approximately (argmax volume jump)."""


@dataclass
class GuidedForecast:
    """A forecast whose tumour volume on ``day`` was steered to ``target_ml``.

    Attributes:
        field: (K, *S) probability field on ``day`` (float32, on the input grid).
        day: the forecast day (days from baseline).
        target_ml: requested tumour volume (mL).
        volume_ml: argmax tumour volume of ``field`` (mL).
        growth_rate_per_day: the PDE growth rate alpha that produced it (1/day).
        within_tolerance: ``|volume - target| <= tolerance_ml``.
        tolerance_ml: the tolerance used (mL).
        clamped: the target was out of reach and the range end was used.
        pde_runs: number of PDE forecasts computed.
    """

    field: torch.Tensor
    day: float
    target_ml: float
    volume_ml: float
    growth_rate_per_day: float
    within_tolerance: bool
    tolerance_ml: float
    clamped: bool
    pde_runs: int

    def labels(self) -> np.ndarray:
        """Argmax class labels (array order)."""
        return self.field.argmax(dim=0).cpu().numpy().astype(np.uint8)


@dataclass
class GuidedEnsemble:
    """Guided forecasts for many target volumes, summarised as a growth-probability map.

    Attributes:
        probability: (*S) float32 in [0, 1]: the fraction of members in which the voxel is tumour
            (argmax) on ``day``.
        day: forecast day.
        targets_ml, volumes_ml, growth_rates_per_day: per member (N,).
        within_tolerance, clamped: per member (N,) booleans.
        tolerances_ml: per member tolerance (mL).
        pde_runs: number of PDE forecasts computed (shared by all members).
    """

    probability: np.ndarray
    day: float
    targets_ml: np.ndarray
    volumes_ml: np.ndarray
    growth_rates_per_day: np.ndarray
    within_tolerance: np.ndarray
    clamped: np.ndarray
    tolerances_ml: np.ndarray
    pde_runs: int

    def summary(self) -> str:
        n = self.targets_ml.size
        return (f"{n} members: targets {self.targets_ml.min():.3g}-{self.targets_ml.max():.3g} mL, forecast volumes "
                f"{self.volumes_ml.min():.3g}-{self.volumes_ml.max():.3g} mL, growth rates "
                f"{self.growth_rates_per_day.min():.3g}-{self.growth_rates_per_day.max():.3g} /day; "
                f"{int(self.within_tolerance.sum())}/{n} within tolerance, {int(self.clamped.sum())} clamped; "
                f"{self.pde_runs} PDE runs")


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------

def _pde_parameters(model) -> PDEParameters:
    """The PDE parameters of ``model``: None/'pde-only' (literature defaults), PDEParameters or a PDE-only model."""
    if model is None or model == "pde-only":
        return PDEParameters.brain_defaults()
    if isinstance(model, PDEParameters):
        return model
    params = getattr(model, "parameters", None)
    if isinstance(params, PDEParameters):
        return params
    raise InputError(f"Guided forecasts steer the mechanistic PDE's growth rate; give model=None, 'pde-only' or "
                     f"PDEParameters, not {model!r} (a learned model has no single growth rate to calibrate).")


def _as_field(baseline_field, spacing, schema: ClassSchema) -> torch.Tensor:
    p0 = baseline_field if isinstance(baseline_field, torch.Tensor) else torch.as_tensor(np.asarray(baseline_field))
    if not torch.is_floating_point(p0):
        raise InputError("baseline_field must be a (K, *S) probability field (floats); convert labels with "
                         "AnatomyDTLib.state.labels_to_field.")
    if p0.dim() != len(spacing) + 1 or p0.shape[0] != schema.num_classes:
        raise InputError(f"baseline_field must be (K={schema.num_classes}, *S) with {len(spacing)} spatial axes to "
                         f"match the spacing, got shape {tuple(p0.shape)}.")
    p0 = p0.detach().to(torch.float32)
    if not bool((p0.argmax(dim=0) == schema.tumour_index).any()):
        raise InputError("The baseline has no tumour voxels, so no growth rate can produce a tumour volume; check the "
                         "segmentation's class mapping.")
    return p0


def _check_day(day) -> float:
    d = float(day)
    if not (math.isfinite(d) and d > 0):
        raise ParameterError(f"The forecast day must be > 0 (days after the baseline scan), got {day!r}.")
    return d


def _check_targets(targets) -> np.ndarray:
    t = np.atleast_1d(np.asarray(targets, dtype=float))
    if t.ndim != 1 or t.size == 0:
        raise ParameterError("Give at least one target volume (mL).")
    if not (np.isfinite(t).all() and (t > 0).all()):
        raise ParameterError(f"Target volumes must be finite and > 0 mL, got {t.tolist()}.")
    return t


def _check_range(growth_rate_range) -> tuple[float, float]:
    lo, hi = (float(x) for x in growth_rate_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi):
        raise ParameterError(f"growth_rate_range must be (low, high) with 0 <= low < high (1/day), got {growth_rate_range!r}.")
    return lo, hi


def tumour_volumes_ml(fields: torch.Tensor, tumour_index: int, voxel_ml: float) -> np.ndarray:
    """Argmax tumour volume (mL) of each (K, *S) field in a (B, K, *S) batch."""
    labels = fields.argmax(dim=1)
    return (labels == tumour_index).reshape(labels.shape[0], -1).sum(dim=1).cpu().numpy() * voxel_ml


# ----------------------------------------------------------------------------------------------
# The shared pool of PDE runs
# ----------------------------------------------------------------------------------------------

@dataclass
class _Pool:
    """PDE forecasts computed so far, by growth rate: volume (mL) and tumour mask (and the field, if kept)."""

    run: Callable[[np.ndarray], torch.Tensor]
    tumour_index: int
    voxel_ml: float
    keep_fields: bool
    rates: list = field(default_factory=list)
    volumes: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    fields: list = field(default_factory=list)

    def evaluate(self, rates: Sequence[float]) -> None:
        new = sorted({float(r) for r in rates} - set(self.rates))
        if not new:
            return
        out = self.run(np.asarray(new))
        vols = tumour_volumes_ml(out, self.tumour_index, self.voxel_ml)
        for i, r in enumerate(new):
            self.rates.append(r)
            self.volumes.append(float(vols[i]))
            self.masks.append((out[i].argmax(dim=0) == self.tumour_index).cpu().numpy())
            self.fields.append(out[i].clone() if self.keep_fields else None)

    def sorted_curve(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.rates)
        return np.asarray(self.rates)[order], np.asarray(self.volumes)[order]

    def index(self, rate: float) -> int:
        return self.rates.index(float(rate))


def _make_runner(p0: torch.Tensor, spacing, day: float, plan, params: PDEParameters, schema: ClassSchema, mask,
                 members_per_batch: int, cancel: Callable[[], bool] | None = None):
    """A function: growth rates (R,) -> (R, K, *S) fields on ``day`` (no gradients, batched).

    ``cancel`` is polled after every solver step; returning True raises :class:`Cancelled`."""
    base = params.simulate_kwargs(p0, schema)
    spatial = tuple(p0.shape[1:])

    def on_step(_day: float, _horizon: float) -> None:
        if cancel is not None and cancel():
            raise Cancelled("guided forecast cancelled by the user")

    def run(rates: np.ndarray) -> torch.Tensor:
        outs = []
        for start in range(0, rates.size, members_per_batch):
            chunk = torch.as_tensor(rates[start:start + members_per_batch], dtype=p0.dtype)
            b = chunk.numel()
            kwargs = dict(base)
            kwargs["growth_rate"] = chunk.reshape((b,) + (1,) * len(spatial)).expand((b,) + spatial)
            with torch.no_grad():
                out = simulate(p0.unsqueeze(0).expand((b,) + tuple(p0.shape)).contiguous(), spacing=spacing,
                               days=[day], plan=plan, mask=mask, schema=schema, progress=on_step, **kwargs)
            outs.append(out)
        return torch.cat(outs, dim=0)

    return run


def _members_per_batch(p0: torch.Tensor, requested: int | None) -> int:
    if requested is not None:
        if not (isinstance(requested, int) and requested >= 1):
            raise ParameterError(f"members_per_batch must be an integer >= 1, got {requested!r}.")
        return requested
    return max(1, int(4_000_000 // p0.numel()))  # keeps one batch's field near 16 MB (float32)


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------

def _solve_rates(pool: _Pool, targets: np.ndarray, tolerances: np.ndarray, lo: float, hi: float, start: float,
                 on_unreachable: str, progress=None):
    """Growth rate per target (N,), plus within-tolerance and clamped flags (see module docstring)."""
    if on_unreachable not in ("raise", "clamp"):
        raise ParameterError(f"on_unreachable must be 'raise' or 'clamp', got {on_unreachable!r}.")
    pool.evaluate([lo, min(max(start, lo), hi), hi])
    rates, vols = pool.sorted_curve()
    v_lo, v_hi = vols[0], vols[-1]
    below = targets < v_lo - tolerances
    above = targets > v_hi + tolerances
    if on_unreachable == "raise" and (below.any() or above.any()):
        k = int(np.flatnonzero(below | above)[0])
        side = "below the volume the model reaches without growth" if below[k] else \
            "above the volume the model reaches at the fastest growth allowed"
        raise ParameterError(
            f"Target tumour volume {targets[k]:.3g} mL is {side}: with growth rates {lo:g}-{hi:g} /day the forecast "
            f"volume on this day ranges from {v_lo:.3g} to {v_hi:.3g} mL. Check the target (volumes, plan) or widen "
            "growth_rate_range; use on_unreachable='clamp' to accept the nearest reachable volume.")
    chosen = np.full(targets.size, np.nan)
    clamped = below | above
    chosen[below] = lo
    chosen[above] = hi
    for _ in range(MAX_ROUNDS):
        rates, vols = pool.sorted_curve()
        proposals = []
        for i in np.flatnonzero(np.isnan(chosen)):
            err = np.abs(vols - targets[i])
            best = int(np.argmin(err))
            lower, upper = vols <= targets[i], vols >= targets[i]
            if err[best] <= tolerances[i] or not lower.any() or not upper.any():
                chosen[i] = rates[best]
                continue
            a, b = rates[lower].max(), rates[upper].min()  # the volume increases with the rate: bracket [a, b]
            if b - a < MIN_BRACKET_PER_DAY:  # a jump of the argmax volume (b <= a only if rounding broke monotony)
                chosen[i] = rates[best]
                continue
            proposals.append(_interpolate(rates, vols, a, b, targets[i], pool.voxel_ml))
        if progress is not None:
            progress(int((~np.isnan(chosen)).sum()), targets.size)
        if not proposals:
            break
        pool.evaluate(proposals)
    rates, vols = pool.sorted_curve()
    for i in np.flatnonzero(np.isnan(chosen)):  # out of rounds: the closest computed volume
        chosen[i] = rates[int(np.argmin(np.abs(vols - targets[i])))]
    volumes = np.array([pool.volumes[pool.index(r)] for r in chosen])
    within = np.abs(volumes - targets) <= tolerances
    return chosen, volumes, within, clamped


def _interpolate(rates: np.ndarray, vols: np.ndarray, a: float, b: float, target: float, voxel_ml: float) -> float:
    """Next growth rate for ``target`` in the bracket [a, b]: regula falsi on log(V + one voxel) between the
    bracket's ends (the closest computed volumes either side), kept 10 % of the bracket away from its ends.

    (A monotone PCHIP interpolant through all computed volumes was tried and needed ~15 % more PDE runs:
    the argmax volume's steps spoil the curvature it relies on.)"""
    va, vb = float(vols[rates == a][0]), float(vols[rates == b][0])
    la, lb, lt = (math.log(v + voxel_ml) for v in (va, vb, target))
    x = a + (b - a) * (lt - la) / (lb - la) if lb > la else 0.5 * (a + b)
    return float(min(max(x, a + _SAFEGUARD * (b - a)), b - _SAFEGUARD * (b - a)))


def _warn(within: np.ndarray, clamped: np.ndarray, targets: np.ndarray, volumes: np.ndarray) -> None:
    if clamped.any():
        warnings.warn(f"{int(clamped.sum())} of {targets.size} target volume(s) were out of the model's reach and were "
                      "clamped to the nearest reachable volume (targets "
                      f"{', '.join(f'{t:.3g}' for t in targets[clamped][:5])} mL -> "
                      f"{', '.join(f'{v:.3g}' for v in volumes[clamped][:5])} mL).", GuidedForecastWarning, stacklevel=3)
    loose = ~within & ~clamped
    if loose.any():
        warnings.warn(f"{int(loose.sum())} of {targets.size} target volume(s) were met only approximately: the argmax "
                      "tumour volume jumps across the target on this grid (targets "
                      f"{', '.join(f'{t:.3g}' for t in targets[loose][:5])} mL -> "
                      f"{', '.join(f'{v:.3g}' for v in volumes[loose][:5])} mL).", GuidedForecastWarning, stacklevel=3)


def _setup(baseline_field, spacing, day, plan, model, schema, mask, growth_rate_range, members_per_batch, keep_fields,
           cancel=None):
    spacing = tuple(float(h) for h in spacing)
    p0 = _as_field(baseline_field, spacing, schema)
    d = _check_day(day)
    lo, hi = _check_range(growth_rate_range)
    params = _pde_parameters(model)
    treatment = load_plan(plan, schema=schema)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    run = _make_runner(p0, spacing, d, treatment, params, schema, mask, _members_per_batch(p0, members_per_batch),
                       cancel)
    pool = _Pool(run, schema.tumour_index, voxel_ml, keep_fields)
    return pool, d, lo, hi, params


def _tolerances(targets: np.ndarray, rtol: float, atol_ml: float) -> np.ndarray:
    if not (rtol >= 0 and atol_ml >= 0 and (rtol > 0 or atol_ml > 0)):
        raise ParameterError(f"rtol and atol_ml must be >= 0 and not both 0, got {rtol!r}, {atol_ml!r}.")
    return np.maximum(rtol * targets, atol_ml)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def volume_guided_forecast(baseline_field, spacing, day, target_ml, plan=None, model=None, *,
                           schema: ClassSchema = BRAIN_SCHEMA, mask=None,
                           growth_rate_range=GROWTH_RATE_RANGE_PER_DAY, rtol: float = VOLUME_RTOL,
                           atol_ml: float = VOLUME_ATOL_ML, on_unreachable: str = "raise",
                           members_per_batch: int | None = None,
                           cancel: Callable[[], bool] | None = None) -> GuidedForecast:
    """Forecast the anatomy on ``day`` with the PDE growth rate chosen so that the tumour volume is ``target_ml``.

    Args:
        baseline_field: (K, *S) baseline probability field (torch or numpy), e.g. ``AnatomyState.field``.
        spacing: mm per spatial axis, array order.
        day: forecast day (> 0, days after the baseline).
        target_ml: target argmax tumour volume (mL), e.g. a burden-model forecast.
        plan: treatment plan (dict, path, TreatmentPlan, None); arrays on the baseline grid.
        model: None or 'pde-only' (literature parameters), PDEParameters, or a PDE-only model.
        schema: class schema of the field.
        mask: optional brain mask (see :func:`AnatomyDTLib.solver.simulate`).
        growth_rate_range: search range of alpha (1/day).
        rtol, atol_ml: tolerance ``max(rtol x target, atol_ml)`` (mL).
        on_unreachable: 'raise' (ParameterError) or 'clamp' (range end, with a warning).
        members_per_batch: PDE runs per solver batch (default: by grid size).
        cancel: polled after every PDE step; returning True stops with :class:`~AnatomyDTLib.errors.Cancelled`.

    Returns:
        :class:`GuidedForecast`.
    """
    pool, d, lo, hi, params = _setup(baseline_field, spacing, day, plan, model, schema, mask, growth_rate_range,
                                     members_per_batch, keep_fields=True, cancel=cancel)
    targets = _check_targets([target_ml])
    if targets.size != 1:
        raise ParameterError("volume_guided_forecast takes one target volume; use guided_ensemble for several.")
    tol = _tolerances(targets, rtol, atol_ml)
    rates, volumes, within, clamped = _solve_rates(pool, targets, tol, lo, hi, params.growth_rate, on_unreachable)
    _warn(within, clamped, targets, volumes)
    k = pool.index(rates[0])
    return GuidedForecast(pool.fields[k], d, float(targets[0]), float(volumes[0]), float(rates[0]), bool(within[0]),
                          float(tol[0]), bool(clamped[0]), len(pool.rates))


def guided_ensemble(baseline_field, spacing, day, targets, plan=None, model=None, *, members: int = DEFAULT_MEMBERS,
                    schema: ClassSchema = BRAIN_SCHEMA, mask=None, growth_rate_range=GROWTH_RATE_RANGE_PER_DAY,
                    rtol: float = VOLUME_RTOL, atol_ml: float = VOLUME_ATOL_ML, on_unreachable: str = "clamp",
                    members_per_batch: int | None = None, progress=None,
                    cancel: Callable[[], bool] | None = None) -> GuidedEnsemble:
    """Guided forecasts for many target volumes and their growth-probability map.

    Args:
        targets: target volumes (mL), or a :class:`~AnatomyDTLib.burden.BurdenBootstrap`, from which
            ``members`` volumes on ``day`` are taken at evenly spaced quantiles (stratified draws of the
            forecast distribution).
        members: number of members drawn from a bootstrap (ignored for explicit volumes).
        progress: optional ``progress(members_done, members)`` after each round of PDE runs.
        cancel: polled after every PDE step; returning True stops with :class:`~AnatomyDTLib.errors.Cancelled`.
        Others: as :func:`volume_guided_forecast` (``on_unreachable`` defaults to 'clamp').

    Returns:
        :class:`GuidedEnsemble`; its ``probability`` is the fraction of members in which each voxel is tumour.
    """
    pool, d, lo, hi, params = _setup(baseline_field, spacing, day, plan, model, schema, mask, growth_rate_range,
                                     members_per_batch, keep_fields=False, cancel=cancel)
    if hasattr(targets, "volume_quantiles"):
        if not (isinstance(members, int) and members >= 1):
            raise ParameterError(f"members must be an integer >= 1, got {members!r}.")
        targets = targets.volume_quantiles(d, members)
    target_arr = _check_targets(targets)
    tol = _tolerances(target_arr, rtol, atol_ml)
    rates, volumes, within, clamped = _solve_rates(pool, target_arr, tol, lo, hi, params.growth_rate, on_unreachable,
                                                   progress)
    _warn(within, clamped, target_arr, volumes)
    probability = np.zeros(pool.masks[0].shape, dtype=np.float64)
    for r in rates:
        probability += pool.masks[pool.index(r)]
    probability = (probability / target_arr.size).astype(np.float32)
    return GuidedEnsemble(probability, d, target_arr, volumes, rates, within, clamped, tol, len(pool.rates))


def growth_probability_map(baseline_field, spacing, day, targets, plan=None, model=None, **kwargs) -> np.ndarray:
    """Per-voxel tumour probability on ``day`` over guided forecasts (float32 (*S) in [0, 1]).

    The fraction of the members (one per target volume, or ``members`` stratified draws of a burden
    bootstrap) in which the voxel is tumour (argmax). Arguments as :func:`guided_ensemble`.
    """
    return guided_ensemble(baseline_field, spacing, day, targets, plan, model, **kwargs).probability
