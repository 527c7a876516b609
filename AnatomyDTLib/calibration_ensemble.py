"""How sure a calibrated forecast is: one forecast per draw of what the history cannot tell.

Why. A calibration fits D, α, χ and the radiosensitivity to the patient's scans, but it has to
*assume* how long lethally irradiated cells stay visible (the delay, days) and how fast they then
clear (the half-life, days): two scans taken during or just after radiotherapy cannot tell a
strong kill that clears slowly from a weak one that clears fast (docs/calibration.md). Those two
numbers move a shrinking lesion's forecast volume by several mL, so a single forecast made with
the priors' centres (14 and 21 days) says nothing about how far off it may be.

What. :func:`forecast_ensemble` keeps the fitted parameters and draws the delay and the half-life
from the burden model's priors (:data:`AnatomyDTLib.burden.PRIORS`, seed 002: uniform, 7-28 and
10-45 days), stratified (each member in its own slice of each prior range) and seeded, so a run
is reproducible. For each member it replays the history from the first scan under that draw
(:func:`~AnatomyDTLib.calibration.with_assumed_delayed_death`: the dying compartment the forecast
starts with, and how well the draw still fits the history) and forecasts from the last scan.
What it gives per forecast day:

* the **tumour probability map**: the fraction of members in which a voxel is tumour (0..1), as
  the size-guided growth-probability map does for the tumour-burden bootstrap;
* the **volume band**: median and percentiles of the members' tumour volumes (mL).

Only values the calibration assumed are drawn: a delay or half-life the plan states is kept (as in
the burden bootstrap), and so is a half-life the calibration fitted. The spread is therefore
conditional on the fit: it is the uncertainty of the clearance assumption, not of the fitted
parameters or of the model itself, so the volume band is a lower bound on the forecast's
uncertainty. On 31 treated held-out phantom patients it held the true volume in 14, nearly all
misses above the truth, while the map's support held 96 % of the true lesion (docs/calibration.md,
"Forecast ensemble over the delayed-death priors").

Units: days on the plan's axis, volumes in mL, probabilities in [0, 1].
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .burden import PRIORS
from .calibration import SCHEMA, TUMOUR, Calibration, Forecast, forecast, with_assumed_delayed_death
from .errors import ParameterError

__all__ = ["DEFAULT_MEMBERS", "MAX_MEMBERS", "BAND_TABLE_COLUMNS", "DelayedDeathDraw", "ForecastEnsemble", "check_ensemble_possible",
           "check_members", "drawn_assumptions", "delayed_death_draws", "forecast_ensemble"]

DEFAULT_MEMBERS = 16
"""Members of an ensemble unless asked otherwise: with stratified draws, the 5-95 % volume band of 16
members moves by a few per cent between seeds on the phantom patients."""
MAX_MEMBERS = 256
BAND_PERCENTILES = (5.0, 95.0)
"""The volume band's percentiles: a 90 % band, as the burden forecast's."""
BAND_TABLE_COLUMNS = ("day", "point_forecast_tumour_ml", "median_tumour_ml", "p5_tumour_ml", "p95_tumour_ml",
                      "min_tumour_ml", "max_tumour_ml", "members")
"""Columns of the volume-band table (``volume_band.csv``, the Slicer table): :meth:`ForecastEnsemble.band_table`."""

_DELAY, _HALF_LIFE = "death_delay_days", "clearance_half_life_days"


@dataclass(frozen=True)
class DelayedDeathDraw:
    """One member's assumption: irradiated cells stay visible ``delay_days``, then clear with ``half_life_days``."""

    delay_days: float
    half_life_days: float

    def to_dict(self) -> dict:
        return {"delay_days": round(self.delay_days, 4), "clearance_half_life_days": round(self.half_life_days, 4)}


def check_members(members) -> int:
    """``members`` as an int in 2..:data:`MAX_MEMBERS`, or ParameterError."""
    if isinstance(members, bool) or not isinstance(members, (int, np.integer)) or not 2 <= members <= MAX_MEMBERS:
        raise ParameterError(f"A forecast ensemble needs between 2 and {MAX_MEMBERS} members (e.g. "
                             f"{DEFAULT_MEMBERS}), got {members!r}.")
    return int(members)


