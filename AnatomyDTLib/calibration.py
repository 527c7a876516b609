"""Patient-specific calibration (the "digital twin"): fit Eq. 2's parameters to a patient's own scans.

Given a patient history — two or more 5-class brain segmentations with their days and the
treatment plan — :func:`calibrate` fits the patient's PDE parameters by gradient descent (Adam)
through the differentiable solver (:func:`AnatomyDTLib.solver.simulate`): it rolls the first scan
forward to the day of every later scan and compares the result with that scan. :func:`forecast`
then runs the calibrated model from the LAST scan to future days on the full grid (the fast
no-grad path of :func:`AnatomyDTLib.predict.predict`). :func:`calibrate_and_forecast` does both
and is the qt-free entry point for the 3D Slicer module.

Days
----
All days (scan days, forecast days) are on the treatment plan's day axis: day 0 is the plan's
baseline, the day its events count from (docs/plan.md). For a phantom cohort and for most plans
that is the first scan, so "days since the first scan". Scan days must be >= 0 and strictly
increase; forecast days must lie after the last scan. Each rollout sees the plan shifted to its
own start (events before the start are dropped, see :func:`shift_plan`).

Grid
----
Scans on different grids are resampled (nearest neighbour, in physical LPS space) onto the grid
of the LAST scan, the one the forecast starts from and is written on. The fit runs on a crop
around the tumour of all scans plus ``margin_mm`` on that grid (e.g. 2 mm phantom voxels).

What is fitted (all positive or well-posed by construction)
-----------------------------------------------------------
* D: the tumour's diffusivity in each tissue (background, white matter, grey matter, ventricles;
  ``tumour_diffusion_by_tissue`` of :class:`~AnatomyDTLib.parameters.PDEParameters`), in mm²/day,
  as exp(θ) (log-parametrised).
* α: the tumour growth rate (1/day), a scalar exp(θ) or, with ``alpha="field"``, a smooth field
  α(x) = α0 · exp(g(x)), g trilinearly interpolated from a coarse grid of control points
  (``field_points`` per axis over the crop, extended by its border values outside), with a
  smoothness penalty on neighbouring control points.
* χ: the mass effect of the tumour on white matter, grey matter and the ventricles,
  χ_k,tumour = −s_k · min_tissue D_tumour with s_k = sigmoid(θ_k) in (0, 1). Eq. 2 on the simplex is
  well-posed only if D_j + D_k + χ_kj >= 0 (docs/solver.md, "Cross-diffusion: well-posedness");
  these tissues do not diffuse, so the margin is (1 − s_k)·min D > 0 for every parameter value.
  Other χ entries of the starting parameters are kept as they are.

Two more patient-specific quantities are fitted because the forecast depends on them strongly:

* the width of the tumour edge of each rollout's start field (mm, log-parametrised): a scan is a
  labelmap, but the tumour density behind it is smooth; a one-hot start makes the model lag
  (growth needs a density gradient first). :func:`soft_start` gives tumour share
  sigmoid(−signed distance / width), whose argmax is still the labelmap;
* a radiosensitivity factor on the plan's LQ α and β (α/β kept, log-parametrised) when the fitted
  interval contains radiotherapy fractions: with the nominal α the model must otherwise explain
  a tumour that survived radiotherapy by a high growth rate, and then over-grows in the forecast.

κ, dt, the Jacobi settings and the chemotherapy kill rate are not fitted. The starting point (and
the centre of a weak log-space prior) is :meth:`PDEParameters.brain_defaults`, radiosensitivity
factor 0.5 (see :class:`CalibrationSettings`), edge width 1 mm.

Loss (averaged over the later scans i)
--------------------------------------
``(1 − softDice(T_i, Q_i)) + volume_weight·((V_i − V_obs)/V_obs)²
+ classes_weight·mean_k(1 − softDice(p_k, q_k))``
where T is the soft "tumour is the argmax" indicator sigmoid((p_tumour − max_other p)/sharpness)
(what is evaluated is the argmax labelmap, and a diffuse field can match the soft volume while its
argmax volume is far off), V its volume (mL), Q the observed tumour and k the tissue classes,
plus the prior and α-field smoothness penalties. The best iterate (lowest loss) is kept. The run
is bounded: at most ``iterations`` Adam steps; an iterate worse than the best by more than
``backtrack_tolerance`` sends the fit back to the best one with half the step (at most 4 times);
an early stop when the loss has not improved by a relative ``plateau_tolerance`` for
``plateau_patience`` iterations; an optional ``max_seconds``. It is deterministic (no random
numbers; the same inputs, settings and torch thread count give the same numbers).

Why the mass effect is applied by a reaction hook during the fit: the solver's cross-diffusion
operator limits outflow by ``p / demand``, whose backward pass gives NaN where the demand is
denormal (operators.py, CrossDiffusionOperator.tendency). The fit adds the same upwind flux
without that limiter (inactive at these |χ|: the limiter only acts above the CFL limit) through
``reaction_hook``; the forecast and the fit report use the solver's own operator.
Test: ``Testing/test_calibration.py::test_mass_effect_hook_matches_the_solver_operator``.

Irradiated cells and the forecast
---------------------------------
A scan shows lethally irradiated cells as tumour until they clear, so the same labelmap can be a
growing tumour or a dying one. Fit and forecast therefore model delayed death: the plan's
``radiotherapy.delayed_death`` or, when it has none, ``settings.assumed_delayed_death`` (delay
14 days, half-life 21 days by default). The forecast restarts from the last scan's labels and
carries the fitted rollout's dying compartment into it (:class:`CarriedDying`: which share of the
last scan's tumour is already lethally hit, and when each pending cohort starts to clear), so
that those cells clear instead of regrowing (``settings.carry_dying``). Optionally, with the
threshold observation, the restart arranges the coded densities inside the visible lesion in the
order of the rollout's tumour density (``settings.order_density``, the default): the densest part
of the restart is then where the lesion is oldest, where radiotherapy's survivors are. Optionally
it takes the rollout's density values themselves (``settings.carry_density``, off by default):
the labels' coding assumes a dense core, which radiotherapy has thinned.

Known limits: the delay and half-life are assumed, not fitted (two scans inside the delay cannot
tell them apart); the chemotherapy kill rate is the plan's. The calibrated edge width,
radiosensitivity factor and carried dying share are not part of the PDEParameters file
(calibration.json has them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import Cancelled, InputError, ParameterError
from .io import Geometry, read_image_on_grid
from .losses import soft_dice_loss
from .models.visibility import VisibilityCoding
from .operators import face_both_inside, face_difference, flux_divergence
from .parameters import PDEParameters
from .plan import TreatmentPlan, crop_plan, load_plan
from .predict import PDEOnlyModel, Prediction, predict
from .schema import BRAIN_SCHEMA
from .plan import MAX_OXYGEN_ENHANCEMENT_RATIO, DelayedDeath, HypoxicRadioresistance
from .solver import DyingCompartment, simulate
from .state import AnatomyState, labels_to_field

SCHEMA = BRAIN_SCHEMA
TUMOUR = SCHEMA.tumour_index
BACKGROUND = SCHEMA.background_index
TISSUES = tuple(n for n in SCHEMA.names if n != SCHEMA.tumour)
"""Tissues whose tumour diffusivity is fitted (every class but the tumour), in schema order."""
PUSHED = ("white_matter", "grey_matter", "lateral_ventricles")
"""Classes the tumour pushes away (mass effect, χ_k,tumour <= 0) in the fit."""
ALPHA_MODES = ("scalar", "field")
OBSERVATIONS = ("threshold", "argmax")
CLEARANCE_FITS = ("auto", "always", "never")
_OER_SPAN = MAX_OXYGEN_ENHANCEMENT_RATIO - 1.0
"""A fitted oxygen enhancement ratio is 1 + span·sigmoid(θ): between 1 (no effect) and the plan's maximum."""
INFILTRATED = (SCHEMA.index("white_matter"), SCHEMA.index("grey_matter"))
"""Tissues the invisible tumour tail of the threshold observation model may occupy."""
_DAY_TOLERANCE = 1e-9
TRUSTED_DENSITY = 2.0
"""Default of ``CalibrationSettings.density_trust``: ``carry_density`` uses the fitted rollout's
density only where it is at least this multiple of the visibility threshold τ: where the rollout
has thinned a lesion the scan still shows to near τ, the rollout may be the one that is wrong, and
a restart at ~τ would fade at the slightest kill (case_0031 in docs/calibration.md)."""
_CHI_SHARE_RANGE = (0.02, 0.98)  # initial s_k is clipped to this, so the logit is finite
_FIT_DTYPE = torch.float32  # float64 gives the same losses to 1e-6 here, ~1.7x slower

__all__ = ["HistoryScan", "CalibrationSettings", "ScanFit", "Calibration", "Forecast", "CalibratedPDEModel",
           "EdgeProfile", "calibrate", "forecast", "calibrate_and_forecast", "prepare_history", "load_plan_on_grid",
           "shift_plan", "crop_plan", "scale_radiosensitivity", "edge_profile", "soft_start", "tumour_indicator",
           "CarriedDying", "with_delayed_death", "with_assumed_delayed_death"]


# --------------------------------------------------------------------------------------------
# Inputs and settings
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HistoryScan:
    """One segmentation of the patient's history.

    Attributes:
        labels: integer labelmap in array order (z, y, x) or (y, x), values = brain-schema class
            indices 0-4 (background, tumour, white_matter, grey_matter, lateral_ventricles).
        geometry: where the grid sits (spacing mm, origin mm LPS, direction).
        day: day of the scan on the plan's day axis (days >= 0, see the module docstring).
        name: for messages and reports (e.g. the file name or the Slicer node name).
    """

    labels: np.ndarray
    geometry: Geometry
    day: float
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or f"scan on day {self.day:g}"


