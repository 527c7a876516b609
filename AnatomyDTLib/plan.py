"""Treatment plans: surgery, radiotherapy and chemotherapy on a day axis.

A :class:`TreatmentPlan` is the single description of treatment used by the solver, the CLI
(``anatomydt simulate/predict --plan PLAN.json``) and the 3D Slicer module. It is read from a
JSON document (format version 1, documented in ``docs/plan.md`` and described formally by
:data:`PLAN_JSON_SCHEMA`) by :func:`load_plan`.

Units used throughout:

* days: days from the baseline scan (day 0); floats allowed;
* doses: Gy; LQ ``alpha``: 1/Gy; LQ ``beta``: 1/Gy^2;
* rates: 1/day.

Timing convention: an event on day ``d`` acts at the start of day ``d``, after that day's scan,
so the state reported "at day d" is the state *before* that day's treatment. Events on or after
the simulation horizon are not simulated (:meth:`TreatmentPlan.events_after_horizon` lists them).

Everything that can be wrong in a user's plan raises :class:`~AnatomyDTLib.errors.PlanError`
listing *all* problems found, one per line, each prefixed by a JSON-path-like location
(``radiotherapy.dose_per_fraction_gy: must be > 0 Gy, got -2``).

This module is pure Python/NumPy: it does not read images. Paths to resection masks and dose
maps are resolved and checked for existence; :meth:`TreatmentPlan.with_loaded_arrays` replaces
them by arrays using a loader supplied by the caller (the I/O layer).
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import InputError, PlanError
from .schema import ClassSchema

__all__ = [
    "Surgery",
    "DelayedDeath",
    "HypoxicRadioresistance",
    "Radiotherapy",
    "Chemotherapy",
    "TreatmentPlan",
    "load_plan",
    "validate_plan_dict",
    "stupp_plan",
    "no_treatment_plan",
    "plan_summary",
    "weekly_fraction_days",
    "PLAN_JSON_SCHEMA",
    "PLAN_FORMAT_VERSION",
]

PLAN_FORMAT_VERSION = 1
"""The plan format version this module reads and writes."""

MAX_DOSE_PER_FRACTION_GY = 25.0
"""Plausibility limit for the dose of one fraction (Gy); larger values are rejected."""
MAX_TOTAL_DOSE_GY = 120.0
"""Plausibility limit for the total prescribed dose and any dose-map voxel (Gy)."""
MAX_ALPHA_PER_GY = 1.0
"""Plausibility limit for the LQ alpha (1/Gy)."""
DEFAULT_ALPHA_PER_GY = 0.05
"""Default LQ alpha (1/Gy)."""
DEFAULT_ALPHA_BETA_GY = 10.0
"""Default LQ alpha/beta ratio (Gy); 10 Gy is the usual value for gliomas."""
DEFAULT_FRACTIONS_PER_WEEK = 5
"""Default number of consecutive treatment days per 7-day week."""
ARRAY_PLACEHOLDER = "<array>"
"""What :meth:`TreatmentPlan.to_dict` writes for an in-memory array (it cannot round-trip)."""
TIME_TOLERANCE_DAYS = 1e-9
"""Two times closer than this (days) are the same time in :meth:`TreatmentPlan.chemo_kill_rate`."""

_LN2 = math.log(2.0)

_TOP_KEYS = ("version", "surgery", "radiotherapy", "chemotherapy")
_SURGERY_KEYS = ("day", "resection_mask", "extent", "removed_to")
_RT_KEYS = (
    "start_day", "fractions", "dose_per_fraction_gy", "total_dose_gy", "fractions_per_week",
    "fraction_days", "dose_map", "alpha_per_gy", "alpha_beta_gy", "delayed_death", "hypoxia",
)
_DELAYED_DEATH_KEYS = ("delay_days", "clearance_half_life_days")
_HYPOXIA_KEYS = ("oxygen_enhancement_ratio", "dense_from", "dense_to")
MAX_OXYGEN_ENHANCEMENT_RATIO = 4.0  # fully anoxic cells: 2.5-3.5 in the radiobiology literature
_CYCLE_KEYS = ("start_day", "cycles", "days_on", "cycle_length_days")
_CHEMO_KEYS = ("agent", "kill_rate_per_day", "windows") + _CYCLE_KEYS
_AGENT_ABBREVIATIONS = {"temozolomide": "TMZ"}


# ----------------------------------------------------------------------------------------------
# Data classes
# ----------------------------------------------------------------------------------------------

def _values_equal(a: Any, b: Any) -> bool:
    """Equality that also works for numpy arrays (same shape, dtype and values)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                and a.dtype == b.dtype and bool(np.array_equal(a, b)))
    return a == b


class _ArrayAwareEq:
    """Mixin: dataclass equality field by field, comparing array fields by value."""

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_values_equal(getattr(self, f.name), getattr(other, f.name))
                   for f in fields(self) if f.compare)

    __hash__ = None  # arrays are unhashable, so are objects holding them


def _array_or_path_to_json(value: "np.ndarray | str | None") -> str | None:
    """How an array-or-path field is written by ``to_dict``."""
    if isinstance(value, np.ndarray):
        return ARRAY_PLACEHOLDER
    return value


def _tidy(x: float) -> float:
    """Round a derived float to 12 significant digits so that 10.000000000000002 is written as 10."""
    return float(f"{x:.12g}")


@dataclass(frozen=True, eq=False)
class Surgery(_ArrayAwareEq):
    """One resection.

    Attributes:
        day: day of surgery (days from baseline, >= 0). It acts at the start of that day.
        resection_mask: the voxels removed: a boolean array on the field grid, or the absolute
            path of a mask file not loaded yet (see :meth:`TreatmentPlan.with_loaded_arrays`).
            ``None`` when ``extent`` is used.
        extent: fraction (0 < extent <= 1, dimensionless) of the tumour mass removed from the
            tumour core outward; ``None`` when ``resection_mask`` is used.
        removed_to: class name receiving the removed tumour probability; ``None`` means the
            schema's ``removed_tumour_class``.
    """

    day: float
    resection_mask: "np.ndarray | str | None" = None
    extent: float | None = None
    removed_to: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "day", float(self.day))
        if self.extent is not None:
            object.__setattr__(self, "extent", float(self.extent))

    def to_dict(self) -> dict:
        """This surgery as a JSON-ready dict (an in-memory mask is written as ``"<array>"``)."""
        d: dict = {"day": self.day}
        if self.resection_mask is not None:
            d["resection_mask"] = _array_or_path_to_json(self.resection_mask)
        if self.extent is not None:
            d["extent"] = self.extent
        if self.removed_to is not None:
            d["removed_to"] = self.removed_to
        return d


@dataclass(frozen=True)
class DelayedDeath:
    """Delayed death of lethally irradiated cells (the "dying compartment").

    Cells killed by a fraction on day ``d`` stay visible as tumour until ``d + delay_days`` and are
    then cleared exponentially at ``clearance_rate_per_day``.

    Attributes:
        delay_days: days (>= 0) between a fraction and the start of clearance of its kills.
        clearance_rate_per_day: exponential clearance rate (1/day) = ln 2 / half-life (days).
    """

    delay_days: float
    clearance_rate_per_day: float

    @property
    def clearance_half_life_days(self) -> float:
        """Clearance half-life in days (ln 2 / clearance rate)."""
        return _LN2 / self.clearance_rate_per_day

    def to_dict(self) -> dict:
        """JSON-ready dict in the file format (half-life, not rate)."""
        return {"delay_days": float(self.delay_days),
                "clearance_half_life_days": _tidy(self.clearance_half_life_days)}


@dataclass(frozen=True)
class HypoxicRadioresistance:
    """Hypoxic radioresistance: densely packed tumour is short of oxygen and needs more dose.

    Each fraction's dose is divided by the oxygen enhancement ratio OER(ρ) before the LQ survival
    is applied, where ρ is the voxel's tumour share (living + dying cells, 0..1) at the fraction:
    OER = 1 + (OER_max − 1)·smoothstep(ρ; ``dense_from``, ``dense_to``) — 1 (well oxygenated)
    where the tumour share is below ``dense_from``, ``oxygen_enhancement_ratio`` where it is above
    ``dense_to``. So a dense lesion responds slowly until it thins out and re-oxygenates.

    Attributes:
        oxygen_enhancement_ratio: OER_max (dimensionless, 1..4; 1 switches the effect off).
        dense_from: tumour share (0..1) from which cells become hypoxic.
        dense_to: tumour share (> dense_from, <= 1) from which they are fully hypoxic.
    """

    oxygen_enhancement_ratio: float
    dense_from: float = 0.6
    dense_to: float = 0.95

    def to_dict(self) -> dict:
        """JSON-ready dict in the file format."""
        return {"oxygen_enhancement_ratio": float(self.oxygen_enhancement_ratio),
                "dense_from": float(self.dense_from), "dense_to": float(self.dense_to)}