def check_ensemble_possible(plan, assumed_delayed_death: tuple[float, float] | None) -> None:
    """Refuse an ensemble before any fit when it would have nothing to draw.

    ``plan`` is the treatment plan given to the calibration, ``assumed_delayed_death`` the
    settings' assumption (:class:`~AnatomyDTLib.calibration.CalibrationSettings`).

    Raises:
        ParameterError: no radiotherapy fractions, a plan that states its delayed death, or no
            delayed death assumed.
    """
    rt = None if plan is None else plan.radiotherapy
    if rt is None or not rt.fraction_days:
        raise ParameterError("A forecast ensemble draws the delayed death of irradiated cells, and the plan has no "
                             "radiotherapy: there is no clearance assumption to vary. Run without the ensemble.")
    if rt.delayed_death is not None:
        raise ParameterError("A forecast ensemble draws the delayed death of irradiated cells, but the plan states "
                             "it (radiotherapy.delayed_death), so nothing is assumed. Run without the ensemble, or "
                             "remove delayed_death from the plan to draw it from its priors.")
    if assumed_delayed_death is None:
        raise ParameterError("A forecast ensemble draws the delayed death of irradiated cells, and the calibration "
                             "assumes none (--delayed-death none / assumed_delayed_death=None). Run without the "
                             "ensemble, or keep the assumption.")


def drawn_assumptions(calibration: Calibration) -> tuple[str, ...]:
    """Which of the delay and the half-life the ensemble draws: those the calibration assumed.

    Raises:
        ParameterError: nothing to draw (no radiotherapy with delayed death, or the plan states both).
    """
    rt = calibration.plan.radiotherapy
    if rt is None or rt.delayed_death is None or not rt.fraction_days:
        raise ParameterError("A forecast ensemble draws the delayed death of irradiated cells, and this calibration "
                             "has none (no radiotherapy in the plan, or --delayed-death none): its forecast has no "
                             "clearance assumption to vary.")
    if not calibration.delayed_death_assumed:
        raise ParameterError("The plan states the delayed death of irradiated cells (radiotherapy.delayed_death), "
                             "so the calibration assumed nothing about it and a forecast ensemble has nothing to "
                             "draw. Remove it from the plan to let the ensemble draw delay and half-life from their "
                             "priors.")
    return (_DELAY,) if calibration.clearance_fitted else (_DELAY, _HALF_LIFE)


def _stratified_uniform(rng: np.random.Generator, members: int, dims: int) -> np.ndarray:
    """(members, dims) in [0, 1): a Latin hypercube, each member in its own 1/members slice of every axis."""
    slices = np.stack([rng.permutation(members) for _ in range(dims)], axis=1)
    return (slices + rng.uniform(size=(members, dims))) / members


def delayed_death_draws(calibration: Calibration, members: int = DEFAULT_MEMBERS,
                        seed: int = 0) -> list[DelayedDeathDraw]:
    """``members`` stratified draws of (delay, half-life) from their priors; kept values stay fixed.

    Raises:
        ParameterError: ``members`` outside 2..:data:`MAX_MEMBERS`, or nothing to draw
            (:func:`drawn_assumptions`).
    """
    members = check_members(members)
    drawn = drawn_assumptions(calibration)
    kept = calibration.plan.radiotherapy.delayed_death
    unit = _stratified_uniform(np.random.default_rng(seed), members, len(drawn))
    values = {name: PRIORS[name].low + unit[:, i] * (PRIORS[name].high - PRIORS[name].low)
              for i, name in enumerate(drawn)}
    delays = values.get(_DELAY, np.full(members, kept.delay_days))
    half_lives = values.get(_HALF_LIFE, np.full(members, kept.clearance_half_life_days))
    return [DelayedDeathDraw(float(d), float(h)) for d, h in zip(delays, half_lives)]