@dataclass
class CalibrationSettings:
    """How the fit runs. Units: mm, days; weights are dimensionless.

    Attributes:
        alpha: "scalar" (one growth rate) or "field" (smooth α(x), see the module docstring).
        iterations: the most Adam steps (each is one forward + backward rollout).
        learning_rate: Adam step in log-parameter space (0.1 = about 10 % per step).
        margin_mm: crop margin around the tumour of all scans.
        dt_days: solver step; None = max(the starting parameters' dt, span / max_steps), written
            into the calibrated parameters so the forecast uses the same discretisation.
        max_steps: the step budget of the longest rollout when dt_days is None.
        volume_weight: weight of the squared relative tumour-volume error.
        observation: how a tumour density becomes a tumour label. "threshold" (default): a scan
            shows tumour where p_tumour > ``visibility_threshold`` (FLAIR sees infiltrated tissue
            at a low cell density, models/visibility.py); each rollout starts from its scan's labels
            coded as a density with an exponential edge of length ``infiltration_length_mm``
            (fitted) and an invisible tail. "argmax": the label is the argmax of the field and the
            start has a soft edge of ``edge_width_mm`` (the behaviour before the threshold model).
        visibility_threshold: τ of the threshold observation model (fraction of carrying capacity).
        infiltration_length_mm: starting e-folding length λ (mm) of the coded density.
        fit_infiltration_length: fit λ (log-parametrised).
        sharpness: width of the soft argmax of the tumour terms (0 = use p_tumour itself); argmax
            observation only (the threshold model's soft step is 0.1·τ wide).
        classes_weight: weight of the mean soft-Dice loss of the tissue classes (0 = tumour only).
        prior_weight: weight of the log-space prior pulling parameters towards the start
            (per squared decade for D and α).
        smoothness_weight: weight of the α-field smoothness penalty (squared control-point differences).
        field_points: control points per axis of the α field.
        fit_cross_diffusion: fit the mass-effect χ (else keep the starting χ).
        edge_width_mm: starting width of the soft tumour edge of every rollout's start field
            (:func:`soft_start`; 0 = one-hot start, not fitted).
        fit_edge_width: fit that width (log-parametrised).
        fit_radiosensitivity: fit a factor on the plan's radiotherapy LQ α and β (log-parametrised,
            α/β kept) when the fitted interval contains fractions; the forecast uses it.
        radiosensitivity_start: the factor the fit starts from (and its prior's centre). 0.5: the dense,
            hypoxic bulk a scan shows responds less than the plan's nominal LQ α says (oxygen
            enhancement ratio 1.5-3); with 1 the start often kills the whole tumour, and the fit
            then tends to explain the survivors by a high growth rate rather than by a lower kill.
        plateau_patience, plateau_tolerance: stop when the best loss has not improved by this
            relative amount for this many iterations.
        backtrack_tolerance: an iterate whose loss exceeds the best by more than this fraction is
            an overshoot: the fit returns to the best iterate and halves the step (at most 4 times).
        max_seconds: stop after this wall time (None = no limit); the best iterate is kept.
        assumed_delayed_death: (delay in days, clearance half-life in days) of lethally irradiated
            cells, used when the plan's radiotherapy does not give ``delayed_death``: killed cells
            stay visible for the delay, then clear. None = they vanish at once (the plan as given).
            Default (14, 21): the centre of the burden model's priors (burden.PRIORS; the cohort's
            ranges are 7-28 and 10-45 days).
        fit_clearance: fit the clearance half-life of lethally irradiated cells (the delay stays as
            given): "auto" when at least two later history scans come after the first fraction and
            the last of them after the first fraction + the delay, so that the history shows the
            kill and then its clearance (never with only two scans); "always" whenever the fit has
            fractions and delayed death; "never" (the default). Log-parametrised, starting at (and
            weakly pulled towards) the plan's or assumed half-life.
        fit_hypoxia: fit the oxygen enhancement ratio of the plan's (or assumed) hypoxia together
            with the radiosensitivity, as 1 + 3·sigmoid(θ) (so 1..4), starting at (and weakly pulled
            towards) the given one; only when the fit has fractions and hypoxia. Off by default.
        assumed_hypoxia: an oxygen enhancement ratio (1..4) for densely packed tumour, used when
            the plan's radiotherapy does not give ``hypoxia`` (:class:`~AnatomyDTLib.plan.
            HypoxicRadioresistance` with its default tumour shares 0.6-0.95): the dose is divided by
            it where the lesion is dense. None (the default) = the plan as given.
        carry_dying: start the forecast with the dying compartment of the fitted rollout at the last
            scan (:class:`CarriedDying`): the share of the last scan's tumour that is already
            lethally hit keeps clearing instead of regrowing. Needs delayed death (above).
        carry_density: with ``carry_dying`` and the threshold observation, also restart with the
            rollout's tumour density inside the visible lesion (``CarriedDying.tumour_density``)
            instead of the coded profile, which assumes a dense core. Off by default: on the
            held-out phantoms it helped 18 of 28 changed forecasts but lost one stable lesion
            entirely (restarted just above the visibility threshold, it faded; docs/calibration.md).
        order_density: with ``carry_dying`` and the threshold observation, restart with the coded
            profile's densities inside the visible lesion (the same values: the same tumour mass
            and labels), rearranged so that the densest go where the fitted rollout is densest.
            The rollout started from the first scan, so its density is highest where the lesion
            is oldest, and that is where the survivors of radiotherapy are on the phantoms
            (docs/calibration.md, "information ceiling"). On by default; ``carry_density`` (the
            rollout's values, not only their order) takes precedence over it.
        density_trust: ``carry_density`` takes the rollout's density where it is at least this
            multiple of the visibility threshold τ, the coded profile elsewhere (0 = everywhere;
            default :data:`TRUSTED_DENSITY`).
        brain_mask: restrict the PDE to the non-background voxels of each rollout's start scan
            (tumour cannot grow into the resection cavity, CSF or outside the brain).
        threads: torch threads during the fit (restored afterwards; None = leave as is). The
            crop's tensors are small: one thread was 10x faster than two on the busy 2-core test
            machine (26 s against 245 s for 5 iterations), and a fixed count keeps runs bit-identical.
    """

    alpha: str = "scalar"
    iterations: int = 30
    learning_rate: float = 0.1
    margin_mm: float = 10.0
    dt_days: float | None = None
    max_steps: int = 48
    volume_weight: float = 1.0
    observation: str = "threshold"
    visibility_threshold: float = 0.1
    infiltration_length_mm: float = 2.0
    fit_infiltration_length: bool = True
    sharpness: float = 0.1
    classes_weight: float = 0.25
    prior_weight: float = 0.01
    smoothness_weight: float = 0.1
    field_points: int = 4
    fit_cross_diffusion: bool = True
    edge_width_mm: float = 1.0
    fit_edge_width: bool = True
    fit_radiosensitivity: bool = True
    radiosensitivity_start: float = 0.5
    plateau_patience: int = 6
    plateau_tolerance: float = 1e-3
    backtrack_tolerance: float = 0.02
    max_seconds: float | None = None
    assumed_delayed_death: tuple[float, float] | None = (14.0, 21.0)
    fit_clearance: str = "never"
    fit_hypoxia: bool = False
    assumed_hypoxia: float | None = None
    carry_dying: bool = True
    carry_density: bool = False
    order_density: bool = True
    density_trust: float = TRUSTED_DENSITY
    brain_mask: bool = True
    threads: int | None = 1

    def check(self) -> None:
        """Raise :class:`ParameterError` for a setting out of range."""
        if self.alpha not in ALPHA_MODES:
            raise ParameterError(f"alpha must be one of {list(ALPHA_MODES)}, got {self.alpha!r}.")
        if self.fit_clearance not in CLEARANCE_FITS:
            raise ParameterError(f"fit_clearance must be one of {list(CLEARANCE_FITS)}, got {self.fit_clearance!r}.")
        if self.observation not in OBSERVATIONS:
            raise ParameterError(f"observation must be one of {list(OBSERVATIONS)}, got {self.observation!r}.")
        if not (isinstance(self.visibility_threshold, (int, float)) and 0.001 <= self.visibility_threshold <= 0.9):
            raise ParameterError(f"visibility_threshold must be a number in [0.001, 0.9] (fraction of the carrying "
                                 f"capacity), got {self.visibility_threshold!r}.")
        if not (isinstance(self.infiltration_length_mm, (int, float)) and math.isfinite(self.infiltration_length_mm)
                and self.infiltration_length_mm > 0.2):
            raise ParameterError(f"infiltration_length_mm must be a number > 0.2 mm, got {self.infiltration_length_mm!r}.")
        if not (isinstance(self.iterations, int) and not isinstance(self.iterations, bool) and self.iterations >= 0):
            raise ParameterError(f"iterations must be an integer >= 0, got {self.iterations!r}.")
        positive = {"learning_rate": self.learning_rate, "max_steps": self.max_steps,
                    "radiosensitivity_start": self.radiosensitivity_start}
        non_negative = {"margin_mm": self.margin_mm, "edge_width_mm": self.edge_width_mm,
                        "volume_weight": self.volume_weight,
                        "classes_weight": self.classes_weight, "prior_weight": self.prior_weight,
                        "smoothness_weight": self.smoothness_weight, "sharpness": self.sharpness,
                        "plateau_tolerance": self.plateau_tolerance,
                        "backtrack_tolerance": self.backtrack_tolerance}
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ParameterError(f"{name} must be a positive number, got {value!r}.")
        for name, value in non_negative.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ParameterError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.dt_days is not None and not (math.isfinite(self.dt_days) and self.dt_days > 0):
            raise ParameterError(f"dt_days must be a positive number of days, got {self.dt_days!r}.")
        if not (isinstance(self.field_points, int) and self.field_points >= 2):
            raise ParameterError(f"field_points must be an integer >= 2, got {self.field_points!r}.")
        if not (isinstance(self.plateau_patience, int) and self.plateau_patience >= 1):
            raise ParameterError(f"plateau_patience must be an integer >= 1, got {self.plateau_patience!r}.")
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads >= 1):
            raise ParameterError(f"threads must be an integer >= 1 or None, got {self.threads!r}.")
        if self.max_seconds is not None and not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise ParameterError(f"max_seconds must be a positive number of seconds, got {self.max_seconds!r}.")
        if not (isinstance(self.density_trust, (int, float)) and math.isfinite(self.density_trust)
                and self.density_trust >= 0):
            raise ParameterError("density_trust must be a number >= 0 (a multiple of the visibility threshold), got "
                                 f"{self.density_trust!r}.")
        assumed = self.assumed_delayed_death
        if assumed is not None and not (
                isinstance(assumed, (tuple, list)) and len(assumed) == 2
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in assumed)
                and assumed[0] >= 0 and assumed[1] > 0):
            raise ParameterError("assumed_delayed_death must be None or (delay in days >= 0, clearance half-life in "
                                 f"days > 0), got {assumed!r}.")
        oer = self.assumed_hypoxia
        if oer is not None and not (isinstance(oer, (int, float)) and math.isfinite(oer)
                                    and 1.0 <= oer <= MAX_OXYGEN_ENHANCEMENT_RATIO):
            raise ParameterError(f"assumed_hypoxia must be None or an oxygen enhancement ratio in 1..."
                                 f"{MAX_OXYGEN_ENHANCEMENT_RATIO:g}, got {oer!r}.")


# --------------------------------------------------------------------------------------------
# History: checks and a common grid
# --------------------------------------------------------------------------------------------