@dataclass(frozen=True, eq=False)
class Radiotherapy(_ArrayAwareEq):
    """A fractionated radiotherapy course with linear-quadratic (LQ) cell kill.

    Attributes:
        fraction_days: sorted days (from baseline) of the fractions, one entry per fraction;
            a day listed twice receives two fractions.
        dose_per_fraction_gy: prescription dose per fraction (Gy).
        dose_map: TOTAL planned dose per voxel (Gy) over the whole course, as an array on the field
            grid or the absolute path of a file not loaded yet; ``None`` means the prescription dose
            is delivered uniformly (to the tumour).
        alpha_per_gy: LQ alpha (1/Gy).
        beta_per_gy2: LQ beta (1/Gy^2) = alpha / (alpha/beta ratio).
        delayed_death: delayed clearance of killed cells, or ``None`` for immediate removal.
        hypoxia: hypoxic radioresistance of dense tumour, or ``None`` (every cell oxygenated).
    """

    fraction_days: tuple[float, ...]
    dose_per_fraction_gy: float
    dose_map: "np.ndarray | str | None" = None
    alpha_per_gy: float = DEFAULT_ALPHA_PER_GY
    beta_per_gy2: float = DEFAULT_ALPHA_PER_GY / DEFAULT_ALPHA_BETA_GY
    delayed_death: DelayedDeath | None = None
    hypoxia: HypoxicRadioresistance | None = None

    def __post_init__(self):
        object.__setattr__(self, "fraction_days", tuple(sorted(float(d) for d in self.fraction_days)))

    @property
    def n_fractions(self) -> int:
        """Number of fractions."""
        return len(self.fraction_days)

    @property
    def total_dose_gy(self) -> float:
        """Total prescription dose (Gy) = dose per fraction x number of fractions."""
        return self.dose_per_fraction_gy * self.n_fractions

    @property
    def alpha_beta_gy(self) -> float:
        """LQ alpha/beta ratio (Gy)."""
        return self.alpha_per_gy / self.beta_per_gy2 if self.beta_per_gy2 > 0 else math.inf

    def dose_per_fraction_field(self) -> "float | np.ndarray":
        """Dose delivered by one fraction (Gy): ``dose_map / n_fractions`` per voxel if a dose map
        is loaded, else the scalar prescription ``dose_per_fraction_gy``.

        Raises:
            ValueError: the plan names a dose-map file that has not been loaded yet (using the
                prescription instead would silently ignore the map).
        """
        if self.dose_map is None:
            return self.dose_per_fraction_gy
        if isinstance(self.dose_map, np.ndarray):
            return self.dose_map / float(self.n_fractions)
        raise ValueError(
            f"The dose map {self.dose_map} has not been loaded; call TreatmentPlan.with_loaded_arrays() "
            "with an image loader before asking for the per-voxel dose."
        )

    def survival_fraction(self, dose_gy):
        """LQ surviving fraction ``exp(-alpha d - beta d^2)`` (dimensionless) after one dose ``d``.

        Args:
            dose_gy: dose of one fraction in Gy (>= 0): a number, a numpy array, or a torch tensor
                (a tensor is returned for a tensor input).

        Returns:
            A float for a scalar input, otherwise an array (or tensor) of the input's shape.
        """
        a, b = self.alpha_per_gy, self.beta_per_gy2
        if type(dose_gy).__module__.split(".")[0] == "torch":
            return (-(a * dose_gy + b * dose_gy * dose_gy)).exp()
        d = np.asarray(dose_gy, dtype=float)
        s = np.exp(-a * d - b * d * d)
        return float(s) if s.ndim == 0 else s

    def to_dict(self) -> dict:
        """JSON-ready dict using the explicit ``fraction_days`` form (a map array -> ``"<array>"``)."""
        if not self.beta_per_gy2 > 0:
            raise ValueError("Cannot write a radiotherapy plan with beta <= 0: the format stores alpha/beta.")
        d: dict = {
            "fraction_days": list(self.fraction_days),
            "fractions": self.n_fractions,
            "dose_per_fraction_gy": float(self.dose_per_fraction_gy),
            "alpha_per_gy": float(self.alpha_per_gy),
            "alpha_beta_gy": _tidy(self.alpha_beta_gy),
        }
        if self.dose_map is not None:
            d["dose_map"] = _array_or_path_to_json(self.dose_map)
        if self.delayed_death is not None:
            d["delayed_death"] = self.delayed_death.to_dict()
        if self.hypoxia is not None:
            d["hypoxia"] = self.hypoxia.to_dict()
        return d


@dataclass(frozen=True)
class Chemotherapy:
    """One chemotherapy agent with a constant kill rate while exposed.

    Attributes:
        agent: drug name (free text, e.g. ``"temozolomide"``).
        kill_rate_per_day: tumour kill rate (1/day, >= 0) while a window is active.
        windows: sorted, non-overlapping ``[start, end)`` exposure windows in days.
    """

    agent: str
    kill_rate_per_day: float
    windows: tuple[tuple[float, float], ...]

    def __post_init__(self):
        object.__setattr__(self, "kill_rate_per_day", float(self.kill_rate_per_day))
        object.__setattr__(self, "windows", tuple(sorted((float(s), float(e)) for s, e in self.windows)))

    def to_dict(self) -> dict:
        """JSON-ready dict using the explicit ``windows`` form."""
        return {"agent": self.agent, "kill_rate_per_day": self.kill_rate_per_day,
                "windows": [[s, e] for s, e in self.windows]}


