"""Patient-specific calibration (AnatomyDTLib.calibration, ``anatomydt calibrate``) on solver-made histories.

The synthetic patients are made by the solver itself (:func:`AnatomyDTLib.solver.simulate`) from
known parameters and observed as labelmaps, in two ways, one per observation model of the fit:

* argmax: started from a Gaussian-softened labelmap (state.labels_to_field, not the
  calibration's own soft start), labelled by argmax;
* threshold: started from the labelmap coded as a density with an infiltration length the fit
  does not know (2.5 mm; the fit starts at 2 mm), labelled where the tumour density exceeds 0.1.

The fit must find the parameters back from the labels alone.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import slicerio
import torch

from AnatomyDTLib import calibration as C
from AnatomyDTLib.cli import main
from AnatomyDTLib.errors import Cancelled, InputError, ParameterError
from AnatomyDTLib.io import Geometry, read_labelmap, write_labelmap
from AnatomyDTLib.metrics import dice
from AnatomyDTLib.parameters import PDEParameters, tissue_weighted_diffusion
from AnatomyDTLib.phantom import ellipsoid_brain
from AnatomyDTLib.plan import load_plan
from AnatomyDTLib.schema import BRAIN_SCHEMA
from AnatomyDTLib.solver import simulate
from AnatomyDTLib.state import labels_to_field

os.environ["ANATOMYDT_NO_PROGRESS"] = "1"
TUMOUR = BRAIN_SCHEMA.tumour_index
PUSHED = ("white_matter", "grey_matter", "lateral_ventricles")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def truth_parameters() -> PDEParameters:
    """The hidden patient: slower invasion and faster growth than the brain defaults it starts from."""
    params = PDEParameters.brain_defaults()
    params.tumour_diffusion_by_tissue = {"background": 0.02, "white_matter": 0.06, "grey_matter": 0.008,
                                         "lateral_ventricles": 0.02}
    params.growth_rate = 0.1
    params.cross_diffusion = {k: {"tumour": -0.004} for k in PUSHED}
    return params


def solver_history(labels: np.ndarray, geometry: Geometry, days, params: PDEParameters) -> list[C.HistoryScan]:
    """Argmax labelmaps of a solver run from a softened start (day 0 = ``labels``)."""
    p0 = labels_to_field(labels, 5, soften_mm=1.5, spacing=geometry.spacing_array_order, dtype=torch.float64)
    with torch.no_grad():
        traj = simulate(p0, spacing=geometry.spacing_array_order, days=list(days), return_trajectory=True,
                        mask=labels != 0, schema=BRAIN_SCHEMA, **params.simulate_kwargs(p0, BRAIN_SCHEMA))
    scans = [C.HistoryScan(labels, geometry, 0.0, "day0")]
    scans += [C.HistoryScan(traj[i].argmax(0).numpy().astype(np.uint8), geometry, float(d), f"day{d:g}")
              for i, d in enumerate(days)]
    return scans


def threshold_history(labels: np.ndarray, geometry: Geometry, days, params: PDEParameters,
                      threshold: float = 0.1, length_mm: float = 2.5) -> list[C.HistoryScan]:
    """Labelmaps of a solver run seen through the threshold observation model (day 0 = ``labels``)."""
    coding = C.visibility_coding(threshold, length_mm)
    with torch.no_grad():
        p0 = coding.encode(labels_to_field(labels, 5)[None], geometry.spacing_array_order)[0].to(torch.float64)
        traj = simulate(p0, spacing=geometry.spacing_array_order, days=list(days), return_trajectory=True,
                        mask=labels != 0, schema=BRAIN_SCHEMA, **params.simulate_kwargs(p0, BRAIN_SCHEMA))
        seen = coding.decode(traj)
    scans = [C.HistoryScan(labels, geometry, 0.0, "day0")]
    scans += [C.HistoryScan(seen[i].argmax(0).numpy().astype(np.uint8), geometry, float(d), f"day{d:g}")
              for i, d in enumerate(days)]
    return scans


def _slice_anatomy():
    labels3, _, _ = ellipsoid_brain(shape=(31, 56, 56), spacing_mm=(1.5, 1.5, 1.5), tumour_centre_mm=(0, -4, 6),
                                    tumour_radius_mm=5.0)
    return labels3[15], Geometry(spacing=(1.5, 1.5), origin=(-40.0, 12.0))


@pytest.fixture(scope="module")
def slice_patient():
    """A 2D brain slice (1.5 mm pixels) with a tumour in white matter, seen on days 0, 25, 50, 75 (argmax)."""
    labels, geometry = _slice_anatomy()
    return solver_history(labels, geometry, [25.0, 50.0, 75.0], truth_parameters())


@pytest.fixture(scope="module")
def threshold_patient():
    """The same slice and parameters, seen through the threshold observation model."""
    labels, geometry = _slice_anatomy()
    return threshold_history(labels, geometry, [25.0, 50.0, 75.0], truth_parameters())


@pytest.fixture(scope="module", params=["argmax", "threshold"])
def fitted(request, slice_patient, threshold_patient):
    """(patient, calibration on days 0, 25, 50, forecast of day 75), once per observation model."""
    torch.set_num_threads(1)
    patient = slice_patient if request.param == "argmax" else threshold_patient
    calibration = C.calibrate(patient[:3], None,
                              settings=C.CalibrationSettings(iterations=25, observation=request.param))
    return patient, calibration, C.forecast(calibration, [75.0])


# --------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------

def test_calibration_recovers_growth_rate_and_white_matter_diffusion(fitted):
    """Argmax: α and D_white. Threshold: α and the infiltration length λ; there the visible front
    runs at ≈ α·λ + D/λ (an exponential edge wider than sqrt(D/α) = 0.8 mm), so with λ = 2.5 mm it
    is set by α·λ and D is not identifiable from these labels (measured: D 0.27, α 0.090, λ 2.52)."""
    _, calibration, _ = fitted
    truth, start = truth_parameters(), PDEParameters.brain_defaults()
    fit = calibration.parameters
    if calibration.settings.observation == "threshold":
        assert fit.growth_rate == pytest.approx(truth.growth_rate, rel=0.3)
        assert calibration.infiltration_length_mm == pytest.approx(2.5, rel=0.2)
        assert abs(math.log(fit.growth_rate / truth.growth_rate)) < 0.5 * abs(math.log(start.growth_rate
                                                                                  / truth.growth_rate))
        fit.check_well_posed(BRAIN_SCHEMA)
        return
    # Stated tolerance: α within 30 %, D in white matter within 60 % (from 0.05 -> 0.1 and 0.2 -> 0.06,
    # i.e. starting 2x and 3.3x away). Grey matter, ventricles and background hold too little tumour
    # here to be identifiable and are not checked.
    assert fit.growth_rate == pytest.approx(truth.growth_rate, rel=0.3)
    d_fit = fit.tumour_diffusion_by_tissue["white_matter"]
    d_true = truth.tumour_diffusion_by_tissue["white_matter"]
    assert d_fit == pytest.approx(d_true, rel=0.6)  # measured: 0.089 (α: 0.077)
    for value, true, begin in ((fit.growth_rate, truth.growth_rate, start.growth_rate),
                               (d_fit, d_true, start.tumour_diffusion_by_tissue["white_matter"])):
        assert abs(math.log(value / true)) < 0.5 * abs(math.log(begin / true))  # moved most of the way
    # Mass effect stays repulsive and well-posed (margin > 0 with the fitted D).
    fit.check_well_posed(BRAIN_SCHEMA)
    assert all(fit.cross_diffusion[k]["tumour"] < 0 for k in PUSHED)
    assert all(m > 0 for _, _, m in fit.cross_diffusion_margins(BRAIN_SCHEMA))


def test_loss_decreases_and_the_history_is_reproduced(fitted):
    _, calibration, _ = fitted
    losses = [r["loss"] for r in calibration.loss_history]
    assert 2 <= len(losses) <= 25 and calibration.iterations == len(losses)
    assert min(losses) < 0.5 * losses[0]
    assert calibration.stop_reason
    assert [f.day for f in calibration.fits] == [25.0, 50.0]
    for f in calibration.fits:
        assert f.tumour_dice >= 0.95 and f.tumour_dice > f.initial_tumour_dice
        assert abs(f.volume_error_ml) < 0.15 * f.observed_tumour_ml
        assert abs(f.volume_error_ml) < abs(f.initial_tumour_ml - f.observed_tumour_ml)
    summary = json.loads(json.dumps(calibration.to_dict()))  # JSON-ready
    assert summary["iterations"] == calibration.iterations and len(summary["fit"]) == 2


def test_forecast_beats_no_change(fitted):
    patient, calibration, result = fitted
    truth = patient[3].labels == TUMOUR
    last = patient[2].labels == TUMOUR
    predicted = result.labels(0) == TUMOUR
    assert result.days == [75.0] and result.start_day == 50.0 and result.prediction.days == [25.0]
    assert result.prediction.model_name == "pde-calibrated"
    assert dice(predicted, truth) > 0.9
    assert dice(predicted, truth) > dice(last, truth) + 0.1
    volumes = result.volumes_ml()
    assert [d for d, _ in volumes] == [50.0, 75.0] and volumes[1][1]["tumour"] > volumes[0][1]["tumour"]
    with pytest.raises(InputError, match="after the last history scan"):
        C.forecast(calibration, [50.0])


# --------------------------------------------------------------------------------------------
# Radiotherapy with delayed death: the forecast carries the fitted dying compartment
# --------------------------------------------------------------------------------------------

def _irradiated_plan(half_life_days: float = 21.0) -> dict:
    """20 fractions of 2 Gy on days 2–27 (5 a week); killed cells stay visible 14 days, then clear
    with the given half-life (days)."""
    days = [d for week in range(4) for d in range(2 + 7 * week, 7 + 7 * week)]
    return {"radiotherapy": {"fraction_days": days, "dose_per_fraction_gy": 2.0, "alpha_per_gy": 0.1,
                             "alpha_beta_gy": 10.0,
                             "delayed_death": {"delay_days": 14.0, "clearance_half_life_days": half_life_days}}}


def _irradiated_history(half_life_days: float = 21.0) -> list:
    """A slice patient (tumour radius 8 mm, slow growth 0.01/day) irradiated on days 2–27 with the
    given clearance half-life, seen through the threshold model on days 0, 30, 50 and 80."""
    torch.set_num_threads(1)
    labels3, _, _ = ellipsoid_brain(shape=(31, 56, 56), spacing_mm=(1.5, 1.5, 1.5), tumour_centre_mm=(0, -4, 6),
                                    tumour_radius_mm=8.0)
    labels, geometry = labels3[15], Geometry(spacing=(1.5, 1.5), origin=(-40.0, 12.0))
    params = truth_parameters()
    params.growth_rate = 0.01
    plan = load_plan(_irradiated_plan(half_life_days), schema=BRAIN_SCHEMA)
    coding = C.visibility_coding(0.1, 2.5)
    days = (30.0, 50.0, 80.0)
    with torch.no_grad():
        p0 = coding.encode(labels_to_field(labels, 5)[None], geometry.spacing_array_order)[0].to(torch.float64)
        traj = simulate(p0, spacing=geometry.spacing_array_order, days=list(days), return_trajectory=True,
                        mask=labels != 0, schema=BRAIN_SCHEMA, plan=plan, **params.simulate_kwargs(p0, BRAIN_SCHEMA))
        seen = coding.decode(traj)
    scans = [C.HistoryScan(labels, geometry, 0.0, "day0")]
    return scans + [C.HistoryScan(seen[i].argmax(0).numpy().astype(np.uint8), geometry, d, f"day{d:g}")
                    for i, d in enumerate(days)]


@pytest.fixture(scope="module")
def irradiated_fit():
    """The irradiated slice patient (half-life 21 days, as the plan says): on day 30 the lesion is as
    large as before (most of it lethally hit but still visible), on day 50 clearing, on day 80 a
    sixth of it is left; calibrated on days 0–50."""
    scans = _irradiated_history()
    plan = load_plan(_irradiated_plan(), schema=BRAIN_SCHEMA)
    calibration = C.calibrate(scans[:3], plan, settings=C.CalibrationSettings(iterations=12, carry_density=True))
    return scans, calibration


def test_forecast_after_radiotherapy_carries_the_dying_compartment(irradiated_fit):
    """Restarting from the day-50 scan with every visible cell alive regrows the lesion; carrying the
    fitted rollout's dying share (the default) lets it clear as the truth does, and carrying its
    density inside the lesion too (``carry_density``) gets the size right. Measured: dying share
    Dice 0.78 (22 pixels, truth 14); with the density 0.93 (16 pixels); all alive 0.28 (86 pixels);
    no change 0.44."""
    scans, calibration = irradiated_fit
    truth = scans[3].labels == TUMOUR
    carried = calibration.carried
    assert carried is not None and not calibration.delayed_death_assumed
    assert 0.5 < carried.mean_dying_share < 1.0  # most of the day-50 lesion is already lethally hit
    assert carried.clearance_rate_per_day == pytest.approx(math.log(2) / 21.0)
    fractions = _irradiated_plan()["radiotherapy"]["fraction_days"]
    assert sorted(d for d, _ in carried.pending) == pytest.approx([f + 14 - 50 for f in fractions if f + 14 > 50])
    with_density = C.forecast(calibration, [80.0]).labels(0) == TUMOUR
    with_dying = C.forecast(replace(calibration, carried=replace(carried, tumour_density=None)), [80.0])
    with_dying = with_dying.labels(0) == TUMOUR  # the coded restart (order_density=False)
    all_alive = C.forecast(replace(calibration, carried=None), [80.0]).labels(0) == TUMOUR
    last = scans[2].labels == TUMOUR
    volume = {name: int(mask.sum()) for name, mask in
              (("truth", truth), ("carried", with_dying), ("alive", all_alive), ("last", last))}
    assert volume["truth"] < 0.5 * volume["last"], volume  # the lesion does shrink in truth
    assert abs(volume["carried"] - volume["truth"]) < 0.25 * abs(volume["alive"] - volume["truth"]), volume
    assert dice(with_dying, truth) > max(dice(all_alive, truth), dice(last, truth)) + 0.2
    assert dice(with_density, truth) > dice(with_dying, truth) + 0.05 and dice(with_density, truth) > 0.85
    # the restart uses the rollout's density where it is well above τ (NaN elsewhere: the coded profile)
    inside = scans[2].labels == TUMOUR
    assert carried.trusted_density == pytest.approx(C.TRUSTED_DENSITY * 0.1)
    restart = carried.density_for(inside.shape)[0].numpy()
    kept = restart[np.isfinite(restart)]
    assert np.isfinite(restart[inside]).mean() > 0.3  # measured 0.44
    assert kept.min() >= C.TRUSTED_DENSITY * 0.1 - 1e-6 and kept.max() <= 1.0
    raw = carried.tumour_density[inside]
    assert np.all(np.isfinite(raw)) and raw.min() < C.TRUSTED_DENSITY * 0.1  # the thin rim is not trusted
    everywhere = replace(carried, trusted_density=0.0).density_for(inside.shape)[0].numpy()
    np.testing.assert_array_equal(everywhere[inside], carried.tumour_density[inside])
    summary = calibration.to_dict()["radiotherapy"]["delayed_death"]
    assert summary["source"] == "the plan" and summary["carried_into_forecast"] is True
    assert summary["delay_days"] == 14.0 and summary["dying_share_of_last_scan_tumour"] == pytest.approx(
        carried.mean_dying_share, abs=1e-4)
    from AnatomyDTLib.scene import _calibrated_parameter_rows  # the Slicer module's parameter table

    rows = {name: (value, unit) for name, value, unit, _ in _calibrated_parameter_rows(calibration)}
    assert rows["death delay of irradiated cells"] == (14.0, "day")
    assert rows["clearance half-life"][0] == pytest.approx(21.0)
    assert rows["dying share of the last scan's tumour"][0] == pytest.approx(carried.mean_dying_share, abs=1e-4)


def test_order_density_restarts_with_the_coded_values_in_the_rollouts_order(irradiated_fit):
    """``order_density`` (the default): the forecast's restart keeps the coded densities of the last
    lesion (the tumour mass of the coded restart) but puts the densest where the fitted rollout is
    densest; ``order_density=False`` restarts with the coded profile as it is."""
    scans, calibration = irradiated_fit
    carried = replace(calibration.carried, order_only=True)
    ordered = replace(calibration, carried=carried)
    default = replace(calibration, carried=replace(carried, tumour_density=None))
    inside = scans[2].labels == TUMOUR
    key = carried.order_for(inside.shape)[0].numpy()
    assert np.isfinite(key[inside]).all()
    model, base = ordered.model(), default.model()
    p0 = labels_to_field(scans[2].labels, 5)
    spacing = scans[2].geometry.spacing_array_order
    coding = C.visibility_coding(model.visibility_threshold, model.infiltration_length_mm)
    with torch.no_grad():
        start_default = coding.encode(p0[None], spacing)[0, TUMOUR].numpy()
        start_ordered = coding.encode(p0[None], spacing, core_order=carried.order_for(inside.shape))[0, TUMOUR].numpy()
    np.testing.assert_allclose(np.sort(start_ordered[inside]), np.sort(start_default[inside]), rtol=0, atol=0)
    by_key = np.argsort(key[inside], kind="stable")
    assert np.all(np.diff(start_ordered[inside][by_key]) >= 0)  # denser wherever the rollout is denser
    truth = scans[3].labels == TUMOUR
    forecast_ordered = C.forecast(ordered, [80.0]).labels(0) == TUMOUR
    assert forecast_ordered.any() and dice(forecast_ordered, truth) > 0.5
    assert model.carried.order_only and base.carried.tumour_density is None
    assert C.CalibrationSettings().order_density  # the default
    fit = C.calibrate(scans[:2], _irradiated_plan(), settings=C.CalibrationSettings(iterations=1))
    assert fit.carried.order_only and fit.carried.tumour_density is not None
    assert fit.to_dict()["settings"]["order_density"] is True
    coded = C.calibrate(scans[:2], _irradiated_plan(), settings=C.CalibrationSettings(iterations=1, order_density=False))
    assert coded.carried.tumour_density is None and not coded.carried.order_only


def test_delayed_death_is_assumed_when_the_plan_has_none(irradiated_fit):
    scans, _ = irradiated_fit
    plan = _irradiated_plan()
    del plan["radiotherapy"]["delayed_death"]
    given = load_plan(plan, schema=BRAIN_SCHEMA)
    assumed = C.with_delayed_death(given, (10.0, 30.0))
    assert assumed.radiotherapy.delayed_death.delay_days == 10.0
    assert assumed.radiotherapy.delayed_death.clearance_half_life_days == pytest.approx(30.0)
    assert C.with_delayed_death(given, None) is given
    assert C.with_delayed_death(load_plan(_irradiated_plan(), schema=BRAIN_SCHEMA), (10.0, 30.0)
                                ).radiotherapy.delayed_death.delay_days == 14.0  # the plan's own is kept
    with pytest.raises(ParameterError, match="assumed_delayed_death"):
        C.CalibrationSettings(assumed_delayed_death=(10.0, 0.0)).check()
    for bad in (-1.0, math.nan, "2"):
        with pytest.raises(ParameterError, match="density_trust must be a number >= 0"):
            C.CalibrationSettings(density_trust=bad).check()
    fit = C.calibrate(scans[:2], plan, settings=C.CalibrationSettings(iterations=1))
    assert fit.delayed_death_assumed and fit.carried is not None
    assert fit.carried.tumour_density is not None and fit.carried.order_only  # its order only, by default
    assert fit.to_dict()["radiotherapy"]["delayed_death"]["source"].startswith("assumed")
    off = C.calibrate(scans[:2], plan, settings=C.CalibrationSettings(iterations=1, assumed_delayed_death=None))
    assert off.carried is None and off.to_dict()["radiotherapy"]["delayed_death"] is None


def test_solver_is_differentiable_in_a_tensor_clearance_rate():
    """d(visible tumour)/d(clearance rate) by autograd equals a central finite difference (float64)."""
    labels, _, _ = ellipsoid_brain(shape=(12, 20, 20), spacing_mm=(2.0, 2.0, 2.0), tumour_radius_mm=6.0)
    assert (labels == BRAIN_SCHEMA.tumour_index).sum() > 20
    p0 = labels_to_field(labels, 5, dtype=torch.float64)
    params = truth_parameters()
    kwargs = params.simulate_kwargs(p0, BRAIN_SCHEMA)

    def visible_tumour(rate):
        plan = C.with_clearance_rate(load_plan(_irradiated_plan(), schema=BRAIN_SCHEMA), rate)
        out = simulate(p0, spacing=(2.0, 2.0, 2.0), days=[40.0], mask=labels != 0, schema=BRAIN_SCHEMA, plan=plan,
                       **kwargs)
        return out[BRAIN_SCHEMA.tumour_index].sum()

    rate = torch.tensor(math.log(2) / 21.0, dtype=torch.float64, requires_grad=True)
    value = visible_tumour(rate)
    (grad,) = torch.autograd.grad(value, rate)
    h = 1e-5
    with torch.no_grad():
        numeric = (visible_tumour(rate.detach() + h) - visible_tumour(rate.detach() - h)) / (2 * h)
    assert float(grad) < 0  # faster clearance, less visible tumour
    assert float(grad) == pytest.approx(float(numeric), rel=1e-5)
    assert float(value.detach()) == pytest.approx(float(visible_tumour(math.log(2) / 21.0)), rel=1e-12)  # float path


def test_clearance_is_fitted_only_when_the_history_shows_it():
    plan = load_plan(_irradiated_plan(), schema=BRAIN_SCHEMA)  # fractions from day 2, delay 14 days
    assert not C.clearance_is_fitted("auto", plan, [30.0])            # one later scan: never
    assert not C.clearance_is_fitted("auto", plan, [1.0, 15.0])       # the last before 2 + 14
    assert C.clearance_is_fitted("auto", plan, [30.0, 50.0])
    assert C.clearance_is_fitted("always", plan, [30.0]) and not C.clearance_is_fitted("never", plan, [30.0, 50.0])
    untreated = load_plan(None, schema=BRAIN_SCHEMA)
    assert not C.clearance_is_fitted("always", untreated, [30.0, 50.0])
    import argparse

    from AnatomyDTLib.commands.calibrate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    choices = next(a.choices for a in parser._actions if a.dest == "fit_clearance")
    assert tuple(choices) == C.CLEARANCE_FITS  # the command line offers exactly the settings' values
    restart = next(a for a in parser._actions if a.dest == "restart_density")
    assert (restart.default == "ordered") == C.CalibrationSettings().order_density  # the same default
    with pytest.raises(ParameterError, match="fit_clearance must be one of"):
        C.CalibrationSettings(fit_clearance="yes").check()


def test_fitted_clearance_half_life_recovers_a_fast_clearance():
    """The truth clears with a 10-day half-life; the plan says 21. Fitted on days 0–50 (auto: two
    scans after the first fraction), the half-life comes out within 30 % of the truth (measured
    9.6 days) and the history fits better than with the plan's (measured day-50 Dice 1.0 vs 0.40).
    Not every clearance is identifiable: on the same slice with a 21- or 40-day truth the fit
    drifts to ~15 days while the history fits equally well (docs/calibration.md)."""
    scans = _irradiated_history(half_life_days=10.0)
    plan = load_plan(_irradiated_plan(), schema=BRAIN_SCHEMA)
    fixed = C.calibrate(scans[:3], plan, settings=C.CalibrationSettings(iterations=12))
    fitted = C.calibrate(scans[:3], plan, settings=C.CalibrationSettings(iterations=12, fit_clearance="auto"))
    assert not fixed.clearance_fitted and fitted.clearance_fitted
    assert fixed.plan.radiotherapy.delayed_death.clearance_half_life_days == pytest.approx(21.0)
    half_life = fitted.plan.radiotherapy.delayed_death.clearance_half_life_days
    assert abs(half_life - 10.0) < 3.0, half_life
    assert fitted.fits[-1].tumour_dice > fixed.fits[-1].tumour_dice + 0.3
    assert fitted.carried.clearance_rate_per_day == pytest.approx(math.log(2) / half_life)
    summary = fitted.to_dict()["radiotherapy"]["delayed_death"]
    assert summary["clearance_half_life_fitted"] is True and summary["delay_days"] == 14.0
    from AnatomyDTLib.scene import _calibrated_parameter_rows

    notes = {name: note for name, _, _, note in _calibrated_parameter_rows(fitted)}
    assert notes["clearance half-life"] == "fitted to the history (started from the plan's half-life)"


def test_fitted_oxygen_enhancement_ratio_moves_stays_in_range_and_is_recorded(irradiated_fit):
    """fit_hypoxia fits the (assumed) OER with the radiosensitivity: it gets a gradient (it leaves
    its start), stays within 1..4 and is what the forecast's plan holds. The slice cannot identify
    it (measured: for a truth of OER 3, starts of 1.5 and 3.5 end at 1.33 and 3.26, the history
    fitted perfectly both ways); that is why it is off by default."""
    scans, _ = irradiated_fit
    plan = load_plan(_irradiated_plan(), schema=BRAIN_SCHEMA)
    fit = C.calibrate(scans[:3], plan, settings=C.CalibrationSettings(iterations=4, assumed_hypoxia=2.5,
                                                                      fit_hypoxia=True))
    oer = fit.plan.radiotherapy.hypoxia.oxygen_enhancement_ratio
    assert fit.hypoxia_fitted and isinstance(oer, float) and 1.0 < oer < 4.0 and abs(oer - 2.5) > 1e-3
    summary = fit.to_dict()["radiotherapy"]["hypoxia"]
    assert summary["oxygen_enhancement_ratio_fitted"] is True and summary["oxygen_enhancement_ratio"] == oer
    from AnatomyDTLib.scene import _calibrated_parameter_rows

    notes = {name: note for name, _, _, note in _calibrated_parameter_rows(fit)}
    assert notes["oxygen enhancement ratio of dense tumour"].startswith(
        "fitted to the history (started from the assumed ratio)")
    without = C.calibrate(scans[:3], plan, settings=C.CalibrationSettings(iterations=1, fit_hypoxia=True))
    assert not without.hypoxia_fitted and without.plan.radiotherapy.hypoxia is None  # nothing to fit


def test_calibration_is_deterministic_reports_progress_and_can_be_cancelled(slice_patient):
    settings = C.CalibrationSettings(iterations=3)
    fractions = []
    torch.set_num_threads(2)
    first = C.calibrate(slice_patient[:2], None, settings=settings, progress=fractions.append)
    assert torch.get_num_threads() == 2  # the fit's own thread count (1) is restored afterwards
    torch.set_num_threads(1)
    second = C.calibrate(slice_patient[:2], None, settings=settings)
    assert first.parameters.to_dict() == second.parameters.to_dict()
    assert [r["loss"] for r in first.loss_history] == [r["loss"] for r in second.loss_history]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 3
    bounded = C.calibrate(slice_patient[:2], None, settings=C.CalibrationSettings(iterations=50, max_seconds=1e-6))
    assert bounded.iterations == 1 and bounded.stop_reason.startswith("time limit")  # the first iteration always runs
    calls = []
    with pytest.raises(Cancelled):
        C.calibrate(slice_patient[:2], None, settings=settings, cancel=lambda: calls.append(1) or len(calls) > 5)


def test_growth_rate_field_fit_gives_a_smooth_positive_map(threshold_patient):
    calibration = C.calibrate(threshold_patient[:2], None, settings=C.CalibrationSettings(alpha="field", iterations=3))
    alpha = calibration.growth_rate_map()
    shape = threshold_patient[1].labels.shape
    assert alpha.shape == shape and alpha.dtype == np.float32 and alpha.min() > 0
    assert alpha.max() > alpha.min()  # the field moved
    assert np.abs(np.diff(alpha, axis=0)).max() < 0.1 * alpha.max()  # smooth: no voxel-scale jumps
    control = np.asarray(calibration.growth_control)
    assert control.shape == (4, 4)
    result = C.forecast(calibration, [40.0])
    assert result.labels(0).shape == shape


# --------------------------------------------------------------------------------------------
# Pieces, each against an independent reference
# --------------------------------------------------------------------------------------------

def test_mass_effect_hook_matches_the_solver_operator():
    """The fit's NaN-safe cross-diffusion (a reaction hook) equals the solver's operator below its CFL limit."""
    labels3, _, _ = ellipsoid_brain(shape=(21, 40, 40), spacing_mm=(2.0, 2.0, 2.0), tumour_radius_mm=8.0,
                                    tumour_centre_mm=(0, -6, 8))
    labels = labels3[10]
    spacing = (2.0, 2.0)
    p0 = labels_to_field(labels, 5, soften_mm=2.0, spacing=spacing, dtype=torch.float64)
    params = PDEParameters.brain_defaults()
    params.cross_diffusion = {k: {"tumour": -0.015} for k in PUSHED}
    kwargs = params.simulate_kwargs(p0, BRAIN_SCHEMA)
    chi = torch.as_tensor(kwargs.pop("cross_diffusion"))
    mask = labels != 0
    common = dict(spacing=spacing, days=30.0, mask=mask, schema=BRAIN_SCHEMA, **kwargs)
    solver = simulate(p0, cross_diffusion=chi.numpy(), **common)
    hooked = simulate(p0, cross_diffusion=None, reaction_hook=C._MassEffectHook(chi, spacing, torch.as_tensor(mask)),
                      **common)
    without = simulate(p0, cross_diffusion=None, **common)
    assert float((solver - without).abs().max()) > 1e-3  # the mass effect matters here
    assert float((solver - hooked).abs().max()) < 1e-9


def test_fitted_diffusion_field_matches_tissue_weighted_diffusion():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=(12, 14))
    p0 = labels_to_field(labels, 5, soften_mm=2.0, spacing=(1.0, 1.0), dtype=torch.float64)
    p0[:, 3, 3] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # a pure-tumour voxel: fallback
    params = PDEParameters.brain_defaults()
    params.tumour_diffusion_by_tissue = {"background": 0.03, "white_matter": 0.25, "grey_matter": 0.04,
                                         "lateral_ventricles": 0.01}
    fit = C._Parametrisation(params, C.CalibrationSettings(), 2, torch.float64)
    ours = fit.diffusion_field(p0)
    by_index = {BRAIN_SCHEMA.index(n): v for n, v in params.tumour_diffusion_by_tissue.items()}
    reference = tissue_weighted_diffusion(p0, torch.zeros(5, dtype=torch.float64), by_index, TUMOUR)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    ours[TUMOUR].sum().backward()
    assert torch.isfinite(fit.log_d.grad).all() and (fit.log_d.grad > 0).all()


def test_soft_start_keeps_the_labelmap_and_is_differentiable():
    labels3, _, _ = ellipsoid_brain(shape=(12, 16, 14), spacing_mm=(3.0, 2.0, 2.0), tumour_radius_mm=6.0,
                                    tumour_centre_mm=(0, 0, 0))
    profile = C.edge_profile(labels3, (3.0, 2.0, 2.0), torch.float64)
    width = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    field = C.soft_start(profile, width)
    assert torch.allclose(field.sum(0), torch.ones_like(field[0])) and float(field.detach().min()) >= 0
    np.testing.assert_array_equal(field.argmax(0).numpy(), labels3)
    assert float(field.detach()[TUMOUR][labels3 == 0].max()) == 0.0  # nothing outside the brain
    outside = (labels3 != TUMOUR) & (labels3 != 0)
    assert 0.0 < float(field.detach()[TUMOUR][torch.as_tensor(outside)].max()) < 0.5
    field[TUMOUR].sum().backward()
    assert math.isfinite(float(width.grad)) and float(width.grad) > 0  # a wider edge spreads tumour outwards
    sharp = C.soft_start(profile, 1e-3)
    torch.testing.assert_close(sharp, labels_to_field(np.where(labels3 == TUMOUR, TUMOUR, labels3), 5,
                                                     dtype=torch.float64))


def test_growth_field_interpolation_matches_torch_interpolate_and_extends_flat():
    control = torch.arange(27, dtype=torch.float64).reshape(3, 3, 3) / 10.0
    box = (slice(2, 9), slice(1, 6), slice(3, 12))
    shape = (12, 8, 15)
    field = C._control_to_field(control, box, shape)
    inner = torch.nn.functional.interpolate(control[None, None], size=(7, 5, 9), mode="trilinear",
                                            align_corners=True)[0, 0]
    torch.testing.assert_close(field[box], inner, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(field[:2], field[2:3].expand(2, -1, -1))  # border values continue outside
    torch.testing.assert_close(field[:, :, 12:], field[:, :, 11:12].expand(-1, -1, 3))


def test_shift_plan_keeps_later_treatment_and_the_dose_per_fraction(tmp_path):
    dose = np.full((4, 5, 6), 60.0)
    dose[0] = 30.0
    plan = load_plan({"version": 1, "surgery": [{"day": 5, "extent": 0.9}],
                      "radiotherapy": {"start_day": 10, "fractions": 30, "dose_per_fraction_gy": 2.0,
                                       "fractions_per_week": 5, "dose_map": dose},
                      "chemotherapy": [{"agent": "temozolomide", "kill_rate_per_day": 0.02,
                                        "windows": [[10, 52], [80, 85], [108, 113]]}]}, schema=BRAIN_SCHEMA)
    shifted = C.shift_plan(plan, 45.0)
    assert shifted.surgeries == ()
    kept = [d - 45.0 for d in plan.radiotherapy.fraction_days if d >= 45.0]
    assert list(shifted.radiotherapy.fraction_days) == kept and 0 < len(kept) < 30
    np.testing.assert_allclose(shifted.radiotherapy.dose_per_fraction_field(),
                               plan.radiotherapy.dose_per_fraction_field())
    assert shifted.chemotherapy[0].windows == ((0.0, 7.0), (35.0, 40.0), (63.0, 68.0))
    assert C.shift_plan(plan, 200.0).radiotherapy is None
    cropped = C.crop_plan(shifted, (slice(0, 2), slice(1, 3), slice(0, 6)))
    assert cropped.radiotherapy.dose_map.shape == (2, 2, 6)


def test_history_on_another_grid_is_resampled_to_the_last_scan(slice_patient):
    first, last = slice_patient[0], slice_patient[1]
    g = last.geometry
    # The first scan on a grid shifted by 3 pixels (4.5 mm) in x: the same anatomy in space.
    moved = C.HistoryScan(first.labels[:, 3:], Geometry(spacing=g.spacing, origin=(g.origin[0] + 4.5, g.origin[1])),
                          0.0, "moved")
    common = C.prepare_history([moved, last])
    assert common[0].geometry == last.geometry and common[0].labels.shape == last.labels.shape
    np.testing.assert_array_equal(common[0].labels[:, 3:], first.labels[:, 3:])
    assert (common[0].labels[:, :3] == 0).all()  # outside the moved scan: background


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def volume_files(tmp_path_factory):
    """A small 3D patient (3 mm voxels): scans on days 0 and 30 as .seg.nrrd / .nii.gz, and a plan file."""
    root = tmp_path_factory.mktemp("calibrate")
    labels, _, _ = ellipsoid_brain(shape=(14, 18, 16), spacing_mm=(3.0, 3.0, 3.0), tumour_radius_mm=6.0,
                                   tumour_centre_mm=(0, -3, 4))
    geometry = Geometry(spacing=(3.0, 3.0, 3.0), origin=(-20.0, 15.0, 30.0),
                        direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    scans = solver_history(labels, geometry, [30.0], truth_parameters())
    a, b = root / "inputs" / "pre.seg.nrrd", root / "inputs" / "post.nii.gz"
    write_labelmap(a, scans[0].labels, geometry, BRAIN_SCHEMA)
    write_labelmap(b, scans[1].labels, geometry, BRAIN_SCHEMA)
    empty = np.where(scans[0].labels == TUMOUR, BRAIN_SCHEMA.index("white_matter"), scans[0].labels).astype(np.uint8)
    write_labelmap(root / "inputs" / "no_tumour.nii.gz", empty, geometry, BRAIN_SCHEMA)
    (root / "inputs" / "broken.nrrd").write_bytes(b"NRRD0004\nthis is not a header\n\x00\x01")
    plan = root / "inputs" / "plan.json"
    plan.write_text(json.dumps({"version": 1, "radiotherapy": {"start_day": 40, "fractions": 5,
                                                               "dose_per_fraction_gy": 2.0}}))
    return {"a": a, "b": b, "plan": plan, "geometry": geometry, "root": root, "labels_b": scans[1].labels}


def run(*options) -> int:
    return main(["calibrate", *[str(o) for o in options]])


def test_cli_round_trip_writes_every_output(volume_files, tmp_path, capsys):
    a, b, plan = volume_files["a"], volume_files["b"], volume_files["plan"]
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in (a, b, plan)}
    assert run("--history", f"{a}@0", f"{b}@30", "--plan", plan, "--days", "45,60", "--iterations", 3,
               "--out", out) == 0
    assert {p: p.read_bytes() for p in before} == before  # inputs untouched
    printed = capsys.readouterr().out
    assert "tumour Dice" in printed and "day 60" in printed and "plan: RT 10" in printed
    assert "delayed death: irradiated cells stay visible 14 days, then clear with a half-life of 21 days (assumed" \
        in printed
    names = {p.name for p in out.iterdir()}
    assert names == {"calibrated_parameters.json", "fit_report.csv", "loss_curve.csv", "volumes.csv",
                     "calibration.json", "forecast_day45.seg.nrrd", "forecast_day60.seg.nrrd"}
    params = PDEParameters.load(out / "calibrated_parameters.json")  # the PDEParameters format, well-posed
    assert params.growth_rate > 0 and set(params.tumour_diffusion_by_tissue) == set(C.TISSUES)
    for day in (45, 60):
        forecast = read_labelmap(out / f"forecast_day{day}.seg.nrrd")
        assert forecast.geometry.matches(volume_files["geometry"])
        assert (forecast.labels == TUMOUR).any()
        segments = slicerio.read_segmentation(str(out / f"forecast_day{day}.seg.nrrd"), skip_voxels=True)["segments"]
        assert all("pde-calibrated" in s["tags"]["DICOM.SegmentAlgorithmName"] for s in segments)
    with open(out / "fit_report.csv") as fh:
        fit = list(csv.DictReader(fh))
    assert len(fit) == 1 and fit[0]["day"] == "30" and 0.0 <= float(fit[0]["tumour_dice"]) <= 1.0
    with open(out / "loss_curve.csv") as fh:
        assert [int(r["iteration"]) for r in csv.DictReader(fh)] == [1, 2, 3]
    with open(out / "volumes.csv") as fh:
        volumes = list(csv.DictReader(fh))
    assert [r["day"] for r in volumes] == ["30", "45", "60"]
    voxel_ml = 27.0 / 1000
    assert float(volumes[0]["tumour_ml"]) == pytest.approx((volume_files["labels_b"] == TUMOUR).sum() * voxel_ml,
                                                           abs=1e-3)
    record = json.loads((out / "calibration.json").read_text())
    assert record["forecast"]["days"] == [45.0, 60.0] and record["calibration"]["iterations"] == 3
    assert [h["day"] for h in record["inputs"]["history"]] == [0.0, 30.0]
    assert record["calibration"]["radiotherapy"]["delayed_death"]["source"].startswith("assumed")

    # Existing outputs: refused without --force (nothing changes), replaced with it.
    stamp = (out / "calibration.json").read_bytes()
    assert run("--history", f"{a}@0", f"{b}@30", "--plan", plan, "--days", "45", "--iterations", 1,
               "--out", out) == 2
    assert "--force" in capsys.readouterr().err and (out / "calibration.json").read_bytes() == stamp
    assert run("--history", f"{a}@0", f"{b}@30", "--plan", "none", "--days", "45", "--iterations", 1,
               "--out", out, "--force") == 0
    assert json.loads((out / "calibration.json").read_text())["plan"] == {"version": 1}


@pytest.mark.parametrize("option, value, phrase", [
    ("delayed-death", "14", "DELAY,HALF_LIFE"), ("delayed-death", "14,0", "half-life > 0"),
    ("delayed-death", "-1,20", "delay must be >= 0"), ("delayed-death", "a,b", "DELAY,HALF_LIFE"),
    ("hypoxia", "0.5", "between 1"), ("hypoxia", "9", "between 1"), ("hypoxia", "high", "oxygen enhancement")])
def test_bad_radiotherapy_assumptions_are_refused_before_any_output(volume_files, tmp_path, capsys, option, value,
                                                                    phrase):
    a, b, plan = volume_files["a"], volume_files["b"], volume_files["plan"]
    out = tmp_path / "out"
    assert run("--history", f"{a}@0", f"{b}@30", "--plan", plan, "--days", "45", f"--{option}={value}",
               "--out", out) == 2
    assert phrase in capsys.readouterr().err and not out.exists()


def test_an_assumed_hypoxia_reaches_the_record_and_the_console(volume_files, tmp_path, capsys):
    a, b, plan = volume_files["a"], volume_files["b"], volume_files["plan"]
    out = tmp_path / "out"
    assert run("--history", f"{a}@0", f"{b}@30", "--plan", plan, "--days", "45", "--iterations", 1,
               "--hypoxia", "2.25", "--out", out) == 0
    assert "dose divided by up to 2.25" in capsys.readouterr().out
    record = json.loads((out / "calibration.json").read_text())
    assert record["calibration"]["radiotherapy"]["hypoxia"] == {"oxygen_enhancement_ratio": 2.25,
                                                                "dense_from": 0.6, "dense_to": 0.95,
                                                                "source": "assumed (settings.assumed_hypoxia)",
                                                                "oxygen_enhancement_ratio_fitted": False}


def test_fitted_clearance_and_oxygen_enhancement_reach_the_record_and_the_console(volume_files, tmp_path, capsys):
    """--fit-clearance always and --fit-hypoxia on real files, with radiotherapy between the scans."""
    a, b = volume_files["a"], volume_files["b"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "radiotherapy": {"start_day": 5, "fractions": 10, "total_dose_gy": 20}}))
    before = {p: p.read_bytes() for p in (a, b, plan)}
    out = tmp_path / "out"
    assert run("--history", f"{a}@0", f"{b}@30", "--plan", plan, "--days", "45", "--iterations", 2,
               "--fit-clearance", "always", "--hypoxia", "2.25", "--fit-hypoxia", "--out", out) == 0
    console = capsys.readouterr().out
    assert "half-life fitted" in console and "(ratio fitted)" in console
    rt = json.loads((out / "calibration.json").read_text())["calibration"]["radiotherapy"]
    assert rt["delayed_death"]["clearance_half_life_fitted"] is True
    assert rt["hypoxia"]["oxygen_enhancement_ratio_fitted"] is True
    assert 1.0 < rt["hypoxia"]["oxygen_enhancement_ratio"] < 4.0
    assert {p: p.read_bytes() for p in (a, b, plan)} == before
    with pytest.raises(SystemExit) as refused:  # argparse refuses an unknown choice
        run("--history", f"{a}@0", f"{b}@30", "--plan", plan, "--days", "45", "--fit-clearance", "sometimes",
            "--out", tmp_path / "bad")
    assert refused.value.code == 2 and "invalid choice: 'sometimes'" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_restart_density_choice_reaches_the_record(volume_files, tmp_path):
    """--restart-density: 'ordered' by default, 'coded' on request; calibration.json says which."""
    a, b = volume_files["a"], volume_files["b"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "radiotherapy": {"start_day": 5, "fractions": 10, "total_dose_gy": 20}}))
    for extra, expected in (((), True), (("--restart-density", "coded"), False)):
        out = tmp_path / f"out_{expected}"
        assert run("--history", f"{a}@0", f"{b}@30", "--plan", plan, "--days", "45", "--iterations", 1,
                   *extra, "--out", out) == 0
        settings = json.loads((out / "calibration.json").read_text())["calibration"]["settings"]
        assert settings["order_density"] is expected


@pytest.mark.parametrize("history, plan, days, phrase", [
    (["{a}@0"], "{plan}", "45", "at least 2"),
    (["{b}@30", "{a}@0"], "{plan}", "45", "increase in the order given"),
    (["{a}@0", "{b}@0"], "{plan}", "45", "same day"),
    (["{a}@0", "{root}/inputs/no_tumour.nii.gz@30"], "{plan}", "45", "has no tumour voxels"),
    (["{a}@0", "{root}/inputs/broken.nrrd@30"], "{plan}", "45", "broken.nrrd"),
    (["{a}@0", "{root}/inputs/missing.seg.nrrd@30"], "{plan}", "45", "not found"),
    (["{a}@0", "{b}"], "{plan}", "45", "has no day"),
    (["{a}@0", "{b}@soon"], "{plan}", "45", "is not a number"),
    (["{a}@0", "{b}@30"], "{root}/inputs/missing_plan.json", "45", "missing_plan.json"),
    (["{a}@0", "{b}@30"], "{plan}", "20", "after the last history scan"),
    (["{a}@0", "{b}@30"], "{plan}", "soon", "not a number"),
])
def test_bad_inputs_are_refused_clearly_before_any_output(volume_files, tmp_path, capsys, history, plan, days,
                                                          phrase):
    names = {k: str(v) for k, v in volume_files.items() if k in ("a", "b", "plan", "root")}
    out = tmp_path / "out"
    code = run("--history", *[h.format(**names) for h in history], "--plan", plan.format(**names), "--days", days,
               "--iterations", 1, "--out", out)
    err = capsys.readouterr().err
    assert code == 2 and phrase in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("value", ["2", "0", "nan"])
def test_absurd_visibility_threshold_is_refused_before_any_output(volume_files, tmp_path, capsys, value):
    a, b, plan = volume_files["a"], volume_files["b"], volume_files["plan"]
    out = tmp_path / "out"
    code = run("--history", f"{a}@0", f"{b}@30", "--plan", plan, "--days", "45", "--visibility-threshold", value,
               "--out", out)
    err = capsys.readouterr().err
    assert code == 2 and "--visibility-threshold" in err and "Traceback" not in err
    assert not out.exists()


def test_output_folder_that_is_a_file_or_an_input_is_refused(volume_files, capsys):
    a, b, plan = volume_files["a"], volume_files["b"], volume_files["plan"]
    assert run("--history", f"{a}@0", f"{b}@30", "--plan", plan, "--days", "45", "--out", plan) == 2
    assert "is a file" in capsys.readouterr().err
    copy = a.parent / "volumes.csv"
    copy.write_text("day\n")
    try:
        assert run("--history", f"{a}@0", f"{copy}@30", "--plan", plan, "--days", "45", "--out", a.parent,
                   "--force") == 2
        assert "is one of the inputs" in capsys.readouterr().err and copy.read_text() == "day\n"
    finally:
        copy.unlink()


def test_assumed_hypoxia_is_added_only_where_the_plan_has_none_and_is_checked():
    rt = {"start_day": 0, "fractions": 30, "total_dose_gy": 60}
    plain = load_plan({"version": 1, "radiotherapy": rt}, schema=BRAIN_SCHEMA)
    own = load_plan({"version": 1, "radiotherapy": {**rt, "hypoxia": {"oxygen_enhancement_ratio": 3.0,
                                                                       "dense_from": 0.5, "dense_to": 0.9}}},
                    schema=BRAIN_SCHEMA)
    added = C.with_hypoxia(plain, 2.0).radiotherapy.hypoxia
    assert (added.oxygen_enhancement_ratio, added.dense_from, added.dense_to) == (2.0, 0.6, 0.95)
    assert C.with_hypoxia(own, 2.0) is own and C.with_hypoxia(plain, None) is plain
    untreated = load_plan(None, schema=BRAIN_SCHEMA)
    assert C.with_hypoxia(untreated, 2.0) is untreated
    for bad in (0.5, 5.0, float("nan"), "2"):
        with pytest.raises(ParameterError, match="assumed_hypoxia"):
            C.CalibrationSettings(assumed_hypoxia=bad).check()
