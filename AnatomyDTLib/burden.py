"""Tumour burden (total visible tumour volume, mL) over time under treatment: seed 002's compartmental model.

A whole-tumour model with no space in it: from a few measured volumes (day, mL) and the treatment
plan it forecasts the volume at later days, with a bootstrap band. :mod:`AnatomyDTLib.guided`
uses these forecasts to steer the spatial PDE (volume-guided forecasts, growth-probability maps).
Pure NumPy/SciPy; torch is not imported. Equations, priors and measured coverage: docs/burden.md.

Model (days from the baseline scan, volumes in mL)
--------------------------------------------------
Two compartments: living (growing) tumour ``L`` and lethally irradiated ("dying") tumour ``D``;
the visible burden is ``V = L + D``.

* Growth: ``dL/dt = (rho - k(t)) L`` with ``rho`` the volume growth rate (1/day) and ``k(t)`` the
  plan's chemotherapy kill rate (1/day, the sum over agents whose ``[start, end)`` window is active;
  0 without chemotherapy). Killed-by-chemotherapy cells vanish at once (as in the PDE solver).
* Radiotherapy: the plan's ``F`` fractions, on their days ``f_1 <= ... <= f_F``, each keep the
  fraction ``s_f = s**(1/F)`` of ``L``; ``s`` (``rt_survival``) is the surviving fraction of the whole
  course, the split of seed 002 at RT start spread evenly over the fractions. The hit part
  ``(1 - s_f) L(f_i)`` becomes a dying cohort that stays visible for ``delay`` days and is then
  cleared exponentially with the half-life ``T_half`` (rate ``lambda = ln 2 / T_half``).
  With ``F = 1`` this is exactly seed 002's model (split at RT start, delayed decay of ``A_d``).
* Surgery: on each surgery day the living tumour and every dying cohort drop to the residual
  fraction ``r`` (``surgery_residual``) of their volume.
* Timing (docs/plan.md): an event on day ``d`` acts at the start of day ``d``, after that day's
  scan, so a volume measured on day ``d`` is the volume before day ``d``'s events. On one day,
  surgery acts before radiotherapy.

Exact solution (no numerical integrator): with ``K(t) = integral_0^t k``, ``n_F(t)`` the number of
fractions before ``t`` and ``n_S(a, b)`` the number of surgeries in ``(a, b)``::

    L(t)   = V0 exp(rho t - K(t)) s_f**n_F(t) r**n_S(0, t)
    D_i(t) = (1 - s_f) L(f_i^-) r**n_S(f_i, t) g(t - f_i),    for t > f_i
    g(tau) = 1 for tau <= delay,  exp(-lambda (tau - delay)) after
    V(t)   = L(t) + sum_i D_i(t)

where ``L(f_i^-) = V0 exp(rho f_i - K(f_i)) s_f**(i - 1) r**n_S(0, f_i]`` is the living volume just
before fraction ``i`` (the earlier fractions of the same day included).

Fitting
-------
:func:`fit_burden` fits log-volumes by bounded least squares (:func:`scipy.optimize.least_squares`;
volumetric errors are roughly proportional to the volume). Which parameters are free depends on the
number of measurements and on where they fall relative to the treatment
(:func:`identifiable_parameters`); the others are fixed at the plan's value or at a documented prior
(:data:`PRIORS`). Fits the data cannot support are refused with :class:`~AnatomyDTLib.errors.InputError`
(bad data) or :class:`~AnatomyDTLib.errors.ParameterError` (a free-parameter request the data cannot
identify), saying what to supply.

Uncertainty
-----------
:func:`bootstrap_burden` is a parametric residual bootstrap on the log scale: each member draws a
noise level from the residual variance (pooled with a prior measurement noise), simulates new
measurements around the fitted curve, draws every fixed parameter that came from a prior (not from
the plan) from its prior range, and refits. Percentiles of the members' trajectories give the band.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .errors import InputError, ParameterError
from .plan import TreatmentPlan, load_plan

__all__ = [
    "PARAMETER_NAMES", "PRIORS", "Prior", "BurdenParameters", "Schedule", "BurdenFit", "BurdenBootstrap",
    "schedule_from_plan", "burden_volume", "identifiable_parameters", "fit_burden", "bootstrap_burden",
    "read_volumes_csv", "check_measurements", "rt_survival_prior", "refit_batch", "plot_burden_forecast",
]

_LN2 = math.log(2.0)

PARAMETER_NAMES = ("v0_ml", "rho_per_day", "rt_survival", "surgery_residual", "clearance_half_life_days",
                   "death_delay_days")
"""The model's parameters, in the order they are freed (after V0 and rho, treatments in time order)."""

UNITS = {"v0_ml": "mL", "rho_per_day": "1/day", "rt_survival": "", "surgery_residual": "",
         "clearance_half_life_days": "days", "death_delay_days": "days"}

DESCRIPTIONS = {
    "v0_ml": "tumour volume at day 0 (baseline)",
    "rho_per_day": "volume growth rate of living tumour",
    "rt_survival": "surviving fraction of the whole radiotherapy course",
    "surgery_residual": "fraction of the tumour volume left by each surgery",
    "clearance_half_life_days": "half-life of the clearance of irradiated cells",
    "death_delay_days": "days irradiated cells stay visible before clearance starts",
}

BOUNDS = {
    "v0_ml": (1e-3, 1e4),
    "rho_per_day": (0.0, 0.3),
    "rt_survival": (1e-3, 1.0),
    "surgery_residual": (0.01, 1.0),
    "clearance_half_life_days": (2.0, 200.0),
    "death_delay_days": (0.0, 60.0),
}
"""Bounds of every parameter in a fit (units of :data:`UNITS`)."""