@dataclass(frozen=True)
class TreatmentPlan:
    """All treatment of one simulation; an empty plan is the natural history.

    Attributes:
        surgeries: resections, sorted by day.
        radiotherapy: the radiotherapy course, or ``None``.
        chemotherapy: chemotherapy agents (their kill rates add up when windows overlap).
        source: where the plan came from (file path or description), for messages; not compared.
    """

    surgeries: tuple[Surgery, ...] = ()
    radiotherapy: Radiotherapy | None = None
    chemotherapy: tuple[Chemotherapy, ...] = ()
    source: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "surgeries", tuple(sorted(self.surgeries, key=lambda s: s.day)))
        object.__setattr__(self, "chemotherapy", tuple(self.chemotherapy))

    def is_empty(self) -> bool:
        """True if the plan has no surgery, no radiotherapy and no chemotherapy."""
        return not self.surgeries and self.radiotherapy is None and not self.chemotherapy

    def breakpoints(self, horizon_days: float) -> list[float]:
        """Sorted unique days in ``[0, horizon_days)`` at which something starts, stops or happens.

        These are surgery days, fraction days, ``fraction day + delay_days`` when delayed death is
        on, and chemotherapy window starts and ends. The solver must not step across them.
        """
        points: set[float] = {s.day for s in self.surgeries}
        rt = self.radiotherapy
        if rt is not None:
            points.update(rt.fraction_days)
            if rt.delayed_death is not None:
                points.update(d + rt.delayed_death.delay_days for d in rt.fraction_days)
        for chemo in self.chemotherapy:
            for start, end in chemo.windows:
                points.update((start, end))
        return sorted(t for t in points if 0.0 <= t < horizon_days)

    def chemo_kill_rate(self, t0: float, t1: float) -> float:
        """Total chemotherapy kill rate (1/day) of all agents active on ``[t0, t1)`` (days).

        Times within :data:`TIME_TOLERANCE_DAYS` of a window edge count as on the edge.

        Raises:
            ValueError: ``t1 < t0``, or a window starts or ends strictly inside ``(t0, t1)``; the
                solver splits its steps at :meth:`breakpoints`, so this is a bug in the caller.
        """
        if t1 < t0:
            raise ValueError(f"chemo_kill_rate needs t0 <= t1, got [{t0}, {t1}).")
        probe = 0.5 * (t0 + t1)
        total = 0.0
        for chemo in self.chemotherapy:
            for start, end in chemo.windows:
                _check_no_edge_inside(chemo.agent, start, end, t0, t1)
                if start - TIME_TOLERANCE_DAYS <= probe < end - TIME_TOLERANCE_DAYS:
                    total += chemo.kill_rate_per_day
        return total

    def events_after_horizon(self, horizon_days: float) -> list[str]:
        """Human-readable notes on planned treatment that falls on or after ``horizon_days``.

        E.g. ``"12 of 30 radiotherapy fractions fall on or after day 60 and are not simulated"``.
        An empty list means everything in the plan is simulated.
        """
        h = horizon_days
        notes = [f"Surgery on day {_fmt(s.day)} falls on or after day {_fmt(h)} and is not simulated"
                 for s in self.surgeries if s.day >= h]
        if self.radiotherapy is not None:
            notes += _rt_notes_after(self.radiotherapy, h)
        for chemo in self.chemotherapy:
            notes += _chemo_notes_after(chemo, h)
        return notes

    def with_loaded_arrays(self, loader: Callable[[str, str], np.ndarray], *,
                           grid_shape: Sequence[int] | None = None) -> "TreatmentPlan":
        """A copy of the plan with every mask/dose-map path replaced by the loaded array.

        Args:
            loader: ``loader(path, kind)`` returns the image at ``path`` resampled on the field
                grid, with ``kind`` either ``"resection_mask"`` or ``"dose_map"``.
            grid_shape: if given, every array (loaded or already present) must have this shape.

        Raises:
            PlanError: an array is unusable (empty mask, negative/non-finite dose, dose above
                :data:`MAX_TOTAL_DOSE_GY`, wrong shape); all problems are listed.
        """
        problems = _Problems()
        surgeries = tuple(_load_surgery_mask(problems, f"surgery[{i}].resection_mask", s, loader, grid_shape)
                          for i, s in enumerate(self.surgeries))
        rt = self.radiotherapy
        if rt is not None and rt.dose_map is not None:
            rt = replace(rt, dose_map=_load_dose_map(problems, "radiotherapy.dose_map", rt.dose_map,
                                                     loader, grid_shape))
        problems.raise_if_any(self.source)
        return replace(self, surgeries=surgeries, radiotherapy=rt)

    def map_arrays(self, transform: Callable[[np.ndarray, str], np.ndarray]) -> "TreatmentPlan":
        """A copy with every loaded array replaced by ``transform(array, kind)``.

        ``kind`` is ``"resection_mask"`` or ``"dose_map"``. Arrays not loaded yet (file paths) and
        absent ones are kept as they are. The one place that walks a plan's arrays for crops,
        resampling and pooling (:func:`crop_plan`, ``models.model_grid.resize_plan``, ...).
        """
        surgeries = tuple(replace(s, resection_mask=transform(s.resection_mask, "resection_mask"))
                          if isinstance(s.resection_mask, np.ndarray) else s for s in self.surgeries)
        rt = self.radiotherapy
        if rt is not None and isinstance(rt.dose_map, np.ndarray):
            rt = replace(rt, dose_map=transform(rt.dose_map, "dose_map"))
        return replace(self, surgeries=surgeries, radiotherapy=rt)

    def to_dict(self) -> dict:
        """The plan as a JSON-serialisable dict in the file format (version 1).

        ``load_plan(plan.to_dict()) == plan`` holds, except that in-memory arrays (masks, dose maps)
        are written as the string ``"<array>"``, which :func:`load_plan` rejects: save such arrays
        to files and reference their paths instead. Radiotherapy is written with explicit
        ``fraction_days`` and chemotherapy with explicit ``windows``.
        """
        d: dict = {"version": PLAN_FORMAT_VERSION}
        if self.surgeries:
            d["surgery"] = [s.to_dict() for s in self.surgeries]
        if self.radiotherapy is not None:
            d["radiotherapy"] = self.radiotherapy.to_dict()
        if self.chemotherapy:
            d["chemotherapy"] = [c.to_dict() for c in self.chemotherapy]
        return d


def _check_no_edge_inside(agent: str, start: float, end: float, t0: float, t1: float) -> None:
    """Raise ValueError if ``start`` or ``end`` lies strictly inside ``(t0, t1)`` (with tolerance)."""
    for edge in (start, end):
        if t0 + TIME_TOLERANCE_DAYS < edge < t1 - TIME_TOLERANCE_DAYS:
            raise ValueError(
                f"The {agent} window [{_fmt(start)}, {_fmt(end)}) has an edge at day {_fmt(edge)} strictly "
                f"inside the step [{t0}, {t1}); the solver must split its steps at TreatmentPlan.breakpoints()."
            )


def _rt_notes_after(rt: Radiotherapy, h: float) -> list[str]:
    """Horizon notes for radiotherapy: fractions and delayed clearance that are cut off."""
    notes = []
    late = sum(d >= h for d in rt.fraction_days)
    if late:
        notes.append(f"{late} of {rt.n_fractions} radiotherapy fractions fall on or after day {_fmt(h)} "
                     "and are not simulated")
    if rt.delayed_death is not None:
        delay = rt.delayed_death.delay_days
        pending = sum(d < h <= d + delay for d in rt.fraction_days)
        if pending:
            notes.append(f"cells killed by {pending} radiotherapy fraction(s) start being cleared "
                         f"({_fmt(delay)} days after their fraction) on or after day {_fmt(h)}, so they "
                         "are still shown as tumour at the horizon")
    return notes


def _chemo_notes_after(chemo: Chemotherapy, h: float) -> list[str]:
    """Horizon notes for one chemotherapy agent: windows that are skipped or cut."""
    notes = []
    late = sum(s >= h for s, _ in chemo.windows)
    if late:
        notes.append(f"{late} of {len(chemo.windows)} {chemo.agent} exposure windows start on or after "
                     f"day {_fmt(h)} and are not simulated")
    for s, e in chemo.windows:
        if s < h < e:
            notes.append(f"the {chemo.agent} window [{_fmt(s)}, {_fmt(e)}) is cut at day {_fmt(h)}")
    return notes


# ----------------------------------------------------------------------------------------------
# Loading arrays
# ----------------------------------------------------------------------------------------------