def prepare_history(scans: Sequence[HistoryScan]) -> list[HistoryScan]:
    """Check a history and resample every scan onto the last scan's grid (nearest neighbour).

    Raises:
        InputError: fewer than 2 scans; days not finite, negative, unsorted or duplicated; labels
            outside 0-4 or not integers; 2D and 3D mixed; a scan without tumour (before or after
            resampling, which means the grids do not overlap).
    """
    scans = list(scans)
    if len(scans) < 2:
        raise InputError(f"Calibration needs at least 2 segmentations with their days (got {len(scans)}): the "
                         "first is rolled forward and compared with the later ones. Add an earlier or later scan.")
    for scan in scans:
        if not isinstance(scan, HistoryScan):
            raise InputError(f"History entries must be HistoryScan objects, got {type(scan).__name__}.")
        if not (isinstance(scan.day, (int, float)) and math.isfinite(scan.day) and scan.day >= 0):
            raise InputError(f"{scan.label}: the day must be a finite number >= 0 (days from the plan's baseline), "
                             f"got {scan.day!r}.")
        labels = np.asarray(scan.labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{scan.label}: labels must be integers (class indices 0-4), got {labels.dtype}.")
        if labels.ndim != scan.geometry.ndim:
            raise InputError(f"{scan.label}: the labels are {labels.ndim}D but the geometry is {scan.geometry.ndim}D.")
        if labels.size and (labels.min() < 0 or labels.max() >= SCHEMA.num_classes):
            raise InputError(f"{scan.label}: labels outside the classes 0..{SCHEMA.num_classes - 1} "
                             f"({list(SCHEMA.names)}); map them first (--classes).")
        if not (labels == TUMOUR).any():
            raise InputError(f"{scan.label} has no tumour voxels; every history scan needs a tumour segment (a "
                             "complete response cannot be fitted by the growth model). Leave the scan out, or check "
                             "the segment-to-class mapping.")
    days = [float(s.day) for s in scans]
    for a, b in zip(scans, scans[1:]):
        if abs(b.day - a.day) <= _DAY_TOLERANCE:
            raise InputError(f"Two history scans are on the same day {a.day:g} ({a.label} and {b.label}); give each "
                             "scan its own day.")
    if days != sorted(days):
        raise InputError(f"History days must increase in the order given (oldest scan first), got "
                         f"{', '.join(f'{d:g}' for d in days)}.")
    if len({s.geometry.ndim for s in scans}) != 1:
        raise InputError("The history mixes 2D and 3D segmentations; give all scans in the same dimension.")
    reference = scans[-1]
    shape = tuple(np.asarray(reference.labels).shape)
    out = []
    for scan in scans:
        labels = _resample_labels(np.asarray(scan.labels), scan.geometry, reference.geometry, shape)
        if not (labels == TUMOUR).any():
            raise InputError(f"{scan.label} has no tumour left on the grid of {reference.label} after resampling: "
                             "the scans do not overlap in space. Register the scans to one another first.")
        out.append(HistoryScan(labels.astype(np.uint8), reference.geometry, float(scan.day), scan.name))
    return out


def _resample_labels(labels: np.ndarray, geometry: Geometry, reference: Geometry, shape: tuple[int, ...]) -> np.ndarray:
    """Labels moved onto the reference grid by nearest neighbour in physical space (outside: background)."""
    if tuple(labels.shape) == tuple(shape) and geometry.matches(reference):
        return labels
    import SimpleITK as sitk

    image = geometry.apply_to_sitk(sitk.GetImageFromArray(np.ascontiguousarray(labels.astype(np.uint8))))
    grid = reference.apply_to_sitk(sitk.Image([int(n) for n in reversed(shape)], sitk.sitkUInt8))
    moved = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, float(BACKGROUND), sitk.sitkUInt8)
    return sitk.GetArrayFromImage(moved)


# --------------------------------------------------------------------------------------------
# Plans: shifted to a rollout's start, cropped to the fit box
# --------------------------------------------------------------------------------------------

def load_plan_on_grid(plan, geometry: Geometry, shape: tuple[int, ...]) -> TreatmentPlan:
    """The plan (dict, path, TreatmentPlan or None) with its masks and dose maps on the grid.

    Files are resampled by position (masks nearest neighbour, dose maps linearly); arrays given
    from Python must already have ``shape``.
    """
    loaded = load_plan(plan, schema=SCHEMA)

    def loader(path: str, kind: str):
        interpolation = "nearest" if kind == "resection_mask" else "linear"
        array = read_image_on_grid(path, geometry, shape, interpolation=interpolation)
        return array > 0.5 if kind == "resection_mask" else array

    return loaded.with_loaded_arrays(loader, grid_shape=shape)


def shift_plan(plan: TreatmentPlan, start_day: float) -> TreatmentPlan:
    """The plan seen from ``start_day``: days minus ``start_day``, earlier events dropped.

    Surgeries before the start are dropped (their cavity is in the start scan); radiotherapy
    keeps the fractions on or after the start, with a dose map scaled to the kept fractions so that
    each fraction's dose is unchanged; chemotherapy windows are cut at the start. Cells killed by
    earlier fractions but still visible at the start are not in the plan: the forecast carries them
    in as a dying compartment (:class:`CarriedDying`).

    Raises:
        InputError: a dose map that has not been loaded (call :func:`load_plan_on_grid` first).
    """
    s = float(start_day)
    if s == 0:
        return plan
    surgeries = tuple(replace(x, day=max(0.0, x.day - s)) for x in plan.surgeries if x.day >= s - _DAY_TOLERANCE)
    rt = plan.radiotherapy
    if rt is not None:
        kept = [max(0.0, d - s) for d in rt.fraction_days if d >= s - _DAY_TOLERANCE]
        if not kept:
            rt = None
        else:
            dose_map = rt.dose_map
            if isinstance(dose_map, str):
                raise InputError(f"The dose map {dose_map} has not been loaded; load the plan on the grid first.")
            if dose_map is not None:
                dose_map = np.asarray(dose_map) * (len(kept) / rt.n_fractions)
            rt = replace(rt, fraction_days=tuple(kept), dose_map=dose_map)
    chemo = []
    for agent in plan.chemotherapy:
        windows = tuple((max(0.0, a - s), b - s) for a, b in agent.windows if b - s > _DAY_TOLERANCE)
        if windows:
            chemo.append(replace(agent, windows=windows))
    return replace(plan, surgeries=surgeries, radiotherapy=rt, chemotherapy=tuple(chemo),
                   source=f"{plan.source or 'plan'} seen from day {s:g}")


def scale_radiosensitivity(plan: TreatmentPlan, scale) -> TreatmentPlan:
    """The plan with its radiotherapy's LQ α and β multiplied by ``scale`` (α/β unchanged)."""
    rt = plan.radiotherapy
    if rt is None or (not isinstance(scale, torch.Tensor) and scale == 1.0):
        return plan
    return replace(plan, radiotherapy=replace(rt, alpha_per_gy=rt.alpha_per_gy * scale,
                                              beta_per_gy2=rt.beta_per_gy2 * scale))


def _tumour_box(scans: Sequence[HistoryScan], margin_mm: float) -> tuple[slice, ...]:
    """Bounding box (array order) of the tumour of all scans, grown by ``margin_mm``, clipped to the grid."""
    union = np.zeros(np.asarray(scans[0].labels).shape, bool)
    for scan in scans:
        union |= np.asarray(scan.labels) == TUMOUR
    idx = np.argwhere(union)
    lo, hi = idx.min(0), idx.max(0) + 1
    spacing = scans[0].geometry.spacing_array_order
    box = []
    for a, (l, h, n) in enumerate(zip(lo, hi, union.shape)):
        m = int(math.ceil(margin_mm / spacing[a]))
        box.append(slice(max(0, int(l) - m), min(int(n), int(h) + m)))
    return tuple(box)


# --------------------------------------------------------------------------------------------
# The start of a rollout: a labelmap with a soft tumour edge
# --------------------------------------------------------------------------------------------

@dataclass
class EdgeProfile:
    """What the soft start field of a labelmap needs (array order, on the labelmap's grid).

    Attributes:
        signed_mm: (*S) signed distance to the tumour border in mm (< 0 inside the tumour); the
            border lies half the smallest voxel size beyond the outermost tumour voxel centres.
        tissue: (K, *S) one-hot of the tissue each voxel holds besides tumour: its own label, and
            for tumour voxels the nearest tissue (white matter if there is none).
        eligible: (*S) 1 where tumour may be (tumour and tissue voxels), 0 for background.
    """

    signed_mm: torch.Tensor
    tissue: torch.Tensor
    eligible: torch.Tensor


def edge_profile(labels: np.ndarray, spacing: Sequence[float], dtype: torch.dtype = torch.float32) -> EdgeProfile:
    """The :class:`EdgeProfile` of a brain-schema labelmap with voxel ``spacing`` (mm, array order)."""
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    spacing = tuple(float(h) for h in spacing)
    tumour = labels == TUMOUR
    half = 0.5 * min(spacing)
    if tumour.any() and not tumour.all():
        outside = ndi.distance_transform_edt(~tumour, sampling=spacing) - half
        inside = ndi.distance_transform_edt(tumour, sampling=spacing) - half
        signed = np.where(tumour, -inside, outside)
    else:
        signed = np.full(labels.shape, -1e3 if tumour.all() else 1e3)
    is_tissue = (labels != TUMOUR) & (labels != BACKGROUND)
    under = labels.astype(np.int64).copy()
    if is_tissue.any():
        nearest = ndi.distance_transform_edt(~is_tissue, sampling=spacing, return_distances=False, return_indices=True)
        under[tumour] = labels[tuple(nearest)][tumour]
    else:
        under[tumour] = SCHEMA.index("white_matter")
    return EdgeProfile(torch.as_tensor(signed, dtype=dtype),
                       labels_to_field(under, SCHEMA.num_classes, dtype=dtype),
                       torch.as_tensor(labels != BACKGROUND, dtype=dtype))


def soft_start(profile: EdgeProfile, width_mm) -> torch.Tensor:
    """(K, *S) start field: tumour share sigmoid(−signed distance / width) on tumour and tissue
    voxels, the rest the voxel's tissue. Its argmax is the labelmap (the share is > 0.5 exactly
    on tumour voxels); a width -> 0 gives the one-hot field. Differentiable in ``width_mm`` (mm).
    """
    width = torch.as_tensor(width_mm, dtype=profile.signed_mm.dtype)
    share = torch.sigmoid(-profile.signed_mm / width) * profile.eligible
    tumour = torch.zeros_like(profile.tissue)
    tumour[TUMOUR] = 1.0
    return share * tumour + (1.0 - share) * profile.tissue


# --------------------------------------------------------------------------------------------
# The parametrisation
# --------------------------------------------------------------------------------------------

def _tumour_d_by_tissue(parameters: PDEParameters) -> dict[str, float]:
    """The tumour's D per tissue (mm²/day) of a parameter set, for every tissue of the schema."""
    if parameters.tumour_diffusion_by_tissue is not None:
        given = parameters.tumour_diffusion_by_tissue
        return {t: float(given.get(t, 0.0)) for t in TISSUES}
    d = float(parameters.diffusion.get(SCHEMA.tumour, 0.0))
    return {t: d for t in TISSUES}


def _logit(x: float) -> float:
    return math.log(x / (1.0 - x))