@dataclass(frozen=True)
class Prior:
    """The value a fixed parameter takes, and the range the bootstrap draws it from.

    Attributes:
        nominal: value used in the fit when the parameter is fixed.
        low, high: range of the bootstrap draws.
        log: draw log-uniformly (else uniformly).
    """

    nominal: float
    low: float
    high: float
    log: bool = False

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` draws from the prior range."""
        if self.low == self.high:
            return np.full(n, self.nominal)
        if self.log:
            return np.exp(rng.uniform(math.log(self.low), math.log(self.high), n))
        return rng.uniform(self.low, self.high, n)


EFFECTIVE_ALPHA_PER_GY = math.log(1.0 / 0.3) / 72.0
"""Radiosensitivity of the *visible* volume (1/Gy of BED): ``s = exp(-a BED)``. Chosen so that the standard
60 Gy in 30 x 2 Gy (BED 72 Gy for alpha/beta = 10 Gy) leaves ``s = 0.3`` (at most ~70 % visible shrinkage
before regrowth). Much smaller than the clonogenic LQ alpha (0.03-0.07 /Gy): the visible lesion includes
oedema and hypoxic, slowly responding cells."""

PRIORS = {
    "surgery_residual": Prior(0.25, 0.1, 0.6, log=True),
    "clearance_half_life_days": Prior(21.0, 10.0, 45.0),
    "death_delay_days": Prior(14.0, 7.0, 28.0),
}
"""Priors of the parameters that may be fixed (``rt_survival``'s depends on the dose: :func:`rt_survival_prior`).
``surgery_residual``: 75 % of the visible volume removed (extent of resection typically 70-100 % of the
bulk, the visible lesion includes non-resected oedema); a plan's ``extent`` replaces the nominal value
(``1 - extent``, at least 0.02). Delay 7-28 days, half-life 10-45 days: the ranges of the synthetic cohort
(docs/brain_data.md) and the plan format's example; a plan's ``delayed_death`` replaces both, and then
they are not drawn."""

MEASUREMENT_NOISE_LOG = 0.10
"""Prior measurement noise of a volume, as a standard deviation of log-volume (about 10 %)."""
MEASUREMENT_NOISE_PRIOR_DOF = 2.0
"""Weight of that prior, in pseudo-measurements, when pooled with the fit's residuals."""
MIN_MEASUREMENTS = 2


def rt_survival_prior(rt) -> Prior:
    """Prior of ``rt_survival`` for a radiotherapy course: ``exp(-a BED)`` (see :data:`EFFECTIVE_ALPHA_PER_GY`).

    BED = n d (1 + d / (alpha/beta)) with the plan's dose per fraction and alpha/beta (dose maps are not
    used: the burden model has no space). Drawn log-uniformly within a factor 3 either side (capped at 1).
    """
    d = rt.dose_per_fraction_gy
    ab = rt.alpha_beta_gy
    bed = rt.n_fractions * d * (1.0 + (d / ab if math.isfinite(ab) else 0.0))
    nominal = float(np.clip(math.exp(-EFFECTIVE_ALPHA_PER_GY * bed), 0.01, 1.0))
    return Prior(nominal, max(BOUNDS["rt_survival"][0], nominal / 3.0), min(1.0, nominal * 3.0), log=True)


# ----------------------------------------------------------------------------------------------
# Parameters and schedule
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BurdenParameters:
    """One set of model parameters (units in :data:`UNITS`). Fields may also be NumPy arrays of one
    shape (a batch of parameter sets, as in the bootstrap)."""

    v0_ml: float
    rho_per_day: float
    rt_survival: float = 1.0
    surgery_residual: float = 1.0
    clearance_half_life_days: float = PRIORS["clearance_half_life_days"].nominal
    death_delay_days: float = PRIORS["death_delay_days"].nominal

    def to_dict(self) -> dict:
        return {n: _plain(getattr(self, n)) for n in PARAMETER_NAMES}

    def doubling_time_days(self):
        """Volume doubling time ln 2 / rho of the living tumour (days; inf for rho = 0)."""
        rho = np.asarray(self.rho_per_day, dtype=float)
        with np.errstate(divide="ignore"):
            return np.where(rho > 0, _LN2 / np.where(rho > 0, rho, 1.0), np.inf)


def _plain(value):
    a = np.asarray(value)
    return float(a) if a.ndim == 0 else a.tolist()


@dataclass(frozen=True)
class Schedule:
    """The parts of a treatment plan the burden model uses (days from baseline).

    Attributes:
        fraction_days: radiotherapy fraction days, sorted (a day twice = two fractions).
        surgery_days: surgery days, sorted.
        chemo_windows: (W, 3) array of ``[start, end, kill rate (1/day)]``.
        extent: the first stated surgical ``extent`` in the plan, or None (resection masks state none).
        delay_days, half_life_days: the plan's ``radiotherapy.delayed_death``, or None.
        rt_prior: prior of ``rt_survival`` (None without radiotherapy).
    """

    fraction_days: np.ndarray
    surgery_days: np.ndarray
    chemo_windows: np.ndarray
    extent: float | None = None
    delay_days: float | None = None
    half_life_days: float | None = None
    rt_prior: Prior | None = None

    @property
    def has_rt(self) -> bool:
        return self.fraction_days.size > 0

    @property
    def has_surgery(self) -> bool:
        return self.surgery_days.size > 0

    @property
    def first_rt_day(self) -> float | None:
        return float(self.fraction_days[0]) if self.has_rt else None

    def first_event_day(self) -> float | None:
        """Day of the first surgery or radiotherapy fraction (chemotherapy uses the plan's kill rate, so it
        hides no parameter), or None."""
        days = list(self.fraction_days[:1]) + list(self.surgery_days[:1])
        return float(min(days)) if days else None

    def event_markers(self) -> list[tuple[str, float, float]]:
        """``(kind, start, end)`` spans for plots: surgery (a day), radiotherapy (first-last fraction), chemo windows."""
        out = [("surgery", float(d), float(d)) for d in self.surgery_days]
        if self.has_rt:
            out.append(("radiotherapy", float(self.fraction_days[0]), float(self.fraction_days[-1])))
        out += [("chemotherapy", float(a), float(b)) for a, b, _ in self.chemo_windows]
        return out


def schedule_from_plan(plan) -> Schedule:
    """The :class:`Schedule` of a plan (dict, JSON path, :class:`TreatmentPlan` or None = no treatment).

    Radiotherapy dose maps and resection masks are not read: the burden model uses only days, the
    prescription and a surgery's stated ``extent``.
    """
    tp = plan if isinstance(plan, TreatmentPlan) else load_plan(plan)
    rt = tp.radiotherapy
    fractions = np.asarray(rt.fraction_days if rt is not None else (), dtype=float)
    surgeries = np.asarray([s.day for s in tp.surgeries], dtype=float)
    windows = [(a, b, c.kill_rate_per_day) for c in tp.chemotherapy for a, b in c.windows if c.kill_rate_per_day > 0]
    extent = next((s.extent for s in tp.surgeries if s.extent is not None), None)
    delay = half_life = None
    if rt is not None and rt.delayed_death is not None:
        delay, half_life = rt.delayed_death.delay_days, rt.delayed_death.clearance_half_life_days
    return Schedule(np.sort(fractions), np.sort(surgeries), np.asarray(windows, dtype=float).reshape(-1, 3),
                    extent, delay, half_life, rt_survival_prior(rt) if rt is not None else None)


# ----------------------------------------------------------------------------------------------
# The exact solution
# ----------------------------------------------------------------------------------------------

def _chemo_integral(t: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """K(t) = integral over [0, t) of the chemotherapy kill rate (dimensionless), for days ``t``."""
    if windows.size == 0:
        return np.zeros_like(t, dtype=float)
    start, end, rate = windows[:, 0], windows[:, 1], windows[:, 2]
    exposed = np.clip(np.minimum(t[..., None], end) - start, 0.0, None)
    return (exposed * rate).sum(axis=-1)


def burden_volume(days, params: BurdenParameters, schedule: Schedule, *, compartments: bool = False):
    """Visible tumour volume V(t) (mL) at ``days`` (days from baseline), exactly (module docstring).

    Args:
        days: a day or an array of days (T,).
        params: parameters; scalars give a (T,) result, (B,) arrays a (B, T) result.
        schedule: the treatment (:func:`schedule_from_plan`).
        compartments: also return the living and dying volumes.

    Returns:
        V, or (V, L, D) with ``compartments``.
    """
    t = np.atleast_1d(np.asarray(days, dtype=float))
    p = {n: np.asarray(getattr(params, n), dtype=float) for n in PARAMETER_NAMES}
    batched = p["v0_ml"].ndim > 0
    col = {n: (v.reshape(-1, 1) if batched else v.reshape(1, 1)) for n, v in p.items()}  # (B, 1)
    tt = t.reshape(1, -1)                                                                  # (1, T)
    log_r = np.log(col["surgery_residual"])
    n_frac = schedule.fraction_days.size
    log_sf = np.log(col["rt_survival"]) / max(n_frac, 1)
    n_surg_before = (schedule.surgery_days[None, :] < t[:, None]).sum(axis=1)             # (T,)
    n_frac_before = (schedule.fraction_days[None, :] < t[:, None]).sum(axis=1)            # (T,)
    log_l = (np.log(col["v0_ml"]) + col["rho_per_day"] * tt - _chemo_integral(t, schedule.chemo_windows)[None, :]
             + n_frac_before[None, :] * log_sf + n_surg_before[None, :] * log_r)
    living = np.exp(log_l)
    dying = np.zeros_like(living)
    if n_frac:
        f = schedule.fraction_days                                                          # (F,)
        surg_upto_f = (schedule.surgery_days[None, :] <= f[:, None]).sum(axis=1)           # (F,) same-day surgery first
        log_pre = (np.log(col["v0_ml"]) + col["rho_per_day"] * f[None, :] - _chemo_integral(f, schedule.chemo_windows)[None, :]
                   + np.arange(n_frac)[None, :] * log_sf + surg_upto_f[None, :] * log_r)   # (B, F)
        hit = np.log(-np.expm1(log_sf)) + log_pre                                            # log (1 - s_f) L(f^-)
        # surgeries strictly after the fraction and strictly before t
        after = (schedule.surgery_days[None, None, :] > f[:, None, None]) & \
                (schedule.surgery_days[None, None, :] < t[None, :, None])                    # (F, T, S)
        n_surg_between = after.sum(axis=2)                                                   # (F, T)
        tau = t[None, :] - f[:, None]                                                        # (F, T)
        lam = _LN2 / col["clearance_half_life_days"]                                          # (B, 1)
        delay = col["death_delay_days"]
        overdue = np.clip(tau[None, :, :] - delay[:, :, None], 0.0, None)                    # (B, F, T)
        log_d = hit[:, :, None] + n_surg_between[None] * log_r[:, :, None] - lam[:, :, None] * overdue
        cohorts = np.where(tau[None] > 0, np.exp(np.where(tau[None] > 0, log_d, -np.inf)), 0.0)
        dying = cohorts.sum(axis=1)
    volume = living + dying
    if not batched:
        volume, living, dying = volume[0], living[0], dying[0]
    if np.ndim(days) == 0:
        volume, living, dying = volume[..., 0], living[..., 0], dying[..., 0]
    return (volume, living, dying) if compartments else volume


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------

def check_measurements(days, volumes_ml) -> tuple[np.ndarray, np.ndarray]:
    """Validate measured (day, mL) pairs; returns them as float arrays.

    Raises:
        InputError: fewer than two, different lengths, non-finite, unsorted or repeated days, or a
            volume <= 0 mL (a log-volume fit needs positive volumes).
    """
    t = np.asarray(days, dtype=float).ravel()
    v = np.asarray(volumes_ml, dtype=float).ravel()
    if t.size != v.size:
        raise InputError(f"Got {t.size} days but {v.size} volumes; give one volume (mL) per measurement day.")
    if t.size < MIN_MEASUREMENTS:
        raise InputError(f"The burden model needs at least {MIN_MEASUREMENTS} measured volumes (day, mL) to fit "
                         f"a growth rate; got {t.size}. Supply volumes from at least two scans.")
    if not (np.isfinite(t).all() and np.isfinite(v).all()):
        raise InputError("Measured days and volumes must be finite numbers (no NaN/inf); check the volume table.")
    repeated = t[1:][np.diff(t) == 0]
    if repeated.size:
        raise InputError(f"Day {repeated[0]:g} is measured twice; give one volume per day (average repeated "
                         "measurements of the same scan first).")
    if np.any(np.diff(t) < 0):
        k = int(np.argmax(np.diff(t) < 0))
        raise InputError(f"Measurement days must be in increasing order; day {t[k + 1]:g} follows day {t[k]:g}. "
                         "Sort the table by day.")
    bad = np.flatnonzero(v <= 0)
    if bad.size:
        raise InputError(f"Volume {v[bad[0]]:g} mL on day {t[bad[0]]:g} is not positive; the model fits "
                         "log-volumes, so every measured volume must be > 0 mL (a tumour not visible any more "
                         "cannot be fitted: leave that scan out or give the smallest measurable volume).")
    return t, v


def read_volumes_csv(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a volume table: two columns ``day, volume_ml`` (comma, semicolon or tab separated).

    A header row is optional (recognised when its first cell is not a number); with a header, the
    columns named ``day`` and ``volume_ml`` (or ``volume``, ``volume_mL``, ``tumour_ml``) are used and
    others are ignored. Empty lines and lines starting with ``#`` are skipped. The values are
    checked by :func:`check_measurements`.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"Volume table {str(p)!r} not found; give a CSV file with columns day, volume_ml.")
    text = p.read_text(encoding="utf-8-sig")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputError(f"Volume table {str(p)!r} is empty; give rows 'day,volume_ml'.")
    dialect = csv.Sniffer().sniff(lines[0], delimiters=",;\t") if any(c in lines[0] for c in ",;\t") else None
    rows = [[c.strip() for c in r] for r in csv.reader(lines, dialect) if r] if dialect else [ln.split() for ln in lines]
    day_col, vol_col = 0, 1
    if rows and not _is_number(rows[0][0]):
        header = [h.strip().lower() for h in rows[0]]
        day_col = _column(header, ("day", "days"), p)
        vol_col = _column(header, ("volume_ml", "volume", "volume_ml_", "tumour_ml", "tumor_ml", "volume (ml)"), p)
        rows = rows[1:]
    days, vols = [], []
    for i, row in enumerate(rows, start=1):
        if len(row) <= max(day_col, vol_col):
            raise InputError(f"{p}: data row {i} ({', '.join(row)}) has too few columns; expected day, volume_ml.")
        if not (_is_number(row[day_col]) and _is_number(row[vol_col])):
            raise InputError(f"{p}: data row {i} ({', '.join(row)}) is not two numbers (day, volume in mL).")
        days.append(float(row[day_col]))
        vols.append(float(row[vol_col]))
    try:
        return check_measurements(days, vols)
    except InputError as exc:
        raise InputError(f"{p}: {exc}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _column(header: list[str], names: Sequence[str], path: Path) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise InputError(f"{path}: the header ({', '.join(header)}) has no column {names[0]!r}; name the columns "
                     "'day' and 'volume_ml', or leave the header out (first column day, second volume in mL).")


# ----------------------------------------------------------------------------------------------
# Identifiability
# ----------------------------------------------------------------------------------------------

def _nominal_values(schedule: Schedule) -> dict[str, tuple[float, str]]:
    """Value and source ('plan', 'prior', 'no treatment') of every parameter when fixed."""
    out = {}
    if schedule.has_rt:
        out["rt_survival"] = (schedule.rt_prior.nominal, "prior")
    else:
        out["rt_survival"] = (1.0, "no radiotherapy")
    if schedule.has_surgery:
        if schedule.extent is not None:
            out["surgery_residual"] = (max(1.0 - schedule.extent, 0.02), "plan extent")
        else:
            out["surgery_residual"] = (PRIORS["surgery_residual"].nominal, "prior")
    else:
        out["surgery_residual"] = (1.0, "no surgery")
    for name, plan_value in (("death_delay_days", schedule.delay_days),
                             ("clearance_half_life_days", schedule.half_life_days)):
        out[name] = (plan_value, "plan") if plan_value is not None else (PRIORS[name].nominal, "prior")
    return out


def _data_condition(name: str, t: np.ndarray, schedule: Schedule, delay: float) -> str | None:
    """Why ``name`` cannot be fitted from measurements on days ``t`` (None if it can)."""
    if name in ("v0_ml", "rho_per_day"):
        return None
    if name in ("rt_survival", "clearance_half_life_days", "death_delay_days"):
        if not schedule.has_rt:
            return "the plan has no radiotherapy"
        visible_from = schedule.first_rt_day + delay
        n_after = int((t > visible_from).sum())
        need = 1 if name == "rt_survival" else 2
        if n_after < need:
            return (f"it needs {need} volume(s) measured after day {visible_from:g} (first fraction on day "
                    f"{schedule.first_rt_day:g} + {delay:g} days of delayed death), got {n_after}")
        return None
    if name == "surgery_residual":
        if not schedule.has_surgery:
            return "the plan has no surgery"
        s = float(schedule.surgery_days[0])
        later_rt = schedule.fraction_days[schedule.fraction_days >= s]
        until = float(later_rt[0]) if later_rt.size else math.inf
        if not np.any((t > s) & (t <= until)):
            span = f"between day {s:g} and day {until:g} (the next radiotherapy fraction)" if math.isfinite(until) \
                else f"after day {s:g}"
            return f"it needs a volume measured after the surgery and before any other treatment, i.e. {span}"
        return None
    raise ParameterError(f"Unknown burden parameter {name!r}; the parameters are {', '.join(PARAMETER_NAMES)}.")


def _treatment_order(schedule: Schedule) -> list[str]:
    """Treatment parameters in the order their treatments start (surgery before RT on the same day)."""
    events = []
    if schedule.has_surgery:
        events.append((float(schedule.surgery_days[0]), 0, "surgery_residual"))
    if schedule.has_rt:
        events.append((float(schedule.fraction_days[0]), 1, "rt_survival"))
    return [name for _, _, name in sorted(events)]


def identifiable_parameters(days, schedule: Schedule) -> list[tuple[str, str]]:
    """The free parameters the automatic rule picks for measurements on ``days``, with the reason.

    Rule (docs/burden.md, "Identifiability"):

    1. ``v0_ml`` and ``rho_per_day`` are always free (two measurements determine them).
    2. A treatment parameter is freed, in the order the treatments start, when the data show its
       effect and the number of free parameters stays <= the number of measurements: ``surgery_residual``
       needs a volume after the surgery and before radiotherapy; ``rt_survival`` needs one more than
       ``delay`` days after the first fraction (irradiated cells stay visible that long).
    3. ``clearance_half_life_days`` (if the plan does not set it) needs two volumes after that and one
       measurement more than free parameters (it is only weakly determined by volumes).
    4. ``death_delay_days`` is never freed automatically (it trades off against the half-life).

    Args:
        days: measurement days, checked (:func:`check_measurements`) and increasing.
        schedule: the treatment (:func:`schedule_from_plan`).

    Raises:
        InputError: every measurement is after the first surgery or radiotherapy fraction, so the untreated
            volume V0 and the treatment's effect cannot be told apart.
    """
    t = np.asarray(days, dtype=float)
    first = schedule.first_event_day()
    if first is not None and t[0] > first:
        what = "surgery" if schedule.has_surgery and float(schedule.surgery_days[0]) == first else "radiotherapy"
        raise InputError(f"Every measured volume is after the first treatment ({what} on day {first:g}), so the "
                         "untreated volume and the treatment's effect cannot be separated. Supply a volume measured "
                         f"on or before day {first:g} (e.g. the baseline scan at day 0).")
    nominal = _nominal_values(schedule)
    delay = nominal["death_delay_days"][0]
    free = [("v0_ml", "always"), ("rho_per_day", "always")]
    for name in _treatment_order(schedule):
        if len(free) < t.size and _data_condition(name, t, schedule, delay) is None:
            free.append((name, "data after the treatment"))
    if schedule.has_rt and schedule.half_life_days is None and len(free) + 1 < t.size \
            and _data_condition("clearance_half_life_days", t, schedule, delay) is None:
        free.append(("clearance_half_life_days", "two volumes after the response and a spare measurement"))
    return free


def _resolve_free(free, t: np.ndarray, schedule: Schedule) -> list[str]:
    """The free parameters: the automatic rule, or an explicit request checked against the data."""
    if free is None:
        return [n for n, _ in identifiable_parameters(t, schedule)]
    requested = [free] if isinstance(free, str) else list(free)
    unknown = [n for n in requested if n not in PARAMETER_NAMES]
    if unknown:
        raise ParameterError(f"Unknown burden parameter(s) {unknown}; choose from {', '.join(PARAMETER_NAMES)}.")
    missing = [n for n in ("v0_ml", "rho_per_day") if n not in requested]
    if missing:
        raise ParameterError(f"{' and '.join(missing)} must be free: V0 anchors the volumes and rho is the growth every "
                             "forecast rests on (neither has a prior). Add them to the free parameters.")
    identifiable_parameters(t, schedule)  # the pre-treatment-measurement check
    if len(requested) > t.size:
        raise ParameterError(f"{len(requested)} free parameters ({', '.join(requested)}) but only {t.size} measured "
                             f"volumes; supply at least {len(requested)} volumes or free fewer parameters "
                             "(the others are fixed at the plan's values or the priors, docs/burden.md).")
    delay = _nominal_values(schedule)["death_delay_days"][0]
    for name in requested:
        if name in ("clearance_half_life_days", "death_delay_days") and schedule.has_rt:
            if (name == "clearance_half_life_days" and schedule.half_life_days is not None) or \
                    (name == "death_delay_days" and schedule.delay_days is not None):
                raise ParameterError(f"{name} is set by the plan's radiotherapy.delayed_death; remove it there to fit it.")
        reason = _data_condition(name, t, schedule, delay)
        if reason is not None:
            raise ParameterError(f"{name} ({DESCRIPTIONS[name]}) cannot be fitted: {reason}. Supply such "
                                 "measurements or leave it fixed.")
    return [n for n in PARAMETER_NAMES if n in requested]


# ----------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------

@dataclass
class BurdenFit:
    """A fitted burden model.

    Attributes:
        days, volumes_ml: the measurements.
        schedule: the treatment.
        parameters: fitted and fixed parameters.
        free: names of the fitted parameters.
        sources: per parameter, where its value comes from ('fitted', 'plan', 'prior', ...).
        r2: coefficient of determination of the volumes (mL scale): 1 - SS_res / SS_tot.
        rmse_ml: root-mean-square error of the volumes (mL).
        residuals_log: log(measured) - log(fitted) per measurement.
        sigma_log: log-volume noise used by the bootstrap (residuals pooled with the prior noise).
        noise_dof: degrees of freedom of ``sigma_log``.
        notes: remarks for the user (exact fit, parameters at a bound, ...).
    """

    days: np.ndarray
    volumes_ml: np.ndarray
    schedule: Schedule
    parameters: BurdenParameters
    free: list[str]
    sources: dict[str, str]
    r2: float
    rmse_ml: float
    residuals_log: np.ndarray
    sigma_log: float
    noise_dof: float
    notes: list[str] = field(default_factory=list)

    def predict(self, days) -> np.ndarray:
        """Fitted volume (mL) at ``days``."""
        return burden_volume(days, self.parameters, self.schedule)

    def summary(self) -> str:
        """Parameters, sources and fit quality as text lines."""
        lines = []
        for name in PARAMETER_NAMES:
            if name in ("rt_survival",) and not self.schedule.has_rt:
                continue
            if name == "surgery_residual" and not self.schedule.has_surgery:
                continue
            if name in ("clearance_half_life_days", "death_delay_days") and not self.schedule.has_rt:
                continue
            value = getattr(self.parameters, name)
            unit = UNITS[name]
            lines.append(f"  {name:<26} {value:>10.4g} {unit:<6} ({self.sources[name]}; {DESCRIPTIONS[name]})")
        lines.append(f"  volume doubling time       {float(self.parameters.doubling_time_days()):>10.4g} days")
        lines.append(f"  R² = {self.r2:.4f}, RMSE = {self.rmse_ml:.3g} mL over {self.days.size} volumes, "
                     f"{len(self.free)} free parameters; log-volume noise {self.sigma_log:.3f}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _parameters_from(values: Mapping[str, float]) -> BurdenParameters:
    return BurdenParameters(**{n: values[n] for n in PARAMETER_NAMES})


def _residual_function(t, log_v, free, fixed, schedule):
    """Residuals (log model - log measured) as a function of the free vector (log V0 instead of V0)."""
    def residuals(x):
        values = dict(fixed)
        for name, xi in zip(free, x):
            values[name] = math.exp(xi) if name == "v0_ml" else xi
        model = burden_volume(t, _parameters_from(values), schedule)
        return np.log(np.maximum(model, 1e-300)) - log_v
    return residuals


def _bounds(free) -> tuple[np.ndarray, np.ndarray]:
    lo = [math.log(BOUNDS[n][0]) if n == "v0_ml" else BOUNDS[n][0] for n in free]
    hi = [math.log(BOUNDS[n][1]) if n == "v0_ml" else BOUNDS[n][1] for n in free]
    return np.asarray(lo), np.asarray(hi)


def _starts(t, log_v, free, schedule, nominal) -> list[np.ndarray]:
    """Starting points: a log-linear fit on the untreated measurements, then a few treatment responses."""
    first = schedule.first_event_day()
    pre = t <= first if first is not None else np.ones_like(t, dtype=bool)
    if pre.sum() >= 2:
        rho0, logv00 = np.polyfit(t[pre], log_v[pre], 1)
    else:
        rho0, logv00 = 0.02, log_v[0] - 0.02 * t[0]
    rho0 = float(np.clip(rho0, 1e-4, BOUNDS["rho_per_day"][1] * 0.9))
    base = {"v0_ml": logv00, "rho_per_day": rho0}
    base.update({n: nominal[n][0] for n in PARAMETER_NAMES if n not in base})
    variants = [{}]
    if "rt_survival" in free:
        variants += [{"rt_survival": 0.05}, {"rt_survival": 0.6}]
    if "surgery_residual" in free:
        variants += [{"surgery_residual": 0.6}]
    lo, hi = _bounds(free)
    starts = []
    for v in variants:
        x = np.array([v.get(n, base[n]) for n in free], dtype=float)
        starts.append(np.clip(x, lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo)))
    return starts


def _solve(t, log_v, free, fixed, schedule, starts) -> np.ndarray:
    # imported here: scipy.optimize costs ~0.3 s, and every CLI command imports this module to
    # build its parser, most of them without ever fitting a burden model
    from scipy.optimize import least_squares

    fun = _residual_function(t, log_v, free, fixed, schedule)
    lo, hi = _bounds(free)
    best = None
    for x0 in starts:
        res = least_squares(fun, x0, bounds=(lo, hi), method="trf", x_scale="jac", xtol=1e-10, ftol=1e-10,
                            gtol=1e-10, max_nfev=400)
        if best is None or res.cost < best.cost - 1e-14:
            best = res
    return best.x


def fit_burden(days, volumes_ml, plan=None, *, free: Iterable[str] | None = None) -> BurdenFit:
    """Fit the burden model to measured volumes by bounded least squares on log-volumes.

    Args:
        days: measurement days (days from the baseline scan; increasing, no repeats; may be negative for
            scans before the baseline).
        volumes_ml: measured tumour volumes in mL (> 0).
        plan: treatment plan (dict, JSON path, TreatmentPlan, or None = no treatment) or a :class:`Schedule`.
        free: parameters to fit; default: :func:`identifiable_parameters`. The others are fixed at the
            plan's values or the priors.

    Returns:
        :class:`BurdenFit` with R² and RMSE (mL) of the fitted volumes.

    Raises:
        InputError: unusable measurements (:func:`check_measurements`) or no measurement before the first
            surgery / radiotherapy fraction.
        ParameterError: an explicit ``free`` set the data cannot identify (too many for the number of
            measurements, or a treatment whose effect no measurement shows).
    """
    t, v = check_measurements(days, volumes_ml)
    schedule = plan if isinstance(plan, Schedule) else schedule_from_plan(plan)
    names = _resolve_free(free, t, schedule)
    nominal = _nominal_values(schedule)
    fixed = {n: val for n, (val, _) in nominal.items() if n not in names}
    log_v = np.log(v)
    x = _solve(t, log_v, names, fixed, schedule, _starts(t, log_v, names, schedule, nominal))
    values = dict(fixed)
    for name, xi in zip(names, x):
        values[name] = math.exp(xi) if name == "v0_ml" else float(xi)
    params = _parameters_from(values)
    fitted = burden_volume(t, params, schedule)
    residuals = log_v - np.log(fitted)
    ss_tot = float(((v - v.mean()) ** 2).sum())
    ss_res = float(((v - fitted) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    dof = t.size - len(names)
    pooled_dof = dof + MEASUREMENT_NOISE_PRIOR_DOF
    sigma = math.sqrt((float((residuals ** 2).sum()) + MEASUREMENT_NOISE_PRIOR_DOF * MEASUREMENT_NOISE_LOG ** 2)
                      / pooled_dof)
    sources = {n: ("fitted" if n in names else nominal[n][1]) for n in PARAMETER_NAMES}
    notes = _fit_notes(t, names, values, dof, schedule)
    return BurdenFit(t, v, schedule, params, names, sources, r2, math.sqrt(ss_res / t.size), residuals, sigma,
                     pooled_dof, notes)


def _fit_notes(t, names, values, dof, schedule) -> list[str]:
    notes = []
    if dof == 0:
        notes.append(f"as many free parameters as volumes ({len(names)}): the curve passes through every "
                     "measurement, R² = 1 by construction, and the band comes from the prior measurement noise "
                     f"({MEASUREMENT_NOISE_LOG:.0%}).")
    for name in names:
        lo, hi = BOUNDS[name]
        value = values[name]
        if name != "v0_ml" and (abs(value - lo) <= 1e-6 * max(1.0, abs(hi - lo)) or abs(value - hi) <= 1e-6 * max(1.0, abs(hi - lo))):
            notes.append(f"{name} = {value:.4g} is at its bound [{lo:g}, {hi:g}] {UNITS[name]}.")
    for name in ("surgery_residual", "rt_survival"):
        if name not in names and ((name == "rt_survival" and schedule.has_rt) or
                                  (name == "surgery_residual" and schedule.has_surgery)):
            notes.append(f"{name} is not determined by these volumes (docs/burden.md, Identifiability): it is fixed "
                         f"at {values[name]:.3g} and varied over its prior range in the bootstrap.")
    return notes


# ----------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------

@dataclass
class BurdenBootstrap:
    """Bootstrap members of a burden fit.

    Attributes:
        fit: the fit they resample.
        members: a :class:`BurdenParameters` whose fields are (B,) arrays.
        seed: the generator seed.
    """

    fit: BurdenFit
    members: BurdenParameters
    seed: int

    @property
    def size(self) -> int:
        return int(np.asarray(self.members.v0_ml).size)

    def trajectories(self, days) -> np.ndarray:
        """(B, T) member volumes (mL) at ``days``."""
        return burden_volume(np.atleast_1d(np.asarray(days, dtype=float)), self.members, self.fit.schedule)

    def band(self, days, level: float = 0.90) -> dict[str, np.ndarray]:
        """Point forecast, median and the central ``level`` band (mL) at ``days``.

        Returns a dict with ``day``, ``fit`` (the fitted curve), ``median``, ``lower``, ``upper``
        (the ``(1 - level)/2`` and ``(1 + level)/2`` percentiles of the members).
        """
        d = np.atleast_1d(np.asarray(days, dtype=float))
        traj = self.trajectories(d)
        q = 100.0 * np.array([(1 - level) / 2, 0.5, (1 + level) / 2])
        lower, median, upper = np.percentile(traj, q, axis=0)
        return {"day": d, "fit": np.atleast_1d(self.fit.predict(d)), "median": median, "lower": lower, "upper": upper}

    def volume_quantiles(self, day: float, n: int) -> np.ndarray:
        """``n`` volumes (mL) at ``day`` at the evenly spaced quantiles (i + 0.5)/n of the members
        (stratified draws of the forecast distribution, for growth-probability maps)."""
        if n < 1:
            raise ParameterError(f"The number of volumes must be >= 1, got {n}.")
        values = self.trajectories([day])[:, 0]
        return np.quantile(values, (np.arange(n) + 0.5) / n)


def bootstrap_burden(fit: BurdenFit, n: int = 1000, *, seed: int = 0, prior_sampling: bool = True) -> BurdenBootstrap:
    """Parametric residual bootstrap of a burden fit (docs/burden.md, "Bootstrap").

    Member ``b``: draws the noise ``sigma_b`` from its scaled-inverse-chi² distribution (``fit.noise_dof``
    degrees of freedom around ``fit.sigma_log``), makes new log-volumes ``log V_fit(t_i) + sigma_b e_i``
    (``e_i`` standard normal), draws every prior-fixed parameter from its prior range (``prior_sampling``),
    and refits the free parameters, starting from the fitted values. All members are refitted together
    by :func:`refit_batch`. Deterministic for a given ``seed``.

    Args:
        fit: the fit to resample.
        n: number of members (>= 10).
        seed: seed of :func:`numpy.random.default_rng`.
        prior_sampling: draw prior-fixed parameters (plan values are never drawn).
    """
    if not (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 10):
        raise ParameterError(f"The bootstrap needs at least 10 members, got {n!r}.")
    rng = np.random.default_rng(seed)
    t, names = fit.days, fit.free
    base = fit.parameters.to_dict()
    fitted_log = np.log(fit.predict(t))
    sigma = fit.sigma_log * np.sqrt(fit.noise_dof / rng.chisquare(fit.noise_dof, n))
    log_y = fitted_log[None, :] + rng.standard_normal((n, t.size)) * sigma[:, None]
    drawn = _prior_draws(fit, rng, n) if prior_sampling else {}
    fixed = {nm: (drawn[nm] if nm in drawn else np.full(n, base[nm])) for nm in PARAMETER_NAMES if nm not in names}
    start = {nm: np.full(n, base[nm]) for nm in names}
    values = refit_batch(t, log_y, names, fixed, fit.schedule, start)
    return BurdenBootstrap(fit, _parameters_from({**fixed, **values}), seed)


def refit_batch(days, log_volumes, free: Sequence[str], fixed: Mapping[str, np.ndarray], schedule: Schedule,
                start: Mapping[str, np.ndarray], *, max_iterations: int = 100) -> dict[str, np.ndarray]:
    """Fit many data sets at once (one per row of ``log_volumes``, (B, T)) by a vectorised Levenberg-Marquardt.

    The same least-squares problem as :func:`fit_burden` (log-volume residuals, the same bounds), solved
    for all rows together so that a 1000-member bootstrap takes a fraction of a second instead of a
    thousand :func:`scipy.optimize.least_squares` calls. Bounds are enforced by the smooth change of
    variables ``x = lo + (hi - lo) / (1 + exp(-u))`` (``log V0`` for ``v0_ml``); each row keeps its own
    damping and stops when its cost stops improving (relative change < 1e-12) or after ``max_iterations``.
    Testing/test_burden.py checks it against ``least_squares`` row by row.

    Args:
        days: (T,) measurement days.
        log_volumes: (B, T) log-volumes (log mL).
        free: names of the fitted parameters.
        fixed: every other parameter as a (B,) array.
        schedule: the treatment.
        start: (B,) starting values of the free parameters.

    Returns:
        The fitted free parameters, name -> (B,) array.
    """
    t = np.asarray(days, dtype=float)
    y = np.asarray(log_volumes, dtype=float)
    b = y.shape[0]
    lo, hi = _bounds(free)
    x0 = np.stack([np.log(start[nm]) if nm == "v0_ml" else np.asarray(start[nm], dtype=float) for nm in free], axis=1)
    u = _to_unbounded(x0, lo, hi)
    p = len(free)

    def residuals(uu: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(len(rows) * k, T) residuals for k stacked parameter blocks of the given rows."""
        k = uu.shape[0] // rows.size
        x = _to_bounded(uu, lo, hi)
        values = {nm: np.tile(np.asarray(fixed[nm])[rows], k) for nm in fixed}
        for j, nm in enumerate(free):
            values[nm] = np.exp(x[:, j]) if nm == "v0_ml" else x[:, j]
        model = burden_volume(t, _parameters_from(values), schedule)
        return np.log(np.maximum(model, 1e-300)) - np.tile(y[rows], (k, 1))

    all_rows = np.arange(b)
    r = residuals(u, all_rows)
    cost = 0.5 * (r ** 2).sum(axis=1)
    damping = np.full(b, 1e-3)
    active = np.ones(b, dtype=bool)
    for _ in range(max_iterations):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        ua, ra = u[rows], r[rows]
        step = 1e-6 * np.maximum(1.0, np.abs(ua))
        shifted = np.concatenate([ua + np.eye(p)[j] * step[:, j:j + 1] for j in range(p)])
        rs = residuals(shifted, rows).reshape(p, rows.size, t.size)
        jac = np.transpose((rs - ra[None]) / step.T[:, :, None], (1, 2, 0))            # (R, T, p)
        jtj = np.einsum("rti,rtj->rij", jac, jac)
        grad = np.einsum("rti,rt->ri", jac, ra)
        scaled = jtj + damping[rows, None, None] * (np.eye(p) * (np.diagonal(jtj, axis1=1, axis2=2)[:, :, None] + 1e-12))
        delta = -np.linalg.solve(scaled, grad[:, :, None])[:, :, 0]
        trial = np.clip(ua + delta, -_U_LIMIT, _U_LIMIT)
        rt_ = residuals(trial, rows)
        new_cost = 0.5 * (rt_ ** 2).sum(axis=1)
        better = new_cost < cost[rows]
        improved = rows[better]
        gain = (cost[rows] - new_cost) / np.maximum(cost[rows], 1e-300)
        u[improved], r[improved], cost[improved] = trial[better], rt_[better], new_cost[better]
        damping[improved] = np.maximum(damping[improved] / 3.0, 1e-12)
        damping[rows[~better]] *= 4.0
        done = (better & (gain < 1e-12)) | (~better & (damping[rows] > 1e10)) | (np.abs(grad).max(axis=1) < 1e-14)
        active[rows[done]] = False
    x = _to_bounded(u, lo, hi)
    return {nm: (np.exp(x[:, j]) if nm == "v0_ml" else x[:, j]) for j, nm in enumerate(free)}


_U_LIMIT = 30.0  # |u| beyond this is the bound itself to double precision


def _to_unbounded(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    z = np.clip((x - lo) / (hi - lo), 1e-12, 1.0 - 1e-12)
    return np.log(z) - np.log1p(-z)


def _to_bounded(u: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return lo + (hi - lo) / (1.0 + np.exp(-u))


def _prior_draws(fit: BurdenFit, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Draws of the parameters fixed at a prior (not those from the plan or absent treatments)."""
    out = {}
    for name in PARAMETER_NAMES:
        if name in fit.free or fit.sources[name] not in ("prior", "plan extent"):
            continue
        if name == "rt_survival":
            prior = fit.schedule.rt_prior
        elif name == "surgery_residual" and fit.sources[name] == "plan extent":
            nominal = fit.parameters.surgery_residual
            prior = Prior(nominal, max(BOUNDS[name][0], nominal / 2.0), min(1.0, nominal * 2.0), log=True)
        else:
            prior = PRIORS[name]
        out[name] = prior.draw(rng, n)
    return out


# ----------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------

_MARKER_COLOURS = {"surgery": "#7f3c8d", "radiotherapy": "#e68310", "chemotherapy": "#11a579"}


def plot_burden_forecast(boot: BurdenBootstrap, forecast_days, path, *, title: str = "", level: float = 0.90,
                         force: bool = False):
    """PNG of the measured volumes, the fitted curve, the bootstrap band and the treatment, written atomically.

    Volumes are on a log axis (exponential growth is a straight line).
    The band is the central ``level`` interval of the members on a dense day grid; forecast days are
    marked with their median and band. Radiotherapy (first to last fraction) and chemotherapy windows
    are shaded, surgeries are vertical lines. Uses Matplotlib's Agg canvas (no display, no global state).

    Returns the written path; raises :class:`~AnatomyDTLib.errors.OutputExistsError` if it exists and not ``force``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import atomic_output

    fit = boot.fit
    fd = np.atleast_1d(np.asarray(forecast_days, dtype=float))
    start = min(0.0, float(fit.days[0]))
    end = max(float(fit.days[-1]), float(fd.max()))
    grid = np.linspace(start, end + 0.03 * (end - start + 1.0), 400)
    dense = boot.band(grid, level)
    at = boot.band(fd, level)
    fig = Figure(figsize=(8.0, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    seen = set()
    for kind, a, b in fit.schedule.event_markers():
        label = kind if kind not in seen else None
        seen.add(kind)
        if kind == "surgery":
            ax.axvline(a, color=_MARKER_COLOURS[kind], lw=1.5, ls="--", label=label)
        else:
            ax.axvspan(a, b + 1.0, color=_MARKER_COLOURS[kind], alpha=0.12 if kind == "radiotherapy" else 0.08,
                       label=label, lw=0)
    ax.fill_between(grid, dense["lower"], dense["upper"], color="#3969ac", alpha=0.25, lw=0,
                    label=f"{level:.0%} bootstrap band ({boot.size} members)")
    ax.plot(grid, dense["fit"], color="#3969ac", lw=2, label=f"fit (R² = {fit.r2:.3f})")
    ax.errorbar(at["day"], at["median"], yerr=[at["median"] - at["lower"], at["upper"] - at["median"]], fmt="s",
                color="#1d3557", ms=5, capsize=4, label="forecast: median and band")
    ax.plot(fit.days, fit.volumes_ml, "o", color="#e73f74", ms=7, mec="black", label="measured", zorder=5)
    ax.set_xlabel("days from baseline")
    ax.set_ylabel("tumour volume (mL, log scale)")
    ax.set_yscale("log")  # exponential growth is a straight line; wide upper bands do not squash the data
    ax.set_xlim(grid[0], grid[-1])
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title or "Tumour burden forecast")
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.tight_layout()
    with atomic_output(path, force) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