def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view of ``a`` (plans are immutable)."""
    v = a.view()
    v.flags.writeable = False
    return v


def _check_shape(problems: "_Problems", loc: str, a: np.ndarray, grid_shape) -> bool:
    """Record a problem if ``a`` does not have ``grid_shape``; True if fine."""
    if grid_shape is not None and tuple(a.shape) != tuple(grid_shape):
        problems.add(loc, f"has shape {tuple(a.shape)} but the field grid is {tuple(grid_shape)}; "
                          "resample it onto the baseline image grid")
        return False
    return True


def _load_surgery_mask(problems, loc, s: Surgery, loader, grid_shape) -> Surgery:
    """The surgery with its mask loaded (if it was a path) and checked."""
    if s.resection_mask is None:
        return s
    mask = s.resection_mask
    if isinstance(mask, str):
        mask = np.asarray(loader(mask, "resection_mask")) != 0
    if not _check_shape(problems, loc, mask, grid_shape):
        return s
    _check_mask_array(problems, loc, mask)
    return replace(s, resection_mask=_read_only(mask))


def _load_dose_map(problems, loc, dose_map, loader, grid_shape):
    """The dose map loaded (if it was a path) as float64 and checked."""
    if isinstance(dose_map, str):
        dose_map = np.asarray(loader(dose_map, "dose_map"), dtype=float)
    if _check_shape(problems, loc, dose_map, grid_shape):
        _check_dose_array(problems, loc, dose_map)
    return _read_only(dose_map)


def _check_mask_array(problems, loc, mask) -> None:
    """A resection mask must be a non-empty boolean array."""
    if mask.dtype != np.bool_:
        problems.add(loc, f"must be a boolean array, got dtype {mask.dtype}; pass e.g. mask > 0")
    elif not mask.any():
        problems.add(loc, "the resection mask is empty (no voxel set), so the surgery would remove nothing")


def _check_dose_array(problems, loc, dose) -> None:
    """A dose map must be finite, non-negative and at most MAX_TOTAL_DOSE_GY (Gy)."""
    if not np.issubdtype(dose.dtype, np.number) or dose.dtype == np.bool_:
        problems.add(loc, f"must be a numeric array of doses in Gy, got dtype {dose.dtype}")
        return
    if dose.size == 0 or not np.all(np.isfinite(dose)):
        problems.add(loc, "must contain only finite doses (no NaN or infinity) and at least one voxel")
        return
    lo, hi = float(dose.min()), float(dose.max())
    if lo < 0:
        problems.add(loc, f"has negative doses (minimum {lo:g} Gy); doses must be >= 0 Gy")
    if hi > MAX_TOTAL_DOSE_GY:
        hint = " (it looks like cGy: divide by 100)" if hi > 100 * 20 else ""
        problems.add(loc, f"maximum {hi:g} Gy exceeds the plausibility limit of {MAX_TOTAL_DOSE_GY:g} Gy "
                          f"for a TOTAL dose map{hint}")


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------

class _Problems:
    """Collects validation problems as ``"location: message"`` lines."""

    def __init__(self):
        self.items: list[str] = []

    def add(self, loc: str, message: str) -> None:
        """Record one problem at JSON-path-like location ``loc`` (empty for the whole plan)."""
        self.items.append(f"{loc}: {message}" if loc else message)

    def raise_if_any(self, source: str = "") -> None:
        """Raise a PlanError listing every problem, one per line, if there are any."""
        if not self.items:
            return
        where = f" {source}" if source else ""
        n = len(self.items)
        header = f"Invalid treatment plan{where} ({n} problem{'s' if n > 1 else ''}):"
        err = PlanError("\n".join([header] + [f"  {p}" for p in self.items]))
        err.problems = list(self.items)
        raise err


@dataclass
class _Context:
    """What parsing needs besides the dict: class schema, base directory, file checks."""

    schema: ClassSchema | None = None
    base_dir: str | None = None
    check_files: bool = False


def _join(loc: str, key: str | int) -> str:
    """Child location: ``a.b`` for keys, ``a[0]`` for indices."""
    if isinstance(key, int):
        return f"{loc}[{key}]"
    return f"{loc}.{key}" if loc else key


def _fmt(x: float) -> str:
    """Compact number for messages: 28 rather than 28.0, 28.5 stays 28.5."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x) if isinstance(x, float) else str(x)


def _type_name(v: Any) -> str:
    """JSON-ish name of a Python value's type, for messages."""
    if v is None:
        return "null"
    if isinstance(v, (bool, np.bool_)):
        return "boolean"
    if isinstance(v, str):
        return f"string {v!r}"
    if isinstance(v, numbers.Real):
        return f"number {v!r}"
    if isinstance(v, Mapping):
        return "object"
    if isinstance(v, (list, tuple)):
        return "array"
    return type(v).__name__