def visibility_coding(threshold: float, length_mm: float, *, learn_length: bool = False) -> VisibilityCoding:
    """The threshold observation model of the brain schema: τ fixed, λ optionally trained.

    The tail enters white and grey matter only (:data:`INFILTRATED`), never the ventricles or the
    background; tumour voxels hide the nearest white/grey-matter tissue.
    """
    return VisibilityCoding(SCHEMA.num_classes, TUMOUR, infiltrated_classes=INFILTRATED, excluded=(BACKGROUND,),
                            threshold=float(threshold), length_mm=float(length_mm), learn=False,
                            learn_length=learn_length)


class _Parametrisation(torch.nn.Module):
    """The fitted parameters as unconstrained tensors, and the PDE coefficients they give."""

    def __init__(self, start: PDEParameters, settings: CalibrationSettings, ndim: int, dtype: torch.dtype,
                 clearance_rate: float | None = None, oxygen_enhancement_ratio: float | None = None):
        """``clearance_rate``: the start (1/day) of a fitted clearance rate of dying cells;
        ``oxygen_enhancement_ratio``: the start of a fitted OER of the plan's hypoxia; None = not fitted."""
        super().__init__()
        self.start = start
        self.settings = settings
        d = _tumour_d_by_tissue(start)
        floor = 1e-4  # mm²/day: a tissue the start gives D = 0 starts (and is pulled) here instead
        self.log_d0 = torch.tensor([math.log(max(d[t], floor)) for t in TISSUES], dtype=dtype)
        self.log_d = torch.nn.Parameter(self.log_d0.clone())
        alpha0 = max(float(start.growth_rate), 1e-4)
        self.log_alpha0 = torch.tensor(math.log(alpha0), dtype=dtype)
        self.log_alpha = torch.nn.Parameter(self.log_alpha0.clone())
        self.log_width0 = torch.tensor(math.log(max(settings.edge_width_mm, 1e-3)), dtype=dtype)
        threshold = settings.observation == "threshold"
        self.log_width = torch.nn.Parameter(self.log_width0.clone(), requires_grad=(
            not threshold and settings.fit_edge_width and settings.edge_width_mm > 0))
        self.visibility = visibility_coding(settings.visibility_threshold, settings.infiltration_length_mm,
                                            learn_length=settings.fit_infiltration_length) if threshold else None
        self.log_length0 = torch.tensor(math.log(settings.infiltration_length_mm), dtype=dtype)
        self.log_rt_scale0 = torch.tensor(math.log(settings.radiosensitivity_start), dtype=dtype)
        self.log_rt_scale = torch.nn.Parameter(self.log_rt_scale0.clone(), requires_grad=settings.fit_radiosensitivity)
        self.log_clearance0 = torch.tensor(math.log(clearance_rate or 1.0), dtype=dtype)
        self.log_clearance = torch.nn.Parameter(self.log_clearance0.clone(), requires_grad=clearance_rate is not None)
        share = min(max(((oxygen_enhancement_ratio or 2.0) - 1.0) / _OER_SPAN, 0.01), 0.99)
        self.oer_logit0 = torch.tensor(_logit(share), dtype=dtype)
        self.oer_logit = torch.nn.Parameter(self.oer_logit0.clone(),
                                            requires_grad=oxygen_enhancement_ratio is not None)
        self.field = None
        if settings.alpha == "field":
            self.field = torch.nn.Parameter(torch.zeros((settings.field_points,) * ndim, dtype=dtype))
        min_d = min(math.exp(v) for v in self.log_d0.tolist())
        shares = []
        for name in PUSHED:
            chi = float(start.cross_diffusion.get(name, {}).get(SCHEMA.tumour, 0.0))
            share = min(max(-chi / min_d, _CHI_SHARE_RANGE[0]), _CHI_SHARE_RANGE[1])
            shares.append(_logit(share))
        self.chi_logit0 = torch.tensor(shares, dtype=dtype)
        self.chi_logit = torch.nn.Parameter(self.chi_logit0.clone(), requires_grad=settings.fit_cross_diffusion)
        fitted = {(row, SCHEMA.tumour) for row in PUSHED} if settings.fit_cross_diffusion else set()
        self.fixed_chi = {(r, c): float(v) for r, cols in start.cross_diffusion.items() for c, v in cols.items()
                          if (r, c) not in fitted}

    # -- coefficients ----------------------------------------------------------------------
    def tissue_d(self) -> torch.Tensor:
        """Tumour D per tissue of :data:`TISSUES` (mm²/day), > 0."""
        return torch.exp(self.log_d)

    def chi_matrix(self) -> torch.Tensor:
        """χ (K, K) in mm²/day; rows of :data:`PUSHED` against the tumour column are fitted."""
        k = SCHEMA.num_classes
        dtype = self.log_d.dtype
        chi = torch.zeros((k, k), dtype=dtype)
        for (row, col), value in self.fixed_chi.items():
            chi[SCHEMA.index(row), SCHEMA.index(col)] = value
        if self.settings.fit_cross_diffusion:
            pushes = -torch.sigmoid(self.chi_logit) * self.tissue_d().min()
            rows = torch.tensor([SCHEMA.index(r) for r in PUSHED])
            chi = chi.index_put((rows, torch.full_like(rows, TUMOUR)), pushes)
        return chi

    def diffusion_field(self, p0: torch.Tensor) -> torch.Tensor:
        """(K, *S) D field: the tumour's D(x) is the tissue-weighted mean of the fitted values over the
        start anatomy p0 (the mean of the tissue values in pure tumour), exactly as
        :func:`AnatomyDTLib.parameters.tissue_weighted_diffusion` but differentiable in D."""
        d = self.tissue_d()
        tissue_index = [SCHEMA.index(t) for t in TISSUES]
        tissue = p0[tissue_index]  # (T, *S), constant
        tissue_sum = tissue.sum(0)
        weighted = torch.einsum("t,t...->...", d, tissue)
        inside = tissue_sum > 1e-6
        d_tumour = torch.where(inside, weighted / torch.clamp(tissue_sum, min=1e-6), d.mean().expand_as(weighted))
        channels = []
        for k, name in enumerate(SCHEMA.names):
            if k == TUMOUR:
                channels.append(d_tumour)
            else:
                channels.append(torch.full_like(weighted, float(self.start.diffusion.get(name, 0.0))))
        return torch.stack(channels)

    def growth_rate(self, crop_shape: tuple[int, ...]) -> torch.Tensor:
        """α in 1/day: a 0-d tensor, or a field of ``crop_shape`` (the crop of the fit)."""
        alpha = torch.exp(self.log_alpha)
        if self.field is None:
            return alpha
        return alpha * torch.exp(_control_to_field(self.field, _full_box(crop_shape), crop_shape))

    def edge_width(self) -> torch.Tensor | None:
        """The tumour edge width of the start field (mm), or None for a one-hot (or threshold-coded) start."""
        if self.settings.edge_width_mm <= 0 or self.visibility is not None:
            return None
        return torch.exp(self.log_width)

    def radiosensitivity_scale(self) -> torch.Tensor:
        """The factor on the plan's LQ α and β (α/β kept), > 0."""
        return torch.exp(self.log_rt_scale)

    def oxygen_enhancement_ratio(self) -> torch.Tensor:
        """The fitted OER of dense tumour, 1..4."""
        return 1.0 + _OER_SPAN * torch.sigmoid(self.oer_logit)

    def fitted_oxygen_enhancement_ratio(self) -> float | None:
        """The fitted OER, or None when it is not fitted."""
        return float(self.oxygen_enhancement_ratio().detach()) if self.oer_logit.requires_grad else None

    def fitted_clearance_rate(self) -> float | None:
        """The fitted clearance rate of dying cells (1/day), or None when it is not fitted."""
        return float(torch.exp(self.log_clearance.detach())) if self.log_clearance.requires_grad else None

    def treated_plan(self, plan: TreatmentPlan) -> TreatmentPlan:
        """The plan with the fitted radiosensitivity (and clearance rate and OER, when fitted). They
        become 0-d tensors: the solver passes them straight to torch (treatments.radiation_fraction,
        effective_dose, clear_dying), so the loss has their gradient."""
        if plan.radiotherapy is None:
            return plan
        if self.log_rt_scale.requires_grad:
            plan = scale_radiosensitivity(plan, self.radiosensitivity_scale())
        if self.log_clearance.requires_grad:
            plan = with_clearance_rate(plan, torch.exp(self.log_clearance))
        if self.oer_logit.requires_grad:
            plan = with_oxygen_enhancement_ratio(plan, self.oxygen_enhancement_ratio())
        return plan

    def start_field(self, problem: "_Problem") -> torch.Tensor:
        if self.visibility is not None:
            return self.visibility.encode(problem.p0[None], problem.spacing)[0]
        width = self.edge_width()
        return problem.p0 if width is None else soft_start(problem.profile, width)

    def observe(self, trajectory: torch.Tensor) -> torch.Tensor:
        """What the scans would show of an (n, K, *S) rollout: decoded by the threshold model, or as is."""
        return trajectory if self.visibility is None else self.visibility.decode(trajectory)

    def infiltration_length(self) -> float | None:
        """λ (mm) of the threshold observation model, None for the argmax model."""
        return None if self.visibility is None else float(self.visibility.length_mm().detach())

    def penalty(self) -> torch.Tensor:
        """Log-space prior towards the start (per squared decade) and the α-field smoothness."""
        decade = math.log(10.0)
        prior = ((self.log_d - self.log_d0) / decade).pow(2).sum()
        prior = prior + ((self.log_alpha - self.log_alpha0) / decade).pow(2)
        if self.settings.fit_cross_diffusion:
            prior = prior + 0.25 * (self.chi_logit - self.chi_logit0).pow(2).sum()
        if self.log_width.requires_grad:
            prior = prior + ((self.log_width - self.log_width0) / decade).pow(2)
        if self.visibility is not None and self.visibility.raw_length.requires_grad:
            prior = prior + ((torch.log(self.visibility.length_mm()) - self.log_length0) / decade).pow(2)
        if self.log_rt_scale.requires_grad:
            prior = prior + ((self.log_rt_scale - self.log_rt_scale0) / decade).pow(2)
        if self.log_clearance.requires_grad:
            prior = prior + ((self.log_clearance - self.log_clearance0) / decade).pow(2)
        if self.oer_logit.requires_grad:
            prior = prior + 0.25 * (self.oer_logit - self.oer_logit0).pow(2)
        total = self.settings.prior_weight * prior
        if self.field is not None:
            rough = sum(face_difference(self.field.unsqueeze(0).unsqueeze(0), 2 + a).pow(2).sum()
                        for a in range(self.field.dim()))
            total = total + self.settings.smoothness_weight * rough
            total = total + self.settings.prior_weight * self.field.pow(2).mean()
        return total

    # -- results ---------------------------------------------------------------------------
    def to_parameters(self, dt_days: float) -> PDEParameters:
        """The current values as :class:`PDEParameters` (α: the scalar α0 of a field)."""
        with torch.no_grad():
            d = {t: float(v) for t, v in zip(TISSUES, self.tissue_d().tolist())}
            chi = self.chi_matrix()
        cross: dict = {}
        for r in range(SCHEMA.num_classes):
            for c in range(SCHEMA.num_classes):
                if float(chi[r, c]) != 0.0:
                    cross.setdefault(SCHEMA.names[r], {})[SCHEMA.names[c]] = float(chi[r, c])
        params = PDEParameters(diffusion=dict(self.start.diffusion), tumour_diffusion_by_tissue=d,
                               growth_rate=float(torch.exp(self.log_alpha.detach())),
                               carrying_capacity=self.start.carrying_capacity, cross_diffusion=cross,
                               dt_days=float(dt_days), jacobi_iters=self.start.jacobi_iters, omega=self.start.omega)
        params.check_well_posed(SCHEMA)
        return params

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}


