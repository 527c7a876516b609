"""Treatment conditioning of the learned model: time-dependent feature vectors for FiLM.

The Growth CNN and the growth-rate CNN are conditioned on what treatment the anatomy has received
*by time t* (days from the baseline scan). Both kinds of input give the same features, so a model
trained on the synthetic benchmarks and one trained on brains with plans speak one language:

* the synthetic datasets' static variables ``treated``, ``dose_gy``, ``interval_days`` are read as
  "the whole dose delivered at day 0" (exactly the generator's dose-response, docs/datasets.md);
  ``interval_days`` is the rollout horizon, not a feature;
* a :class:`~AnatomyDTLib.plan.TreatmentPlan` gives cumulative dose, chemotherapy exposure and
  surgery timing as functions of t. The plan's own treatment terms (LQ kill, chemotherapy kill,
  resection) additionally act inside the solver; the features only tell the learned corrections
  what has happened.

Feature vector (:data:`FEATURE_NAMES`, all dimensionless, scaled to order 1):

=====  ============================  =====================================================
index  name                          value at time t (days)
=====  ============================  =====================================================
0      ``time``                      t / 100
1      ``treated``                   1 if any treatment is given (static flag / plan non-empty)
2      ``cumulative_dose``           radiotherapy dose delivered at or before t, Gy / 60
3      ``days_since_rt_start``       (t - first fraction day) / 100 after the first fraction, else 0
4      ``chemo_active``              1 while a chemotherapy window is open at t
5      ``chemo_exposure``            days of chemotherapy exposure before t / 100
6      ``surgery_done``              1 after the first surgery
7      ``days_since_surgery``        (t - last surgery day) / 100 after a surgery, else 0
=====  ============================  =====================================================

Timing follows the plan convention: an event on day d acts at the start of day d, so it counts
for every t >= d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..errors import InputError
from ..plan import TreatmentPlan

FEATURE_NAMES = ("time", "treated", "cumulative_dose", "days_since_rt_start", "chemo_active", "chemo_exposure",
                 "surgery_done", "days_since_surgery")
NUM_FEATURES = len(FEATURE_NAMES)

_TIME_SCALE_DAYS = 100.0
_DOSE_SCALE_GY = 60.0
_TOL = 1e-9


@dataclass(frozen=True)
class _CaseSchedule:
    """The treatment of one case as event times (days) and amounts."""

    treated: bool
    fraction_days: tuple[float, ...] = ()
    fraction_doses: tuple[float, ...] = ()
    chemo_windows: tuple[tuple[float, float], ...] = ()
    surgery_days: tuple[float, ...] = ()

    def features(self, t: float) -> list[float]:
        dose = sum(d for day, d in zip(self.fraction_days, self.fraction_doses) if day <= t + _TOL)
        started = [day for day in self.fraction_days if day <= t + _TOL]
        since_rt = (t - min(started)) / _TIME_SCALE_DAYS if started else 0.0
        active = any(s - _TOL <= t < e - _TOL for s, e in self.chemo_windows)
        exposure = sum(max(0.0, min(e, t) - s) for s, e in self.chemo_windows if s < t)
        done = [day for day in self.surgery_days if day <= t + _TOL]
        since_surgery = (t - max(done)) / _TIME_SCALE_DAYS if done else 0.0
        return [t / _TIME_SCALE_DAYS, float(self.treated), dose / _DOSE_SCALE_GY, since_rt, float(active),
                exposure / _TIME_SCALE_DAYS, float(bool(done)), since_surgery]


class Conditioning:
    """Per-case treatment schedules of a batch; :meth:`features` gives the (B, F) features at time t."""

    def __init__(self, schedules: Sequence[_CaseSchedule]):
        if not schedules:
            raise InputError("Conditioning needs at least one case.")
        self.schedules = tuple(schedules)
        self._cache: dict[float, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.schedules)

    @classmethod
    def from_static(cls, treatments: Sequence[Mapping[str, float]]) -> "Conditioning":
        """From synthetic-dataset treatment dicts (``treated``, ``dose_gy``; dose delivered on day 0)."""
        out = []
        for i, tr in enumerate(treatments):
            if not isinstance(tr, Mapping):
                raise InputError(f"Treatment of case {i} must be a dict like {{'treated': 1, 'dose_gy': 60}}, got {tr!r}.")
            treated = float(tr.get("treated", 0.0))
            dose = float(tr.get("dose_gy", 0.0))
            if not (math.isfinite(treated) and math.isfinite(dose) and dose >= 0):
                raise InputError(f"Treatment of case {i} has invalid values {dict(tr)!r}; treated is 0/1, dose_gy >= 0 Gy.")
            if dose > 0:
                out.append(_CaseSchedule(treated=True, fraction_days=(0.0,), fraction_doses=(dose,)))
            else:
                out.append(_CaseSchedule(treated=treated > 0))
        return cls(out)

    @classmethod
    def from_plans(cls, plans: Sequence[TreatmentPlan | None]) -> "Conditioning":
        """From treatment plans (None = no treatment). Dose maps count by their prescription dose."""
        out = []
        for plan in plans:
            if plan is None or plan.is_empty():
                out.append(_CaseSchedule(treated=False))
                continue
            rt = plan.radiotherapy
            days = tuple(rt.fraction_days) if rt is not None else ()
            doses = tuple(float(rt.dose_per_fraction_gy) for _ in days) if rt is not None else ()
            windows = tuple(w for chemo in plan.chemotherapy for w in chemo.windows)
            out.append(_CaseSchedule(treated=True, fraction_days=days, fraction_doses=doses, chemo_windows=windows,
                                     surgery_days=tuple(s.day for s in plan.surgeries)))
        return cls(out)

    def features(self, t: float, *, dtype=torch.float32, device=None) -> torch.Tensor:
        """(B, F) features at time ``t`` days (cached per time point)."""
        key = round(float(t), 9)
        cached = self._cache.get(key)
        if cached is None:
            cached = torch.tensor([s.features(float(t)) for s in self.schedules], dtype=torch.float64)
            self._cache[key] = cached
        return cached.to(dtype=dtype, device=device)