def _is_number(v: Any) -> bool:
    """True for int/float (and numpy numbers), false for booleans."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _check_keys(problems: _Problems, loc: str, d: Mapping, allowed: Sequence[str]) -> None:
    """Record one problem per key of ``d`` not in ``allowed``, listing the allowed keys."""
    for key in d:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        where = f"in {loc}" if loc else "at the top level"
        problems.add(_join(loc, str(key)),
                     f"unknown key {key!r} {where}; allowed keys are: {', '.join(allowed)}{hint}")


def _number(problems, loc, v, unit, *, lo=None, lo_open=False, hi=None, what="") -> float | None:
    """Validate a finite number with optional bounds; return it as float or None if invalid.

    ``lo``/``lo_open`` give the lower bound (``> lo`` if open, else ``>= lo``); ``hi`` is a
    plausibility limit reported as such, qualified by ``what`` (e.g. " per fraction"). ``unit`` is
    appended to numbers in messages.
    """
    u = f" {unit}" if unit else ""
    if not _is_number(v):
        problems.add(loc, f"must be a number{u and ' (' + unit + ')'}, got {_type_name(v)}")
        return None
    x = float(v)
    if not math.isfinite(x):
        problems.add(loc, f"must be a finite number, got {v!r}")
        return None
    if lo is not None and (x <= lo if lo_open else x < lo):
        problems.add(loc, f"must be {'>' if lo_open else '>='} {_fmt(float(lo))}{u}, got {v!r}")
        return None
    if hi is not None and x > hi:
        problems.add(loc, f"{v!r}{u} exceeds the plausibility limit of {_fmt(float(hi))}{u}{what}")
        return None
    return x


def _integer(problems, loc, v, *, lo, hi=None, what="") -> int | None:
    """Validate an integer (integral floats such as 30.0 accepted) within ``[lo, hi]``."""
    if not _is_number(v):
        problems.add(loc, f"must be an integer{what}, got {_type_name(v)}")
        return None
    if not float(v).is_integer():
        problems.add(loc, f"must be an integer{what}, got {v!r}")
        return None
    n = int(v)
    if n < lo or (hi is not None and n > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        problems.add(loc, f"must be {rng}{what}, got {v!r}")
        return None
    return n


def _optional(d: Mapping, key: str, default: Any) -> Any:
    """``d[key]`` if present, else ``default``."""
    return d[key] if key in d else default


def _require(problems, loc, d: Mapping, key: str, hint: str = "") -> bool:
    """True if ``key`` is in ``d``; else record a 'missing' problem."""
    if key in d:
        return True
    problems.add(_join(loc, key), f"is required{hint}")
    return False


def _object(problems, loc, v, what: str) -> bool:
    """True if ``v`` is a JSON object; else record a type problem."""
    if isinstance(v, Mapping):
        return True
    problems.add(loc, f"must be an object ({what}), got {_type_name(v)}")
    return False


def _list(problems, loc, v, what: str) -> bool:
    """True if ``v`` is a JSON array; else record a type problem."""
    if isinstance(v, (list, tuple)):
        return True
    hint = "; wrap a single entry in [ ]" if isinstance(v, Mapping) else ""
    problems.add(loc, f"must be an array of {what}, got {_type_name(v)}{hint}")
    return False


def _resolve_path(ctx: _Context, problems, loc, p: str, what: str) -> str | None:
    """Absolute path of a file referenced by the plan; checks existence if asked."""
    if p == ARRAY_PLACEHOLDER:
        problems.add(loc, f"{ARRAY_PLACEHOLDER!r} is the placeholder TreatmentPlan.to_dict() writes for an "
                          "in-memory array, which cannot round-trip through JSON; save the array to a file "
                          "and give its path")
        return None
    base = ctx.base_dir if ctx.base_dir is not None else os.getcwd()
    path = os.path.abspath(os.path.join(base, os.path.expanduser(p)))
    if ctx.check_files and not os.path.isfile(path):
        problems.add(loc, f"{what} file not found: {path} (relative paths are resolved against {base})")
    return path


# ----------------------------------------------------------------------------------------------
# Parsing sections
# ----------------------------------------------------------------------------------------------

def _parse_mask(ctx, problems, loc, v):
    """A resection mask: a file path (resolved) or a boolean numpy array."""
    if isinstance(v, str) and v.strip():
        return _resolve_path(ctx, problems, loc, v, "resection mask")
    if isinstance(v, np.ndarray):
        n_before = len(problems.items)
        _check_mask_array(problems, loc, v)
        return _read_only(v) if len(problems.items) == n_before else None
    problems.add(loc, f"must be a file path (string) or, from Python, a boolean numpy array; got {_type_name(v)}")
    return None


def _parse_removed_to(ctx, problems, loc, v) -> str | None:
    """A class name; checked against the schema (and made canonical) when one is given."""
    if not isinstance(v, str) or not v.strip():
        problems.add(loc, f"must be a class name (string), got {_type_name(v)}")
        return None
    if ctx.schema is None:
        return v
    try:
        name = ctx.schema.names[ctx.schema.index(v)]
    except InputError:
        problems.add(loc, f"unknown class {v!r}; the classes of this model are {list(ctx.schema.names)}")
        return None
    if name == ctx.schema.tumour:
        problems.add(loc, f"cannot be the tumour class {name!r} itself; name the class that fills the cavity")
        return None
    return name


def _parse_surgery(ctx, problems, loc, s) -> Surgery | None:
    """One surgery entry."""
    if not _object(problems, loc, s, "a surgery"):
        return None
    _check_keys(problems, loc, s, _SURGERY_KEYS)
    day = None
    if _require(problems, loc, s, "day", " (day of surgery, days from baseline)"):
        day = _number(problems, _join(loc, "day"), s["day"], "days", lo=0)
    has_mask, has_extent = "resection_mask" in s, "extent" in s
    mask = extent = None
    if has_mask == has_extent:
        which = "both were given" if has_mask else "neither was given"
        problems.add(loc, f"give exactly one of resection_mask (a mask file) and extent (fraction of the "
                          f"tumour removed); {which}")
    elif has_mask:
        mask = _parse_mask(ctx, problems, _join(loc, "resection_mask"), s["resection_mask"])
    else:
        extent = _number(problems, _join(loc, "extent"), s["extent"], "")
        if extent is not None and not 0 < extent <= 1:
            problems.add(_join(loc, "extent"), f"must be in (0, 1] (fraction of the tumour mass removed), "
                                               f"got {s['extent']!r}")
            extent = None
    removed_to = None
    if "removed_to" in s:
        removed_to = _parse_removed_to(ctx, problems, _join(loc, "removed_to"), s["removed_to"])
    if day is None or (mask is None and extent is None):
        return None
    return Surgery(day=day, resection_mask=mask, extent=extent, removed_to=removed_to)


def weekly_fraction_days(start_day: float, fractions: int,
                         fractions_per_week: int = DEFAULT_FRACTIONS_PER_WEEK) -> tuple[float, ...]:
    """Fraction days (days from baseline) for ``fractions_per_week`` consecutive treatment days then
    a ``7 - fractions_per_week``-day gap, repeated from ``start_day``.

    Example: ``weekly_fraction_days(28, 7)`` -> ``(28, 29, 30, 31, 32, 35, 36)``.
    """
    per_week = int(fractions_per_week)
    return tuple(float(start_day) + 7.0 * (i // per_week) + (i % per_week) for i in range(int(fractions)))


def _parse_day_list(problems, loc, v) -> tuple[float, ...] | None:
    """A non-empty list of days (>= 0)."""
    if not _list(problems, loc, v, "days (numbers)"):
        return None
    if len(v) == 0:
        problems.add(loc, "must list at least one fraction day")
        return None
    days = [_number(problems, _join(loc, i), d, "days", lo=0) for i, d in enumerate(v)]
    return None if any(d is None for d in days) else tuple(sorted(days))


def _parse_fraction_schedule(problems, loc, r) -> tuple[float, ...] | None:
    """Fraction days from either ``fraction_days`` or ``start_day`` + ``fractions`` (+ per week)."""
    if "fraction_days" in r:
        for key in ("start_day", "fractions_per_week"):
            if key in r:
                problems.add(_join(loc, key), "cannot be combined with fraction_days; give either an explicit "
                                              "fraction_days list or start_day (+ fractions_per_week)")
        days = _parse_day_list(problems, _join(loc, "fraction_days"), r["fraction_days"])
        if "fractions" in r:
            n = _integer(problems, _join(loc, "fractions"), r["fractions"], lo=1)
            if n is not None and days is not None and n != len(days):
                problems.add(_join(loc, "fractions"), f"is {n} but fraction_days lists {len(days)} days; "
                                                      "make them equal or omit fractions")
                return None
        return days
    start = n = None
    if _require(problems, loc, r, "start_day", " (or give an explicit fraction_days list)"):
        start = _number(problems, _join(loc, "start_day"), r["start_day"], "days", lo=0)
    if _require(problems, loc, r, "fractions", " (number of fractions)"):
        n = _integer(problems, _join(loc, "fractions"), r["fractions"], lo=1)
    per_week = _integer(problems, _join(loc, "fractions_per_week"),
                        _optional(r, "fractions_per_week", DEFAULT_FRACTIONS_PER_WEEK), lo=1, hi=7,
                        what=" (fractions per 7-day week)")
    if start is None or n is None or per_week is None:
        return None
    return weekly_fraction_days(start, n, per_week)


def _parse_dose_per_fraction(problems, loc, r, n: int | None) -> float | None:
    """Dose per fraction (Gy) from exactly one of ``dose_per_fraction_gy`` and ``total_dose_gy``."""
    has_dpf, has_total = "dose_per_fraction_gy" in r, "total_dose_gy" in r
    if has_dpf == has_total:
        which = "both were given" if has_dpf else "neither was given"
        problems.add(loc, f"give exactly one of dose_per_fraction_gy and total_dose_gy; {which}")
        return None
    if has_dpf:
        k = _join(loc, "dose_per_fraction_gy")
        dpf = _number(problems, k, r["dose_per_fraction_gy"], "Gy", lo=0, lo_open=True,
                      hi=MAX_DOSE_PER_FRACTION_GY, what=" per fraction")
        if dpf is not None and n is not None and dpf * n > MAX_TOTAL_DOSE_GY:
            problems.add(k, f"{_fmt(dpf)} Gy x {n} fractions = {_fmt(dpf * n)} Gy exceeds the plausibility "
                            f"limit of {_fmt(MAX_TOTAL_DOSE_GY)} Gy total dose")
            return None
        return dpf
    k = _join(loc, "total_dose_gy")
    total = _number(problems, k, r["total_dose_gy"], "Gy", lo=0, lo_open=True, hi=MAX_TOTAL_DOSE_GY,
                    what=" total dose")
    if total is None or n is None:
        return None
    if total / n > MAX_DOSE_PER_FRACTION_GY:
        problems.add(k, f"{_fmt(total)} Gy / {n} fractions = {_fmt(total / n)} Gy per fraction exceeds the "
                        f"plausibility limit of {_fmt(MAX_DOSE_PER_FRACTION_GY)} Gy per fraction")
        return None
    return total / n


def _parse_dose_map(ctx, problems, loc, v):
    """A TOTAL dose map: a file path (resolved) or a numeric numpy array in Gy."""
    if isinstance(v, str) and v.strip():
        return _resolve_path(ctx, problems, loc, v, "dose map")
    if isinstance(v, np.ndarray):
        n_before = len(problems.items)
        _check_dose_array(problems, loc, v)
        return _read_only(v) if len(problems.items) == n_before else None
    problems.add(loc, f"must be a file path (string) or, from Python, a numpy array in Gy; got {_type_name(v)}")
    return None


def _parse_delayed_death(problems, loc, v) -> DelayedDeath | None:
    """The delayed-death block: delay (days >= 0) and clearance half-life (days > 0)."""
    if not _object(problems, loc, v, "delay_days and clearance_half_life_days"):
        return None
    _check_keys(problems, loc, v, _DELAYED_DEATH_KEYS)
    delay = half_life = None
    if _require(problems, loc, v, "delay_days", " (days a killed cell stays visible)"):
        delay = _number(problems, _join(loc, "delay_days"), v["delay_days"], "days", lo=0)
    if _require(problems, loc, v, "clearance_half_life_days", " (half-life of the clearance, days)"):
        half_life = _number(problems, _join(loc, "clearance_half_life_days"), v["clearance_half_life_days"],
                            "days", lo=0, lo_open=True)
    if delay is None or half_life is None:
        return None
    return DelayedDeath(delay_days=delay, clearance_rate_per_day=_LN2 / half_life)


def _parse_hypoxia(problems, loc, v) -> HypoxicRadioresistance | None:
    """The hypoxia block: OER (1..4) and the tumour shares where it starts and ends rising."""
    if not _object(problems, loc, v, "oxygen_enhancement_ratio (and optionally dense_from, dense_to)"):
        return None
    _check_keys(problems, loc, v, _HYPOXIA_KEYS)
    oer = None
    if _require(problems, loc, v, "oxygen_enhancement_ratio", " (dose factor of fully hypoxic cells, 1..4)"):
        oer = _number(problems, _join(loc, "oxygen_enhancement_ratio"), v["oxygen_enhancement_ratio"], "", lo=1,
                      hi=MAX_OXYGEN_ENHANCEMENT_RATIO)
    lo = _number(problems, _join(loc, "dense_from"), _optional(v, "dense_from", 0.6), "(tumour share)", lo=0, hi=1)
    hi = _number(problems, _join(loc, "dense_to"), _optional(v, "dense_to", 0.95), "(tumour share)", lo=0, hi=1)
    if lo is not None and hi is not None and not lo < hi:
        problems.add(_join(loc, "dense_to"), f"must be greater than dense_from ({lo:g}), got {hi:g}")
        return None
    if None in (oer, lo, hi):
        return None
    return HypoxicRadioresistance(oxygen_enhancement_ratio=oer, dense_from=lo, dense_to=hi)


def _parse_radiotherapy(ctx, problems, loc, r) -> Radiotherapy | None:
    """The radiotherapy section."""
    if not _object(problems, loc, r, "a radiotherapy course"):
        return None
    _check_keys(problems, loc, r, _RT_KEYS)
    days = _parse_fraction_schedule(problems, loc, r)
    dpf = _parse_dose_per_fraction(problems, loc, r, None if days is None else len(days))
    dose_map = _parse_dose_map(ctx, problems, _join(loc, "dose_map"), r["dose_map"]) if "dose_map" in r else None
    alpha = _number(problems, _join(loc, "alpha_per_gy"), _optional(r, "alpha_per_gy", DEFAULT_ALPHA_PER_GY),
                    "/Gy", lo=0, lo_open=True, hi=MAX_ALPHA_PER_GY)
    ab = _number(problems, _join(loc, "alpha_beta_gy"), _optional(r, "alpha_beta_gy", DEFAULT_ALPHA_BETA_GY),
                 "Gy", lo=0, lo_open=True)
    dd = _parse_delayed_death(problems, _join(loc, "delayed_death"), r["delayed_death"]) \
        if "delayed_death" in r else None
    hypoxia = _parse_hypoxia(problems, _join(loc, "hypoxia"), r["hypoxia"]) if "hypoxia" in r else None
    if None in (days, dpf, alpha, ab) or ("dose_map" in r and dose_map is None) \
            or ("delayed_death" in r and dd is None) or ("hypoxia" in r and hypoxia is None):
        return None
    return Radiotherapy(fraction_days=days, dose_per_fraction_gy=dpf, dose_map=dose_map,
                        alpha_per_gy=alpha, beta_per_gy2=alpha / ab, delayed_death=dd, hypoxia=hypoxia)


def _parse_window(problems, loc, w) -> tuple[float, float] | None:
    """One ``[start, end)`` window in days, start >= 0 and start < end."""
    if not isinstance(w, (list, tuple)) or len(w) != 2:
        problems.add(loc, f"must be a [start_day, end_day] pair, got {_type_name(w)}")
        return None
    start = _number(problems, _join(loc, 0), w[0], "days", lo=0)
    end = _number(problems, _join(loc, 1), w[1], "days", lo=0)
    if start is None or end is None:
        return None
    if start >= end:
        problems.add(loc, f"start day {_fmt(start)} must be before end day {_fmt(end)} "
                          "(windows are [start, end) in days)")
        return None
    return start, end


def _check_no_overlap(problems, loc, windows: list[tuple[int, tuple[float, float]]]) -> bool:
    """Record a problem for each pair of overlapping windows (after sorting); True if none."""
    ok = True
    ordered = sorted(windows, key=lambda iw: iw[1])
    for (i, (s0, e0)), (j, (s1, e1)) in zip(ordered, ordered[1:]):
        if s1 < e0:
            problems.add(loc, f"windows[{i}] = [{_fmt(s0)}, {_fmt(e0)}) and windows[{j}] = [{_fmt(s1)}, {_fmt(e1)}) "
                              "overlap; merge them (windows of one agent must not overlap)")
            ok = False
    return ok


def _parse_windows(problems, loc, v) -> tuple[tuple[float, float], ...] | None:
    """A non-empty list of non-overlapping windows."""
    if not _list(problems, loc, v, "[start_day, end_day] pairs"):
        return None
    if len(v) == 0:
        problems.add(loc, "must list at least one [start_day, end_day] window")
        return None
    parsed = [(i, _parse_window(problems, _join(loc, i), w)) for i, w in enumerate(v)]
    valid = [(i, w) for i, w in parsed if w is not None]
    if not _check_no_overlap(problems, loc, valid) or len(valid) < len(parsed):
        return None
    return tuple(sorted(w for _, w in valid))


def _parse_cycles(problems, loc, c) -> tuple[tuple[float, float], ...] | None:
    """Windows from the cycle form: start_day, cycles, days_on, cycle_length_days."""
    missing = [k for k in _CYCLE_KEYS if k not in c]
    if missing:
        problems.add(loc, f"the cycle form needs {', '.join(_CYCLE_KEYS)}; missing: {', '.join(missing)}")
        return None
    start = _number(problems, _join(loc, "start_day"), c["start_day"], "days", lo=0)
    cycles = _integer(problems, _join(loc, "cycles"), c["cycles"], lo=1, what=" (number of cycles)")
    on = _number(problems, _join(loc, "days_on"), c["days_on"], "days", lo=1)
    length = _number(problems, _join(loc, "cycle_length_days"), c["cycle_length_days"], "days", lo=1)
    if None in (start, cycles, on, length):
        return None
    if length < on:
        problems.add(_join(loc, "cycle_length_days"), f"must be >= days_on ({_fmt(on)} days), got {_fmt(length)}")
        return None
    return tuple((start + k * length, start + k * length + on) for k in range(cycles))


def _parse_chemo(problems, loc, c) -> Chemotherapy | None:
    """One chemotherapy entry (agent, kill rate, and windows or cycle form)."""
    if not _object(problems, loc, c, "a chemotherapy agent"):
        return None
    _check_keys(problems, loc, c, _CHEMO_KEYS)
    agent = rate = windows = None
    if _require(problems, loc, c, "agent", " (drug name, e.g. \"temozolomide\")"):
        agent = c["agent"]
        if not isinstance(agent, str) or not agent.strip():
            problems.add(_join(loc, "agent"), f"must be a non-empty string, got {_type_name(agent)}")
            agent = None
    if _require(problems, loc, c, "kill_rate_per_day", " (tumour kill rate while exposed, 1/day)"):
        rate = _number(problems, _join(loc, "kill_rate_per_day"), c["kill_rate_per_day"], "/day", lo=0)
    cycle_keys = [k for k in _CYCLE_KEYS if k in c]
    if "windows" in c and cycle_keys:
        problems.add(loc, f"give either windows or the cycle form ({', '.join(_CYCLE_KEYS)}), not both; "
                          f"found windows and {', '.join(cycle_keys)}")
    elif "windows" in c:
        windows = _parse_windows(problems, _join(loc, "windows"), c["windows"])
    elif cycle_keys:
        windows = _parse_cycles(problems, loc, c)
    else:
        problems.add(loc, f"give the exposure as windows ([[start, end], ...]) or the cycle form "
                          f"({', '.join(_CYCLE_KEYS)})")
    if None in (agent, rate, windows):
        return None
    return Chemotherapy(agent=agent, kill_rate_per_day=rate, windows=windows)


def _parse_entries(problems, key: str, v, parse_one, what: str) -> tuple:
    """A top-level list section; ``null`` means absent."""
    if v is None or not _list(problems, key, v, what):
        return ()
    entries = [parse_one(problems, _join(key, i), e) for i, e in enumerate(v)]
    return tuple(e for e in entries if e is not None)


def _check_version(problems, d: Mapping) -> None:
    """``version`` is optional; if present it must be 1."""
    if "version" not in d:
        return
    v = d["version"]
    if not _is_number(v) or float(v) != PLAN_FORMAT_VERSION:
        problems.add("version", f"unsupported plan format version {v!r}; this AnatomyDT reads version "
                                f"{PLAN_FORMAT_VERSION}")


def _parse_plan(d: Any, ctx: _Context, source: str) -> tuple[TreatmentPlan | None, _Problems]:
    """Validate a plan dict and build the plan; returns (plan or None, problems)."""
    problems = _Problems()
    if not isinstance(d, Mapping):
        problems.add("", f"a treatment plan must be a JSON object {{...}}, got {_type_name(d)}")
        return None, problems
    _check_keys(problems, "", d, _TOP_KEYS)
    _check_version(problems, d)
    surgeries = _parse_entries(problems, "surgery", d.get("surgery"),
                               lambda p, loc, s: _parse_surgery(ctx, p, loc, s), "surgery objects")
    rt = None
    if d.get("radiotherapy") is not None:
        rt = _parse_radiotherapy(ctx, problems, "radiotherapy", d["radiotherapy"])
    chemo = _parse_entries(problems, "chemotherapy", d.get("chemotherapy"), _parse_chemo, "chemotherapy objects")
    if problems.items:
        return None, problems
    return TreatmentPlan(surgeries=surgeries, radiotherapy=rt, chemotherapy=chemo, source=source), problems


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def validate_plan_dict(d: dict, *, schema: ClassSchema | None = None) -> None:
    """Check a plan dict (format version 1) without loading anything.

    Referenced files are not checked for existence (:func:`load_plan` does that).

    Raises:
        PlanError: listing ALL problems found, one per line, each with a JSON-path-like location
            (e.g. ``radiotherapy.dose_per_fraction_gy: must be > 0 Gy, got -2``); the list is also
            available as ``err.problems``.
    """
    _, problems = _parse_plan(d, _Context(schema=schema), source="")
    problems.raise_if_any()


class _DuplicateKey(Exception):
    """Raised by the JSON object hook on a repeated key."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json ``object_pairs_hook`` rejecting repeated keys (JSON would silently keep the last)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _read_plan_json(path: Path) -> Any:
    """Parse a plan file; syntax errors name the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PlanError(f"Treatment plan file not found: {path}. Check the path (it is resolved against "
                        f"the current directory {os.getcwd()}).") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"Cannot read treatment plan {path}: {e}. Give a UTF-8 JSON text file.") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        hint = " JSON does not allow comments; remove them." if ("//" in text or "/*" in text) else \
            " Check for a missing comma, a trailing comma or an unquoted key."
        raise PlanError(f"Treatment plan {path} is not valid JSON: {e.msg} at line {e.lineno}, "
                        f"column {e.colno}.{hint}") from None
    except _DuplicateKey as e:
        raise PlanError(f"Treatment plan {path} is not valid: the key {e.args[0]!r} appears twice in the "
                        "same object; keep only one.") from None


def _check_plan_classes(plan: TreatmentPlan, schema: ClassSchema | None) -> TreatmentPlan:
    """Check (and make canonical) the ``removed_to`` class names of an existing plan."""
    if schema is None:
        return plan
    ctx, problems = _Context(schema=schema), _Problems()
    surgeries = []
    for i, s in enumerate(plan.surgeries):
        if s.removed_to is not None:
            s = replace(s, removed_to=_parse_removed_to(ctx, problems, f"surgery[{i}].removed_to", s.removed_to))
        surgeries.append(s)
    problems.raise_if_any(plan.source)
    return replace(plan, surgeries=tuple(surgeries))


def load_plan(plan: "str | os.PathLike | dict | TreatmentPlan | None", *, schema: ClassSchema | None = None,
              base_dir: "str | os.PathLike | None" = None) -> TreatmentPlan:
    """Read and validate a treatment plan.

    Args:
        plan: ``None`` (no treatment), a path to a JSON plan file, a plan dict (format version 1;
            from Python, ``resection_mask``/``dose_map`` may be numpy arrays), or a
            :class:`TreatmentPlan` (returned after the class check).
        schema: if given, ``removed_to`` class names are checked against it and made canonical.
        base_dir: directory against which relative file paths in the plan are resolved; default:
            the plan file's directory, or the current directory for a dict.

    Returns:
        The plan, with file paths made absolute (files are checked to exist but not loaded).

    Raises:
        PlanError: the file is missing or not valid JSON (with line and column), or the plan is
            invalid (all problems listed, one per line).
    """
    if plan is None:
        return no_treatment_plan()
    if isinstance(plan, TreatmentPlan):
        return _check_plan_classes(plan, schema)
    if isinstance(plan, Mapping):
        data, source, default_base = plan, "", os.getcwd()
    elif isinstance(plan, (str, os.PathLike)):
        path = Path(os.path.abspath(os.path.expanduser(os.fspath(plan))))
        data, source, default_base = _read_plan_json(path), str(path), str(path.parent)
    else:
        raise PlanError(f"A treatment plan must be a JSON file path, a dict or a TreatmentPlan, "
                        f"got {type(plan).__name__}.")
    base = os.fspath(base_dir) if base_dir is not None else default_base
    result, problems = _parse_plan(data, _Context(schema=schema, base_dir=base, check_files=True), source)
    problems.raise_if_any(source)
    return result


def no_treatment_plan() -> TreatmentPlan:
    """The empty plan: natural history, no treatment."""
    return TreatmentPlan(source="no treatment")


def stupp_plan(rt_start_day: float = 28.0, *, include_adjuvant: bool = True,
               tmz_kill_rate_per_day: float = 0.02, alpha_per_gy: float = DEFAULT_ALPHA_PER_GY,
               alpha_beta_gy: float = DEFAULT_ALPHA_BETA_GY) -> TreatmentPlan:
    """The standard Stupp protocol for glioblastoma.

    * Radiotherapy: 60 Gy in 30 x 2 Gy, Monday-Friday (5 on / 2 off) from ``rt_start_day`` (day).
    * Concurrent temozolomide daily from the first fraction to the day after the last one
      (window ``[first, last + 1)``), kill rate ``tmz_kill_rate_per_day`` (1/day).
    * If ``include_adjuvant``: after a 4-week break, 6 adjuvant cycles of days 1-5 every 28 days
      (first cycle starts on ``last + 1 + 28``), same kill rate.

    ``alpha_per_gy`` (1/Gy) and ``alpha_beta_gy`` (Gy) set the LQ model.
    """
    last_fraction = weekly_fraction_days(rt_start_day, 30, 5)[-1]
    concurrent_end = last_fraction + 1.0
    chemo = [{"agent": "temozolomide", "kill_rate_per_day": tmz_kill_rate_per_day,
              "windows": [[rt_start_day, concurrent_end]]}]
    if include_adjuvant:
        chemo.append({"agent": "temozolomide", "kill_rate_per_day": tmz_kill_rate_per_day,
                      "start_day": concurrent_end + 28.0, "cycles": 6, "days_on": 5, "cycle_length_days": 28})
    d = {"version": PLAN_FORMAT_VERSION,
         "radiotherapy": {"start_day": rt_start_day, "fractions": 30, "dose_per_fraction_gy": 2.0,
                          "fractions_per_week": 5, "alpha_per_gy": alpha_per_gy, "alpha_beta_gy": alpha_beta_gy},
         "chemotherapy": chemo}
    plan, problems = _parse_plan(d, _Context(), source=f"Stupp protocol from day {rt_start_day}")
    problems.raise_if_any("stupp_plan()")
    return plan


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------

def _fmt_days_span(first: float, last: float) -> str:
    """``days 28-67`` (or ``day 28``)."""
    return f"day {_fmt(first)}" if first == last else f"days {_fmt(first)}-{_fmt(last)}"


def _fmt_window(start: float, end: float) -> str:
    """A window as inclusive whole days (``28-67`` for [28, 68)) or as ``[28.5, 30)``."""
    if start.is_integer() and end.is_integer():
        return _fmt(start) if end - 1 <= start else f"{_fmt(start)}-{_fmt(end - 1)}"
    return f"[{_fmt(start)}, {_fmt(end)})"


def _surgery_summary(s: Surgery) -> str:
    """``Surgery on day 5 (extent 90%)``."""
    if s.extent is not None:
        how = f"extent {s.extent * 100:.3g}%"
    elif isinstance(s.resection_mask, str):
        how = f"resection mask {os.path.basename(s.resection_mask)}"
    else:
        how = "resection mask array"
    to = f", removed tumour to {s.removed_to}" if s.removed_to else ""
    return f"Surgery on day {_fmt(s.day)} ({how}{to})"


def _rt_summary(rt: Radiotherapy) -> str:
    """``RT 60.0 Gy in 30 fractions, days 28-67 (...)``."""
    days = rt.fraction_days
    details = [f"{rt.dose_per_fraction_gy:g} Gy per fraction",
               f"LQ alpha {rt.alpha_per_gy:g}/Gy, alpha/beta {rt.alpha_beta_gy:g} Gy"]
    if rt.dose_map is not None:
        name = os.path.basename(rt.dose_map) if isinstance(rt.dose_map, str) else "array"
        details.append(f"per-voxel dose from map {name}")
    if rt.delayed_death is not None:
        dd = rt.delayed_death
        details.append(f"killed cells cleared from {_fmt(dd.delay_days)} days after each fraction "
                       f"with half-life {dd.clearance_half_life_days:.3g} days")
    return (f"RT {rt.total_dose_gy:.1f} Gy in {rt.n_fractions} fractions, "
            f"{_fmt_days_span(days[0], days[-1])} ({'; '.join(details)})")


def _chemo_summary(c: Chemotherapy) -> str:
    """``TMZ 0.02/day on days 28-67`` or ``TMZ 0.02/day in 6 windows: days 96-100, ..., 236-240``."""
    name = _AGENT_ABBREVIATIONS.get(c.agent.strip().lower(), c.agent)
    shown = [_fmt_window(s, e) for s, e in c.windows]
    if len(shown) > 4:
        shown = shown[:2] + ["...", shown[-1]]
    if len(c.windows) == 1:
        return f"{name} {c.kill_rate_per_day:g}/day on days {shown[0]}"
    return f"{name} {c.kill_rate_per_day:g}/day in {len(c.windows)} windows: days {', '.join(shown)}"


def plan_summary(plan: TreatmentPlan) -> str:
    """One-paragraph human summary, e.g. ``"Surgery on day 5 (extent 90%); RT 60.0 Gy in 30
    fractions, days 28-67 (...); TMZ 0.02/day on days 28-67."``"""
    if plan.is_empty():
        return "No treatment (natural history)."
    parts = [_surgery_summary(s) for s in plan.surgeries]
    if plan.radiotherapy is not None:
        parts.append(_rt_summary(plan.radiotherapy))
    parts += [_chemo_summary(c) for c in plan.chemotherapy]
    return "; ".join(parts) + "."