@dataclass
class ForecastEnsemble:
    """Forecasts of one calibration under ``draws`` (see the module docstring).

    Attributes:
        days: forecast days on the plan's axis.
        start_day: the last scan's day (the forecasts' baseline).
        draws: each member's delayed-death assumption.
        drawn: which assumptions were drawn (``"death_delay_days"``, ``"clearance_half_life_days"``).
        seed: the seed of the draws.
        tumour_probability: (len(days), *S) float32 on the last scan's grid: the fraction of members
            in which the voxel is tumour.
        tumour_ml: (members, len(days)) each member's forecast tumour volume (mL).
        history_dice: (members, later scans) tumour Dice of each member's replay of the history
            (how well the fitted parameters still fit the scans under that draw).
        seconds: wall time of the whole ensemble.
    """

    days: list[float]
    start_day: float
    draws: list[DelayedDeathDraw]
    drawn: tuple[str, ...]
    seed: int
    tumour_probability: np.ndarray
    tumour_ml: np.ndarray
    history_dice: np.ndarray
    seconds: float = 0.0

    @property
    def members(self) -> int:
        return len(self.draws)

    def volume_band(self, percentiles: Sequence[float] = BAND_PERCENTILES) -> list[dict]:
        """Per forecast day: the members' median, the given percentiles, min and max tumour volume (mL)."""
        low, high = (float(p) for p in percentiles)
        rows = []
        for i, day in enumerate(self.days):
            v = self.tumour_ml[:, i]
            rows.append({"day": day, "median_ml": float(np.median(v)), f"p{low:g}_ml": float(np.percentile(v, low)),
                         f"p{high:g}_ml": float(np.percentile(v, high)), "min_ml": float(v.min()),
                         "max_ml": float(v.max())})
        return rows

    def band_table(self, point_tumour_ml: Sequence[float]) -> list[list[float]]:
        """Rows of :data:`BAND_TABLE_COLUMNS`, one per forecast day; ``point_tumour_ml`` is the point
        forecast's tumour volume (mL) of each day, shown beside the members' band."""
        low, high = (f"p{p:g}_ml" for p in BAND_PERCENTILES)
        return [[row["day"], float(point), row["median_ml"], row[low], row[high], row["min_ml"], row["max_ml"],
                 self.members] for row, point in zip(self.volume_band(), point_tumour_ml)]

    def to_dict(self) -> dict:
        """A JSON-ready summary (no maps)."""
        return {
            "members": self.members, "seed": self.seed, "drawn": list(self.drawn),
            "priors": {name: {"low": PRIORS[name].low, "high": PRIORS[name].high, "distribution": "uniform",
                              "sampling": "stratified (Latin hypercube)"} for name in self.drawn},
            "volume_band_ml": [{k: round(v, 4) for k, v in row.items()} for row in self.volume_band()],
            "draws": [{**d.to_dict(), "tumour_ml": [round(float(v), 4) for v in self.tumour_ml[m]],
                       "history_tumour_dice": [round(float(v), 4) for v in self.history_dice[m]]}
                      for m, d in enumerate(self.draws)],
            "note": "one forecast per draw of the delayed-death assumptions the calibration could not fit; the "
                    "fitted parameters are the same in every member, so the spread is that of the assumption "
                    "only. tumour probability = fraction of members in which a voxel is tumour",
            "seconds": round(self.seconds, 2),
        }


def forecast_ensemble(calibration: Calibration, days, *, members: int = DEFAULT_MEMBERS, seed: int = 0,
                      progress: Callable[[float], None] | None = None, cancel: Callable[[], bool] | None = None,
                      device: str = "cpu") -> ForecastEnsemble:
    """One forecast per delayed-death draw (:func:`delayed_death_draws`), summarised per day.

    Each member costs one no-grad replay of the history on the fit crop and one forecast on the
    full grid (about as long as :func:`~AnatomyDTLib.calibration.forecast`). ``progress`` gets
    0..1 over all members; ``cancel`` is polled on every solver step.

    Raises:
        ParameterError: see :func:`delayed_death_draws`.
        InputError: forecast days not after the last scan (as :func:`~AnatomyDTLib.calibration.forecast`).
        Cancelled: ``cancel()`` returned True.
    """
    started = time.perf_counter()
    draws = delayed_death_draws(calibration, members, seed)
    counts: np.ndarray | None = None
    volumes, dice = [], []
    result_days: list[float] = []
    for m, draw in enumerate(draws):
        member = with_assumed_delayed_death(calibration, draw.delay_days, draw.half_life_days)
        step = None if progress is None else (lambda f, _m=m: progress((_m + f) / len(draws)))
        result: Forecast = forecast(member, days, progress=step, cancel=cancel, device=device)
        tumour = np.stack([result.labels(i) == TUMOUR for i in range(len(result.days))])
        counts = tumour.astype(np.uint16) if counts is None else counts + tumour
        volumes.append([row[1][SCHEMA.names[TUMOUR]] for row in result.volumes_ml()[1:]])
        dice.append([f.tumour_dice for f in member.fits])
        result_days = result.days
    return ForecastEnsemble(result_days, calibration.reference.day, draws, drawn_assumptions(calibration), int(seed),
                            (counts / np.float32(len(draws))).astype(np.float32),
                            np.asarray(volumes, dtype=np.float64), np.asarray(dice, dtype=np.float64),
                            seconds=time.perf_counter() - started)