def _full_box(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def _control_to_field(control: torch.Tensor, box: tuple[slice, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """A coarse control grid spanning ``box`` interpolated (linearly) onto a grid of ``shape``.

    The control points sit evenly from the first to the last voxel of ``box`` along each axis;
    outside the box the border values continue (no jump where the crop ends).
    """
    ndim = control.dim()
    coords = []
    for a in range(ndim):
        start, stop = box[a].start, box[a].stop
        span = max(stop - 1 - start, 1)
        idx = torch.arange(shape[a], dtype=control.dtype)
        coords.append(torch.clamp((idx - start) / span * 2.0 - 1.0, -1.0, 1.0))
    mesh = torch.meshgrid(*coords, indexing="ij")
    grid = torch.stack(list(reversed(mesh)), dim=-1).unsqueeze(0)  # grid_sample wants (x, y[, z]) last
    out = torch.nn.functional.grid_sample(control.unsqueeze(0).unsqueeze(0), grid, mode="bilinear",
                                          padding_mode="border", align_corners=True)
    return out[0, 0]


class _MassEffectHook:
    """The cross-diffusion tendency of Eq. 2, −∇·(p_k Σ_j χ_kj ∇p_j), as a reaction hook for the fit.

    The same face velocities and first-order upwinding as
    :class:`~AnatomyDTLib.operators.CrossDiffusionOperator`, without its outflow limiter (which
    only acts above the CFL limit and whose backward pass is NaN for denormal outflow).
    """

    def __init__(self, chi: torch.Tensor, spacing: Sequence[float], mask: torch.Tensor | None):
        self.chi = chi
        self.spacing = tuple(float(h) for h in spacing)
        self.mask = None if mask is None else mask.reshape((1, 1) + tuple(mask.shape[-len(self.spacing):]))

    def __call__(self, p: torch.Tensor, t: float) -> torch.Tensor:
        potential = torch.einsum("kj,bj...->bk...", self.chi.to(p.dtype), p)
        total = torch.zeros_like(p)
        for axis, h in enumerate(self.spacing):
            dim = 2 + axis
            n = p.shape[dim]
            v = face_difference(potential, dim) / h
            if self.mask is not None:
                v = v * face_both_inside(self.mask, dim)
            flux = torch.clamp(v, min=0.0) * p.narrow(dim, 0, n - 1) + torch.clamp(v, max=0.0) * p.narrow(dim, 1, n - 1)
            total = total + flux_divergence(flux, dim) / h
        return total


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclass
class ScanFit:
    """How well the calibrated model reproduces one later scan of the history (on the fit crop).

    Volumes in mL (argmax voxel counts); Dice of the tumour class; ``initial_*`` with the starting
    parameters.
    """

    name: str
    day: float
    observed_tumour_ml: float
    fitted_tumour_ml: float
    tumour_dice: float
    initial_tumour_ml: float
    initial_tumour_dice: float

    @property
    def volume_error_ml(self) -> float:
        return self.fitted_tumour_ml - self.observed_tumour_ml

    def to_dict(self) -> dict:
        return {"scan": self.name, "day": self.day, "observed_tumour_ml": round(self.observed_tumour_ml, 4),
                "fitted_tumour_ml": round(self.fitted_tumour_ml, 4), "volume_error_ml": round(self.volume_error_ml, 4),
                "tumour_dice": round(self.tumour_dice, 4), "initial_tumour_ml": round(self.initial_tumour_ml, 4),
                "initial_tumour_dice": round(self.initial_tumour_dice, 4)}


@dataclass
class Calibration:
    """A calibrated patient model: parameters, fit quality, and what is needed to forecast.

    Attributes:
        parameters: the calibrated :class:`PDEParameters` (α = α0 when α is a field).
        initial_parameters: where the fit started.
        scans: the history on the common (last scan's) grid.
        plan: the plan with its arrays on that grid (days on the plan's axis).
        crop: the fit box in array order, ``[(start, stop), ...]``.
        growth_control: the α field's log-multiplier control grid (None for a scalar α).
        edge_width_mm: the fitted width of the start field's tumour edge (None: one-hot or threshold-coded start).
        visibility_threshold: τ of the threshold observation model (None: argmax observation).
        infiltration_length_mm: the fitted λ of the threshold observation model (None: argmax).
        radiosensitivity_scale: the fitted factor on the plan's LQ α and β (1 if not fitted).
        carried: the dying compartment the forecast starts with (None: none, e.g. no radiotherapy
            before the last scan or ``carry_dying`` off).
        delayed_death_assumed: the plan's radiotherapy had no delayed death and
            ``settings.assumed_delayed_death`` was added to it (``plan`` holds the result).
        hypoxia_assumed: the plan's radiotherapy had no hypoxia and ``settings.assumed_hypoxia``
            was added to it (``plan`` holds the result).
        clearance_fitted: the clearance half-life of ``plan``'s delayed death was fitted
            (``settings.fit_clearance``); the delay is the plan's or the assumed one.
        hypoxia_fitted: the OER of ``plan``'s hypoxia was fitted (``settings.fit_hypoxia``).
        fits: per later scan, the fit quality.
        loss_history: per iteration, the loss and its terms.
        iterations, stop_reason, seconds: how the run ended.
        settings: the settings used.
    """

    parameters: PDEParameters
    initial_parameters: PDEParameters
    scans: list[HistoryScan]
    plan: TreatmentPlan
    crop: list[tuple[int, int]]
    growth_control: np.ndarray | None
    edge_width_mm: float | None
    radiosensitivity_scale: float
    fits: list[ScanFit]
    loss_history: list[dict]
    iterations: int
    stop_reason: str
    seconds: float
    settings: CalibrationSettings
    visibility_threshold: float | None = None
    infiltration_length_mm: float | None = None
    carried: CarriedDying | None = None
    delayed_death_assumed: bool = False
    hypoxia_assumed: bool = False
    clearance_fitted: bool = False
    hypoxia_fitted: bool = False

    @property
    def reference(self) -> HistoryScan:
        """The last scan: the forecast's start and grid."""
        return self.scans[-1]

    @property
    def crop_box(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.crop)

    def growth_rate_map(self) -> np.ndarray | None:
        """α(x) in 1/day on the reference grid (float32), or None for a scalar α."""
        if self.growth_control is None:
            return None
        shape = tuple(np.asarray(self.reference.labels).shape)
        control = torch.as_tensor(self.growth_control, dtype=torch.float64)
        field_ = self.parameters.growth_rate * torch.exp(_control_to_field(control, self.crop_box, shape))
        return field_.numpy().astype(np.float32)

    def model(self) -> "CalibratedPDEModel":
        """The forecast model of this calibration (runs on the reference grid)."""
        alpha = self.growth_rate_map()
        return CalibratedPDEModel(parameters=self.parameters,
                                  growth_rate_map=None if alpha is None else torch.as_tensor(alpha),
                                  edge_width_mm=self.edge_width_mm, visibility_threshold=self.visibility_threshold,
                                  infiltration_length_mm=self.infiltration_length_mm, carried=self.carried)

    def _hypoxia_summary(self) -> dict | None:
        rt = self.plan.radiotherapy
        if rt is None or rt.hypoxia is None:
            return None
        return {**rt.hypoxia.to_dict(),
                "source": "assumed (settings.assumed_hypoxia)" if self.hypoxia_assumed else "the plan",
                "oxygen_enhancement_ratio_fitted": self.hypoxia_fitted}

    def _delayed_death_summary(self) -> dict | None:
        rt = self.plan.radiotherapy
        if rt is None or rt.delayed_death is None:
            return None
        carried = self.carried
        return {**rt.delayed_death.to_dict(),
                "source": "assumed (settings.assumed_delayed_death)" if self.delayed_death_assumed else "the plan",
                "clearance_half_life_fitted": self.clearance_fitted,
                "carried_into_forecast": carried is not None,
                "dying_share_of_last_scan_tumour": None if carried is None else round(carried.mean_dying_share, 4),
                "pending_cohorts": None if carried is None else len(carried.pending)}

    def to_dict(self) -> dict:
        """A JSON-ready summary (no arrays)."""
        alpha_map = self.growth_rate_map()
        return {
            "history": [{"scan": s.name, "day": s.day} for s in self.scans],
            "grid": {"shape_array_order": list(np.asarray(self.reference.labels).shape),
                     "spacing_mm": list(self.reference.geometry.spacing),
                     "origin_mm_lps": list(self.reference.geometry.origin),
                     "direction": list(self.reference.geometry.direction), "reference_scan": self.reference.name},
            "crop_array_order": [list(c) for c in self.crop],
            "settings": dict(vars(self.settings)),
            "initial_parameters": self.initial_parameters.to_dict(),
            "parameters": self.parameters.to_dict(),
            "growth_rate_field": None if alpha_map is None else {
                "control_log_multiplier": np.asarray(self.growth_control).round(6).tolist(),
                "alpha0_per_day": self.parameters.growth_rate,
                "min_per_day": float(alpha_map.min()), "max_per_day": float(alpha_map.max())},
            "start_field": {"tumour_edge_width_mm": self.edge_width_mm,
                            "observation": self.settings.observation,
                            "visibility_threshold": self.visibility_threshold,
                            "infiltration_length_mm": self.infiltration_length_mm,
                            "note": "threshold observation: each rollout starts from its scan's labels coded as a "
                                    "tumour density (exp edge of the infiltration length, invisible tail) and "
                                    "labels tumour where the density exceeds the threshold "
                                    "(AnatomyDTLib/models/visibility.py); argmax observation: a soft tumour edge "
                                    "of tumour_edge_width_mm (calibration.soft_start). Not part of the "
                                    "PDEParameters file"},
            "radiotherapy": {"radiosensitivity_scale": self.radiosensitivity_scale,
                             "note": "multiplies the plan's LQ alpha and beta (alpha/beta kept) in the forecast",
                             "delayed_death": self._delayed_death_summary(),
                             "hypoxia": self._hypoxia_summary()},
            "fit": [f.to_dict() for f in self.fits],
            "loss_history": self.loss_history,
            "iterations": self.iterations,
            "stop_reason": self.stop_reason,
            "seconds": round(self.seconds, 2),
        }


def with_hypoxia(plan: TreatmentPlan, oxygen_enhancement_ratio: float | None) -> TreatmentPlan:
    """The plan with hypoxic radioresistance of the given OER (default tumour shares) when its
    radiotherapy has none (a plan's own ``hypoxia`` is kept); unchanged without radiotherapy or OER."""
    rt = plan.radiotherapy
    if rt is None or rt.hypoxia is not None or oxygen_enhancement_ratio is None:
        return plan
    return replace(plan, radiotherapy=replace(rt, hypoxia=HypoxicRadioresistance(float(oxygen_enhancement_ratio))))


def with_clearance_rate(plan: TreatmentPlan, rate_per_day) -> TreatmentPlan:
    """The plan with its delayed death clearing at ``rate_per_day`` (1/day; a float or a 0-d
    tensor), the delay unchanged; unchanged without radiotherapy or delayed death."""
    rt = plan.radiotherapy
    if rt is None or rt.delayed_death is None:
        return plan
    return replace(plan, radiotherapy=replace(rt, delayed_death=replace(rt.delayed_death,
                                                                        clearance_rate_per_day=rate_per_day)))


def with_oxygen_enhancement_ratio(plan: TreatmentPlan, ratio) -> TreatmentPlan:
    """The plan with its hypoxia's OER set to ``ratio`` (a float or a 0-d tensor), the tumour shares
    unchanged; unchanged without radiotherapy or hypoxia."""
    rt = plan.radiotherapy
    if rt is None or rt.hypoxia is None:
        return plan
    return replace(plan, radiotherapy=replace(rt, hypoxia=replace(rt.hypoxia, oxygen_enhancement_ratio=ratio)))


def clearance_is_fitted(setting: str, plan: TreatmentPlan, later_days: Sequence[float]) -> bool:
    """Whether the fit fits the clearance half-life (``CalibrationSettings.fit_clearance``).

    ``plan`` and ``later_days`` count from the first history scan. "auto" needs at least two later
    scans after the first fraction and the last of them after the first fraction + the delay:
    one scan during or just after the course cannot tell a strong kill that clears slowly from a
    weak kill that clears fast; a second, later one shows how the response goes on.
    """
    rt = plan.radiotherapy
    if setting == "never" or rt is None or rt.delayed_death is None or not rt.fraction_days:
        return False
    if setting == "always":
        return True
    first = rt.fraction_days[0]
    after = [d for d in later_days if d > first]
    return len(after) >= 2 and after[-1] > first + rt.delayed_death.delay_days


def with_delayed_death(plan: TreatmentPlan, assumed: tuple[float, float] | None) -> TreatmentPlan:
    """The plan with ``assumed`` = (delay days, half-life days) delayed death when its radiotherapy
    has none (a plan's own ``delayed_death`` is kept); unchanged without radiotherapy or assumption."""
    rt = plan.radiotherapy
    if rt is None or rt.delayed_death is not None or assumed is None:
        return plan
    delay, half_life = (float(v) for v in assumed)
    return replace(plan, radiotherapy=replace(rt, delayed_death=DelayedDeath(delay, math.log(2.0) / half_life)))


@dataclass
class CarriedDying:
    """What part of the last scan's tumour the fitted rollout says is already lethally hit.

    The forecast restarts from the last scan's labels, which show living and dying tumour alike.
    The fitted rollout (first scan -> last scan, same plan, calibrated parameters) knows the split.
    It is carried over as *shares* of the visible tumour so that it applies to the restart's own
    tumour density, whatever the observation model makes of the labels:

    Attributes:
        dying_share: (Z, Y, X) float32 on the last scan's grid, in [0, 1]: dying / visible tumour
            of the rollout at the last scan's day; where the rollout has (almost) no tumour, its
            tumour-weighted mean (the lesion got the same course of radiotherapy).
        pending: cohorts still in their delay at the last scan: (days until their clearance
            starts, counted from the last scan; share map as above).
        clearance_rate_per_day: 1/day, of the plan's (or the assumed) delayed death.
        mean_dying_share: the tumour-weighted mean of ``dying_share`` (reported).
        tumour_density: (Z, Y, X) float32, the rollout's tumour density (living + dying) at the
            last scan, NaN outside the fit's crop; None = not used. With the threshold
            observation the restart takes it inside the visible lesion instead of the coded
            profile (:meth:`VisibilityCoding.encode`'s ``core_density``) where it is at least
            ``trusted_density``: radiotherapy has thinned the lesion, which its labels cannot show.
        trusted_density: absolute density (same units as τ) below which the restart ignores
            ``tumour_density`` and keeps the coded profile.
        order_only: use ``tumour_density`` only for its *order*: the restart keeps the coded
            profile's densities inside the lesion and rearranges them so that the densest go
            where the rollout is densest (:func:`~AnatomyDTLib.models.visibility.rearranged_by`;
            ``settings.order_density``). ``trusted_density`` is then not used.
    """

    dying_share: np.ndarray
    pending: list[tuple[float, np.ndarray]]
    clearance_rate_per_day: float
    mean_dying_share: float
    tumour_density: np.ndarray | None = None
    trusted_density: float = 0.0
    order_only: bool = False

    @classmethod
    def from_rollout(cls, visible_tumour: torch.Tensor, compartment: DyingCompartment, box: tuple[slice, ...],
                     shape: tuple[int, ...], floor: float = 1e-3, keep_density: bool = True,
                     trusted_density: float = 0.0, order_only: bool = False) -> "CarriedDying":
        """Shares from a rollout on the crop ``box`` of a grid of ``shape``: ``visible_tumour`` (*S)
        and ``compartment`` (dying (1, *S), pending masses (1, *S)) at the last scan's day;
        ``keep_density`` also keeps the rollout's tumour density (``tumour_density``), which the
        restart uses where it is at least ``trusted_density`` (elsewhere the coded profile)."""
        total = visible_tumour.detach().to(torch.float64)
        weight = total.sum()

        def share(mass: torch.Tensor) -> tuple[np.ndarray, float]:
            mass = mass.detach().to(torch.float64).reshape(total.shape)
            mean = float(mass.sum() / weight) if float(weight) > 0 else 0.0
            local = torch.where(total > floor, mass / total.clamp_min(floor), torch.full_like(total, mean))
            full = np.full(shape, mean, dtype=np.float32)
            full[box] = local.clamp(0.0, 1.0).numpy().astype(np.float32)
            return full, mean

        dying, mean = share(compartment.dying)
        pending = [(float(delay), share(mass)[0]) for delay, mass in compartment.pending]
        density = None
        if keep_density:
            density = np.full(shape, np.nan, dtype=np.float32)
            density[box] = total.numpy().astype(np.float32)
        return cls(dying, pending, float(compartment.clearance_rate_per_day), mean, density, float(trusted_density),
                   bool(order_only))

    def density_for(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The restart's core density, (1, *S): ``tumour_density`` where it is trusted, NaN (= the
        coded profile) elsewhere, for a restart on a grid of ``shape``."""
        density = self._density_on(shape)
        return torch.where(density >= self.trusted_density, density, torch.full_like(density, math.nan))[None]

    def order_for(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The key that orders the restart's coded densities, (1, *S): the rollout's tumour
        density (NaN outside the fit's crop: those voxels keep the coded order)."""
        return self._density_on(shape)[None]

    def _density_on(self, shape: tuple[int, ...]) -> torch.Tensor:
        if tuple(shape) != tuple(self.tumour_density.shape):
            raise InputError(f"The carried tumour density is on a grid of shape {self.tumour_density.shape} but the "
                             f"baseline is {tuple(shape)}; forecast from the calibration's last scan.")
        return torch.as_tensor(self.tumour_density)

    def compartment_for(self, visible_tumour: torch.Tensor) -> DyingCompartment:
        """The dying compartment of a restart whose tumour density is ``visible_tumour`` (*S)."""
        if tuple(visible_tumour.shape) != tuple(self.dying_share.shape):
            raise InputError(f"The carried dying compartment is on a grid of shape {self.dying_share.shape} but the "
                             f"baseline is {tuple(visible_tumour.shape)}; forecast from the calibration's last scan.")

        def mass(share_map: np.ndarray) -> torch.Tensor:
            return (torch.as_tensor(share_map).to(visible_tumour) * visible_tumour)[None]

        return DyingCompartment(mass(self.dying_share), [(d, mass(m)) for d, m in self.pending],
                                self.clearance_rate_per_day)


@dataclass
class CalibratedPDEModel(PDEOnlyModel):
    """Eq. 2 with a patient's calibrated parameters, as a :class:`~AnatomyDTLib.predict.ForecastModel`.

    Like ``pde-only`` (float32, the solver's no-grad inference path), plus an optional α(x) map
    (1/day) on the grid of the baseline it is run on, and the fitted soft tumour edge of the start
    field (``edge_width_mm``, see :func:`soft_start`; the baseline is taken as its argmax labels),
    and the dying compartment carried from the fit (``carried``, :class:`CarriedDying`).
    """

    growth_rate_map: torch.Tensor | None = None
    edge_width_mm: float | None = None
    visibility_threshold: float | None = None
    infiltration_length_mm: float | None = None
    carried: CarriedDying | None = None
    name: str = "pde-calibrated"

    def forecast(self, p0, *, spacing, days, plan, mask=None, progress=None) -> torch.Tensor:
        return self.rollout(p0, spacing=spacing, days=days, plan=plan, mask=mask, progress=progress)[0]

    def rollout(self, p0, *, spacing, days, plan, mask=None, progress=None
                ) -> tuple[torch.Tensor, DyingCompartment | None, torch.Tensor]:
        """:meth:`forecast` plus the dying compartment at the last day (None without delayed death)
        and the solver's visible tumour density there (*S), before any observation decoding."""
        work = p0.to(torch.float32)
        coding = None
        if self.visibility_threshold is not None:
            coding = visibility_coding(self.visibility_threshold, self.infiltration_length_mm or 2.0)
            core = order = None
            if self.carried is not None and self.carried.tumour_density is not None:
                if self.carried.order_only:
                    order = self.carried.order_for(tuple(work.shape[1:]))
                else:
                    core = self.carried.density_for(tuple(work.shape[1:]))
            with torch.no_grad():
                work = coding.encode(work[None], spacing, core_density=core, core_order=order)[0]
        elif self.edge_width_mm:
            labels = work.argmax(0).cpu().numpy()
            work = soft_start(edge_profile(labels, spacing), self.edge_width_mm).to(work.device)
        kwargs = self.parameters.simulate_kwargs(work, self.schema)
        if self.growth_rate_map is not None:
            if tuple(self.growth_rate_map.shape) != tuple(work.shape[1:]):
                raise InputError(f"The calibrated growth-rate map has shape {tuple(self.growth_rate_map.shape)} but "
                                 f"the baseline grid is {tuple(work.shape[1:])}; forecast from the calibration's "
                                 "last scan.")
            kwargs["growth_rate"] = self.growth_rate_map.to(work)
        carried = None if self.carried is None else self.carried.compartment_for(work[TUMOUR])
        out, dying = simulate(work, spacing=spacing, days=list(days), plan=plan, mask=mask, schema=self.schema,
                              return_trajectory=True, progress=progress, dying=carried, return_dying=True, **kwargs)
        density = out[-1, TUMOUR].clone()
        if coding is not None:
            with torch.no_grad():
                out = coding.decode(out)
        return out.to(p0.dtype), dying, density


@dataclass
class Forecast:
    """The calibrated model's forecast from the last scan.

    Attributes:
        days: the forecast days on the plan's day axis (as requested).
        start_day: the last scan's day (the forecast's baseline).
        prediction: the :class:`~AnatomyDTLib.predict.Prediction`; its ``days`` count from the
            last scan (``days - start_day``), its grid is the last scan's.
    """

    days: list[float]
    start_day: float
    prediction: Prediction

    def labels(self, index: int) -> np.ndarray:
        return self.prediction.labels(index)

    def volumes_ml(self) -> list[tuple[float, dict[str, float]]]:
        """(day on the plan's axis, class volumes in mL); the first row is the last scan."""
        return [(self.start_day + d, v) for d, v in self.prediction.volumes_ml()]


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------

@dataclass
class _Problem:
    """The fit's fixed data on the crop."""

    p0: torch.Tensor                 # (K, *S) start field, one-hot
    targets: torch.Tensor            # (n, K, *S) one-hot later scans
    days: list[float]                # rollout days (after the first scan)
    spacing: tuple[float, ...]
    plan: TreatmentPlan              # shifted to the first scan, cropped
    mask: torch.Tensor | None        # (*S) float 0/1
    voxel_ml: float
    observed_ml: torch.Tensor        # (n,) tumour volumes of the targets (mL)
    profile: EdgeProfile             # of the first scan on the crop


def _build_problem(scans: list[HistoryScan], plan: TreatmentPlan, box: tuple[slice, ...], dtype) -> _Problem:
    first = scans[0]
    p0 = labels_to_field(np.asarray(first.labels)[box], SCHEMA.num_classes, dtype=dtype)
    targets = torch.stack([labels_to_field(np.asarray(s.labels)[box], SCHEMA.num_classes, dtype=dtype)
                           for s in scans[1:]])
    mask = None
    voxel_ml = first.geometry.voxel_volume_ml
    observed = targets[:, TUMOUR].flatten(1).sum(1) * voxel_ml
    spacing = first.geometry.spacing_array_order
    return _Problem(p0, targets, [s.day - first.day for s in scans[1:]], spacing,
                    crop_plan(shift_plan(plan, first.day), box), mask, voxel_ml, observed,
                    edge_profile(np.asarray(first.labels)[box], spacing, dtype))


def tumour_indicator(field_: torch.Tensor, sharpness: float) -> torch.Tensor:
    """(B, 1, *S) soft "tumour is the argmax" indicator of (B, K, *S) fields; the plain p_tumour if sharpness is 0."""
    tumour = field_[:, TUMOUR:TUMOUR + 1]
    if sharpness <= 0:
        return tumour
    others = torch.cat([field_[:, :TUMOUR], field_[:, TUMOUR + 1:]], dim=1).amax(dim=1, keepdim=True)
    return torch.sigmoid((tumour - others) / sharpness)


def _loss_terms(trajectory: torch.Tensor, problem: _Problem, settings: CalibrationSettings) -> dict[str, torch.Tensor]:
    """Mean over later scans of the tumour soft-Dice loss, the relative volume error² and the tissue soft-Dice loss.

    The tumour terms use the soft argmax indicator sigmoid((p_tumour − max_other p)/sharpness) when
    ``settings.sharpness > 0``: what is evaluated is the argmax labelmap, and a diffuse tumour
    field can match the soft volume while its argmax volume is far off.
    """
    tumour_field = (trajectory[:, TUMOUR:TUMOUR + 1] if settings.observation == "threshold"
                    else tumour_indicator(trajectory, settings.sharpness))
    tumour = soft_dice_loss(tumour_field, problem.targets[:, TUMOUR:TUMOUR + 1], reduction="mean")
    volume = tumour_field.flatten(1).sum(1) * problem.voxel_ml
    relative = ((volume - problem.observed_ml) / problem.observed_ml).pow(2).mean()
    tissues = [k for k in range(SCHEMA.num_classes) if k not in (TUMOUR, BACKGROUND)]
    classes = soft_dice_loss(trajectory, problem.targets, classes=tissues, reduction="mean")
    return {"tumour_dice": tumour, "volume": relative, "classes_dice": classes}


def _rollout(params: _Parametrisation, problem: _Problem, dt: float, progress) -> torch.Tensor:
    """The differentiable rollout of the first scan to every later scan's day: (n, K, *S)."""
    crop_shape = tuple(problem.p0.shape[1:])
    chi = params.chi_matrix()
    hook = _MassEffectHook(chi, problem.spacing, problem.mask) if bool((chi != 0).any()) else None
    start = params.start_field(problem)
    return simulate(start, spacing=problem.spacing, days=problem.days, dt=dt,
                    diffusion=params.diffusion_field(start), growth_rate=params.growth_rate(crop_shape),
                    carrying_capacity=params.start.carrying_capacity, cross_diffusion=None, reaction_hook=hook,
                    tumor_class=TUMOUR, plan=params.treated_plan(problem.plan), mask=problem.mask,
                    jacobi_iters=params.start.jacobi_iters,
                    omega=params.start.omega, return_trajectory=True, schema=SCHEMA, progress=progress)


def _fit_problem(scans: list[HistoryScan], plan: TreatmentPlan, box: tuple[slice, ...],
                 settings: CalibrationSettings) -> _Problem:
    """The fit's data on the crop ``box``, with the brain mask of the first scan when the settings ask for it."""
    problem = _build_problem(scans, plan, box, _FIT_DTYPE)
    if settings.brain_mask:
        mask = torch.as_tensor(np.asarray(scans[0].labels)[box] != BACKGROUND, dtype=_FIT_DTYPE)
        problem.mask = mask if bool(mask.any()) else None
    return problem


def _carried_dying(settings: CalibrationSettings, density: torch.Tensor, dying: DyingCompartment | None,
                   box: tuple[slice, ...], shape: tuple[int, ...]) -> CarriedDying | None:
    """What the forecast carries from the fitted rollout's last-scan state (None when nothing is dying)."""
    if not (settings.carry_dying and dying is not None and float(dying.dying.sum()) > 0):
        return None
    threshold = settings.observation == "threshold"
    return CarriedDying.from_rollout(density, dying, box, shape,
                                     keep_density=(settings.carry_density or settings.order_density) and threshold,
                                     trusted_density=settings.density_trust * settings.visibility_threshold,
                                     order_only=settings.order_density and not settings.carry_density)


def with_assumed_delayed_death(calibration: "Calibration", delay_days: float,
                               half_life_days: float) -> "Calibration":
    """The calibration under another delayed-death assumption, its fitted parameters unchanged.

    Why: two scans cannot tell how long irradiated cells stay visible (the delay, days) or how
    fast they then clear (the half-life, days); the fit assumed values for them. This gives the
    forecast model that the same fitted parameters make under other values: the plan's delayed
    death is replaced, and the history is replayed from the first scan under it (no-grad
    rollout, as for the fit report), which gives the dying compartment the forecast starts with
    and the fit quality of this assumption (``fits``; the "initial" columns are copied).

    Raises:
        ParameterError: the calibration's plan has no radiotherapy with delayed death, or the
            values are not a delay >= 0 days and a half-life > 0 days.
    """
    rt = calibration.plan.radiotherapy
    if rt is None or rt.delayed_death is None:
        raise ParameterError("This calibration has no delayed death of irradiated cells (no radiotherapy, or "
                             "--delayed-death none), so there is no delay or half-life to vary.")
    delay, half_life = float(delay_days), float(half_life_days)
    if not (math.isfinite(delay) and delay >= 0 and math.isfinite(half_life) and half_life > 0):
        raise ParameterError(f"A delayed-death assumption needs a delay >= 0 days and a half-life > 0 days; got "
                             f"{delay_days!r} and {half_life_days!r}.")
    plan = replace(calibration.plan, radiotherapy=replace(rt, delayed_death=DelayedDeath(
        delay, math.log(2.0) / half_life)))
    scans, box = calibration.scans, calibration.crop_box
    problem = _fit_problem(scans, plan, box, calibration.settings)
    replay = replace(calibration, carried=None).model()  # the history starts from the first scan: nothing carried
    quality, dying, density = _fit_quality(replay, problem, scans, box, calibration.radiosensitivity_scale)
    shape = tuple(np.asarray(calibration.reference.labels).shape)
    fits = [replace(old, fitted_tumour_ml=ml, tumour_dice=d) for old, (ml, d) in zip(calibration.fits, quality)]
    return replace(calibration, plan=plan, fits=fits,
                   carried=_carried_dying(calibration.settings, density, dying, box, shape))


def _fit_quality(model: CalibratedPDEModel, problem: _Problem, scans: list[HistoryScan], crop_box,
                 rt_scale: float = 1.0) -> tuple[list[tuple[float, float]], DyingCompartment | None, torch.Tensor]:
    """(tumour mL, tumour Dice) per later scan of a no-grad rollout with the solver's own
    operators; plus that rollout's dying compartment and tumour density at the last scan (crop)."""
    from .metrics import dice

    if model.growth_rate_map is not None:
        model = replace(model, growth_rate_map=model.growth_rate_map[crop_box])
    with torch.no_grad():
        out, dying, density = model.rollout(problem.p0.to(torch.float32), spacing=problem.spacing,
                                            days=problem.days, plan=scale_radiosensitivity(problem.plan, rt_scale),
                                            mask=problem.mask)
    result = []
    for i, scan in enumerate(scans[1:]):
        predicted = out[i].argmax(0).numpy() == TUMOUR
        observed = np.asarray(scan.labels)[crop_box] == TUMOUR
        result.append((float(predicted.sum()) * problem.voxel_ml, dice(predicted, observed)))
    return result, dying, density


class _TimeUp(Exception):
    """Raised inside a rollout when the fit's ``max_seconds`` have passed."""


def _stop_reason(settings: CalibrationSettings, iteration: int, best_iteration: int, lr: float,
                 started: float) -> str:
    """Why the fit stops after this iteration's evaluation, or "" to go on."""
    if iteration >= settings.iterations:
        return "iteration limit"  # no step after the last evaluation: it would never be evaluated
    if iteration - best_iteration >= settings.plateau_patience:
        return (f"loss plateau (no relative improvement > {settings.plateau_tolerance:g} in "
                f"{settings.plateau_patience} iterations)")
    if lr < settings.learning_rate / 16:
        return "step size exhausted (4 backtracks)"
    if settings.max_seconds is not None and time.perf_counter() - started > settings.max_seconds:
        return f"time limit ({settings.max_seconds:g} s)"
    return ""


def calibrate(history: Sequence[HistoryScan], plan=None, *, settings: CalibrationSettings | None = None,
              initial: PDEParameters | None = None, progress: Callable[[float], None] | None = None,
              cancel: Callable[[], bool] | None = None,
              on_iteration: Callable[[dict], None] | None = None) -> Calibration:
    """Fit this patient's D (per tissue), α (scalar or smooth field) and χ (mass effect) to the history.

    Args:
        history: two or more :class:`HistoryScan` (labelmaps with geometry and day), oldest first.
        plan: the treatment plan (dict, JSON path, TreatmentPlan or None = no treatment), days on
            the plan's axis; mask/dose files are resampled onto the last scan's grid, in-memory
            arrays must already be on it.
        settings: :class:`CalibrationSettings` (default: scalar α, at most 30 iterations).
        initial: starting parameters (default :meth:`PDEParameters.brain_defaults`).
        progress: called with the fraction done (0..1).
        cancel: polled during every rollout; returning True stops with :class:`Cancelled`.
        on_iteration: called after every iteration with its loss record.

    Returns:
        A :class:`Calibration` (parameters, per-scan fit, loss curve).

    Raises:
        InputError: a bad history (see :func:`prepare_history`). PlanError: a bad plan.
        ParameterError: bad settings. Cancelled: ``cancel()`` returned True.
    """
    settings = settings or CalibrationSettings()
    settings.check()
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _calibrate(history, plan, settings, initial, progress, cancel, on_iteration)
    finally:
        torch.set_num_threads(threads)


def _calibrate(history, plan, settings: CalibrationSettings, initial, progress, cancel, on_iteration) -> Calibration:
    started = time.perf_counter()
    initial = initial or PDEParameters.brain_defaults()
    initial.check_well_posed(SCHEMA)
    scans = prepare_history(history)
    reference = scans[-1]
    shape = tuple(np.asarray(reference.labels).shape)
    given = load_plan_on_grid(plan, reference.geometry, shape)
    with_death = with_delayed_death(given, settings.assumed_delayed_death)
    treatment = with_hypoxia(with_death, settings.assumed_hypoxia)
    hypoxia_assumed = treatment is not with_death
    box = _tumour_box(scans, settings.margin_mm)
    dtype = _FIT_DTYPE
    problem = _fit_problem(scans, treatment, box, settings)
    span = problem.days[-1]
    dt = settings.dt_days if settings.dt_days is not None else max(float(initial.dt_days), span / settings.max_steps)
    fit_clearance = clearance_is_fitted(settings.fit_clearance, problem.plan, problem.days)
    rt_fit = problem.plan.radiotherapy
    fit_oer = settings.fit_hypoxia and rt_fit is not None and rt_fit.hypoxia is not None and bool(rt_fit.fraction_days)
    params = _Parametrisation(initial, settings, len(shape), dtype, clearance_rate=(
        rt_fit.delayed_death.clearance_rate_per_day if fit_clearance else None), oxygen_enhancement_ratio=(
        rt_fit.hypoxia.oxygen_enhancement_ratio if fit_oer else None))
    threshold = settings.observation == "threshold"
    initial_model = CalibratedPDEModel(
        parameters=replace(initial, dt_days=dt),
        edge_width_mm=settings.edge_width_mm if settings.edge_width_mm > 0 and not threshold else None,
        visibility_threshold=settings.visibility_threshold if threshold else None,
        infiltration_length_mm=settings.infiltration_length_mm if threshold else None)
    initial_quality, _, _ = _fit_quality(initial_model, problem, scans, box)

    trainable = [p for p in params.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(trainable, lr=settings.learning_rate)
    history_records: list[dict] = []
    best_loss, best_state, best_grads, best_iteration = math.inf, params.snapshot(), None, 0
    stop_reason = "iteration limit"
    total = max(settings.iterations, 1)
    for iteration in range(1, settings.iterations + 1):
        def on_step(day: float, horizon: float, _it=iteration) -> None:
            if cancel is not None and cancel():
                raise Cancelled("calibration cancelled by the user")
            if _it > 1 and settings.max_seconds is not None and time.perf_counter() - started > settings.max_seconds:
                raise _TimeUp()
            if progress is not None:
                progress(min(1.0, (_it - 1 + day / horizon) / total))

        optimiser.zero_grad()
        try:
            trajectory = _rollout(params, problem, dt, on_step)
        except _TimeUp:  # the best iterate so far is kept; this one is abandoned mid-rollout
            stop_reason = f"time limit ({settings.max_seconds:g} s)"
            break
        terms = _loss_terms(params.observe(trajectory), problem, settings)
        penalty = params.penalty()
        loss = (terms["tumour_dice"] + settings.volume_weight * terms["volume"]
                + settings.classes_weight * terms["classes_dice"] + penalty)
        value = float(loss.detach())
        lr = optimiser.param_groups[0]["lr"]
        if not math.isfinite(value) and best_grads is None:
            raise ParameterError("The calibration loss is not finite at the starting parameters; check the "
                                 "history's segmentations and the plan.")
        record = {"iteration": iteration, "loss": value, **{k: float(v.detach()) for k, v in terms.items()},
                  "penalty": float(penalty.detach()), "learning_rate": lr}
        # Backtrack an overshoot: back to the best iterate, half the step, fresh Adam moments.
        overshoot = best_grads is not None and not (value <= best_loss * (1.0 + settings.backtrack_tolerance))
        record["backtracked"] = overshoot
        history_records.append(record)
        if on_iteration is not None:
            on_iteration(record)
        if not overshoot and value < best_loss:
            if value < best_loss * (1.0 - settings.plateau_tolerance) or best_iteration == 0:
                best_iteration = iteration
            best_loss, best_state = value, params.snapshot()
        stop_reason = _stop_reason(settings, iteration, best_iteration, lr, started)
        if stop_reason:
            break
        if overshoot:
            params.load_state_dict(best_state)
            for p, g in zip(trainable, best_grads):
                p.grad = g.clone()
            optimiser = torch.optim.Adam(trainable, lr=0.5 * lr)
        else:
            loss.backward()
            if not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in trainable):
                raise ParameterError("The calibration gradient is not finite; try a smaller learning_rate or "
                                     "report this case.")
            if best_iteration == iteration or best_loss == value:
                best_grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                              for p in trainable]
        optimiser.step()
    else:
        stop_reason = "iteration limit"
    params.load_state_dict(best_state)
    calibrated = params.to_parameters(dt)
    control = None if params.field is None else params.field.detach().numpy().astype(np.float64)
    width = params.edge_width()
    width = None if width is None else float(width.detach())
    rt_scale = float(params.radiosensitivity_scale().detach()) if problem.plan.radiotherapy is not None else 1.0
    if fit_clearance:  # the forecast and the fit report use the fitted half-life
        treatment = with_clearance_rate(treatment, params.fitted_clearance_rate())
        problem.plan = with_clearance_rate(problem.plan, params.fitted_clearance_rate())
    if fit_oer:
        treatment = with_oxygen_enhancement_ratio(treatment, params.fitted_oxygen_enhancement_ratio())
        problem.plan = with_oxygen_enhancement_ratio(problem.plan, params.fitted_oxygen_enhancement_ratio())
    result = Calibration(calibrated, initial, scans, treatment, [(s.start, s.stop) for s in box], control, width,
                         rt_scale, [],
                         history_records, len(history_records), stop_reason, 0.0, settings,
                         visibility_threshold=settings.visibility_threshold if threshold else None,
                         infiltration_length_mm=params.infiltration_length(),
                         delayed_death_assumed=with_death is not given,
                         hypoxia_assumed=hypoxia_assumed, clearance_fitted=fit_clearance,
                         hypoxia_fitted=fit_oer)
    quality, dying, density = _fit_quality(result.model(), problem, scans, box, rt_scale)
    result.carried = _carried_dying(settings, density, dying, box, shape)
    for scan, observed, (ml, d), (ml0, d0) in zip(scans[1:], problem.observed_ml.tolist(), quality, initial_quality):
        result.fits.append(ScanFit(scan.name, scan.day, float(observed), ml, d, ml0, d0))
    result.seconds = time.perf_counter() - started
    if progress is not None:
        progress(1.0)
    return result


# --------------------------------------------------------------------------------------------
# Forecast
# --------------------------------------------------------------------------------------------

def forecast(calibration: Calibration, days, *, progress: Callable[[float], None] | None = None,
             cancel: Callable[[], bool] | None = None, device: str = "cpu") -> Forecast:
    """Forecast from the calibration's last scan to ``days`` (plan's day axis) on its full grid.

    Uses :func:`AnatomyDTLib.predict.predict` (no-grad inference path) with the calibrated model
    and the calibration's plan seen from the last scan.

    Raises:
        InputError: days not after the last scan, or not increasing.
    """
    start = calibration.reference.day
    values = [float(days)] if np.ndim(days) == 0 else [float(d) for d in days]
    if not values or not all(math.isfinite(d) for d in values):
        raise InputError(f"Give forecast days as finite numbers on the plan's day axis, got {values}.")
    if any(d <= start + _DAY_TOLERANCE for d in values):
        raise InputError(f"Forecast days must come after the last history scan (day {start:g}); got "
                         f"{', '.join(f'{d:g}' for d in values)}. Days count on the plan's axis (as --history).")
    values = sorted(set(values))
    reference = calibration.reference
    labels = np.asarray(reference.labels)
    baseline = AnatomyState(labels_to_field(labels, SCHEMA.num_classes), reference.geometry, SCHEMA)
    mask = labels != BACKGROUND if calibration.settings.brain_mask else None
    plan = scale_radiosensitivity(shift_plan(calibration.plan, start), calibration.radiosensitivity_scale)
    prediction = predict(baseline, days=[d - start for d in values], plan=plan, model=calibration.model(),
                         device=device, mask=mask, progress=progress, cancel=cancel)
    return Forecast(values, start, prediction)


def calibrate_and_forecast(history: Sequence[HistoryScan], days, plan=None, *,
                           settings: CalibrationSettings | None = None, initial: PDEParameters | None = None,
                           progress: Callable[[float], None] | None = None, cancel: Callable[[], bool] | None = None,
                           on_iteration: Callable[[dict], None] | None = None) -> tuple[Calibration, Forecast]:
    """:func:`calibrate` on the history, then :func:`forecast` to ``days``: the Slicer module's entry point.

    ``progress`` gets 0..0.9 for the fit and 0.9..1 for the forecast. Forecast days are checked
    before the fit starts.
    """
    values = [float(days)] if np.ndim(days) == 0 else [float(d) for d in days]
    last = max((float(s.day) for s in history), default=0.0)
    if not values or any(not math.isfinite(d) or d <= last for d in values):
        raise InputError(f"Forecast days must come after the last history scan (day {last:g}); got "
                         f"{', '.join(f'{d:g}' for d in values) or 'none'}.")
    fit_progress = None if progress is None else (lambda f: progress(0.9 * f))
    calibration = calibrate(history, plan, settings=settings, initial=initial, progress=fit_progress, cancel=cancel,
                            on_iteration=on_iteration)
    fc_progress = None if progress is None else (lambda f: progress(0.9 + 0.1 * f))
    return calibration, forecast(calibration, values, progress=fc_progress, cancel=cancel)