# ----------------------------------------------------------------------------------------------
# JSON Schema
# ----------------------------------------------------------------------------------------------

def _num(description: str, **bounds) -> dict:
    """A JSON Schema number with a description and bounds."""
    return {"type": "number", "description": description, **bounds}


def _day(description: str) -> dict:
    """A JSON Schema day (number >= 0)."""
    return _num(description + " (days from baseline, >= 0)", minimum=0)


def _one_form(required: list[str], forbidden: list[str]) -> dict:
    """JSON Schema: ``required`` keys present and none of ``forbidden``."""
    return {"required": required, "not": {"anyOf": [{"required": [k]} for k in forbidden]}}


_SURGERY_SCHEMA = {
    "type": "object",
    "description": "One resection: exactly one of resection_mask and extent.",
    "additionalProperties": False,
    "required": ["day"],
    "properties": {
        "day": _day("Day of surgery"),
        "resection_mask": {"type": "string", "minLength": 1,
                           "description": "Mask file of the removed voxels; relative to the plan file."},
        "extent": _num("Fraction of the tumour mass removed, core outward", exclusiveMinimum=0, maximum=1),
        "removed_to": {"type": "string", "minLength": 1,
                       "description": "Class receiving removed tumour probability (default: schema's)."},
    },
    "oneOf": [{"required": ["resection_mask"]}, {"required": ["extent"]}],
}

_RT_SCHEMA = {
    "type": "object",
    "description": "Fractionated radiotherapy with LQ kill; schedule from start_day+fractions or fraction_days.",
    "additionalProperties": False,
    "properties": {
        "start_day": _day("Day of the first fraction"),
        "fractions": {"type": "integer", "minimum": 1, "description": "Number of fractions."},
        "dose_per_fraction_gy": _num("Prescription dose per fraction (Gy)", exclusiveMinimum=0,
                                     maximum=MAX_DOSE_PER_FRACTION_GY),
        "total_dose_gy": _num("Total prescription dose (Gy)", exclusiveMinimum=0, maximum=MAX_TOTAL_DOSE_GY),
        "fractions_per_week": {"type": "integer", "minimum": 1, "maximum": 7, "default": DEFAULT_FRACTIONS_PER_WEEK,
                               "description": "Consecutive treatment days per 7-day week."},
        "fraction_days": {"type": "array", "minItems": 1, "items": _day("Fraction day"),
                          "description": "Explicit fraction days instead of start_day/fractions_per_week."},
        "dose_map": {"type": "string", "minLength": 1,
                     "description": "TOTAL planned dose per voxel (Gy) file; relative to the plan file."},
        "alpha_per_gy": _num("LQ alpha (1/Gy)", exclusiveMinimum=0, maximum=MAX_ALPHA_PER_GY,
                             default=DEFAULT_ALPHA_PER_GY),
        "alpha_beta_gy": _num("LQ alpha/beta (Gy)", exclusiveMinimum=0, default=DEFAULT_ALPHA_BETA_GY),
        "delayed_death": {
            "type": "object",
            "description": "Killed cells stay visible delay_days, then clear exponentially.",
            "additionalProperties": False,
            "required": list(_DELAYED_DEATH_KEYS),
            "properties": {
                "delay_days": _num("Delay before clearance starts (days)", minimum=0),
                "clearance_half_life_days": _num("Clearance half-life (days)", exclusiveMinimum=0),
            },
        },
        "hypoxia": {
            "type": "object",
            "description": "Dose divided by an oxygen enhancement ratio where the tumour is densely packed.",
            "additionalProperties": False,
            "required": ["oxygen_enhancement_ratio"],
            "properties": {
                "oxygen_enhancement_ratio": _num("OER of fully hypoxic cells", minimum=1,
                                                 maximum=MAX_OXYGEN_ENHANCEMENT_RATIO),
                "dense_from": _num("Tumour share where hypoxia starts", minimum=0, maximum=1, default=0.6),
                "dense_to": _num("Tumour share of full hypoxia", minimum=0, maximum=1, default=0.95),
            },
        },
    },
    "allOf": [
        {"oneOf": [{"required": ["dose_per_fraction_gy"]}, {"required": ["total_dose_gy"]}]},
        {"oneOf": [_one_form(["fraction_days"], ["start_day", "fractions_per_week"]),
                   _one_form(["start_day", "fractions"], ["fraction_days"])]},
    ],
}

_CHEMO_SCHEMA = {
    "type": "object",
    "description": "One agent: windows or the cycle form (start_day, cycles, days_on, cycle_length_days).",
    "additionalProperties": False,
    "required": ["agent", "kill_rate_per_day"],
    "properties": {
        "agent": {"type": "string", "minLength": 1, "description": "Drug name."},
        "kill_rate_per_day": _num("Tumour kill rate while exposed (1/day)", minimum=0),
        "windows": {"type": "array", "minItems": 1,
                    "description": "[start, end) exposure windows in days; start < end, no overlaps.",
                    "items": {"type": "array", "minItems": 2, "maxItems": 2,
                              "prefixItems": [_day("Window start"), _day("Window end (exclusive)")]}},
        "start_day": _day("Start of the first cycle"),
        "cycles": {"type": "integer", "minimum": 1, "description": "Number of cycles."},
        "days_on": _num("Exposure days at the start of each cycle", minimum=1),
        "cycle_length_days": _num("Cycle length (days, >= days_on)", minimum=1),
    },
    "oneOf": [_one_form(["windows"], list(_CYCLE_KEYS)), _one_form(list(_CYCLE_KEYS), ["windows"])],
}

#: JSON Schema (draft 2020-12) of plan format version 1, for editors, the Slicer module and other
#: tools. :func:`load_plan` enforces everything it says plus the cross-field rules listed in its
#: ``description``; Testing/test_plan.py keeps the two in sync.
PLAN_JSON_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "AnatomyDT treatment plan, format version 1",
    "description": (
        "Days are days from the baseline scan (day 0), doses in Gy, rates in 1/day. Rules this schema "
        "cannot express and AnatomyDTLib.plan.load_plan also checks: window start < end and no overlaps "
        "within an agent; cycle_length_days >= days_on; fractions equal to len(fraction_days); total dose "
        "(dose per fraction x fractions) <= 120 Gy and dose per fraction <= 25 Gy whichever is given; "
        "removed_to is a class of the model; referenced files exist."
    ),
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "version": {"const": PLAN_FORMAT_VERSION, "description": "Plan format version (optional)."},
        "surgery": {"type": ["array", "null"], "items": _SURGERY_SCHEMA},
        "radiotherapy": {"anyOf": [{"type": "null"}, _RT_SCHEMA]},
        "chemotherapy": {"type": ["array", "null"], "items": _CHEMO_SCHEMA},
    },
}


def crop_plan(plan: TreatmentPlan, box: tuple[slice, ...]) -> TreatmentPlan:
    """The plan with its resection masks and dose map cut to the crop ``box`` (array order)."""
    return plan.map_arrays(lambda array, kind: np.asarray(array)[box])
