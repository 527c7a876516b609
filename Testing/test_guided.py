"""Size-guided PDE forecasts and growth-probability maps (AnatomyDTLib.guided, ``anatomydt probability-map``).

Small 3D ellipsoid phantom (20 x 24 x 20 voxels of 5 mm), so every PDE run takes a fraction of a second.
Volumes and probabilities are recomputed independently from re-run PDE forecasts (AnatomyDTLib.solver.simulate).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from AnatomyDTLib.burden import BurdenParameters, bootstrap_burden, burden_volume, fit_burden, schedule_from_plan
from AnatomyDTLib.cli import main
from AnatomyDTLib.errors import Cancelled, InputError, ParameterError
from AnatomyDTLib.guided import (GuidedForecastWarning, guided_ensemble, growth_probability_map,
                                 volume_guided_forecast)
from AnatomyDTLib.io import read_image, write_labelmap
from AnatomyDTLib.parameters import PDEParameters
from AnatomyDTLib.phantom import ellipsoid_brain
from AnatomyDTLib.schema import BRAIN_SCHEMA
from AnatomyDTLib.solver import simulate
from AnatomyDTLib.state import labels_to_field

SHAPE = (20, 24, 20)
SPACING = (5.0, 5.0, 5.0)
VOXEL_ML = 0.125
DAY = 30.0
TUMOUR = BRAIN_SCHEMA.tumour_index


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny grids run fastest on one thread (and do not fight the other jobs on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantom():
    labels, _, geometry = ellipsoid_brain(shape=SHAPE, spacing_mm=SPACING, tumour_radius_mm=10.0)
    return labels, geometry, labels_to_field(labels, BRAIN_SCHEMA.num_classes)


def forecast_at(p0, growth_rate: float, plan=None) -> torch.Tensor:
    """Independent re-run of the PDE with the literature parameters and a given growth rate (1/day)."""
    params = PDEParameters.brain_defaults()
    params.growth_rate = growth_rate
    with torch.no_grad():
        return simulate(p0.float(), spacing=SPACING, days=[DAY], plan=plan, schema=BRAIN_SCHEMA,
                        **params.simulate_kwargs(p0.float(), BRAIN_SCHEMA))


def argmax_volume_ml(field: torch.Tensor) -> float:
    return float((field.argmax(dim=0) == TUMOUR).sum()) * VOXEL_ML


@pytest.mark.parametrize("target", [9.0, 16.0])
def test_guided_forecast_hits_target_volume(phantom, target):
    labels, _, p0 = phantom
    baseline_ml = float((labels == TUMOUR).sum()) * VOXEL_ML
    assert target > baseline_ml
    result = volume_guided_forecast(p0, SPACING, DAY, target)
    tolerance = max(0.02 * target, 0.5)
    assert result.tolerance_ml == pytest.approx(tolerance)
    assert result.within_tolerance and not result.clamped
    assert abs(argmax_volume_ml(result.field) - target) <= tolerance
    assert result.volume_ml == argmax_volume_ml(result.field)
    # the growth rate it reports reproduces the field when the PDE is run again independently
    again = forecast_at(p0, result.growth_rate_per_day)
    assert torch.allclose(again, result.field, atol=1e-5)
    assert result.pde_runs <= 15


def test_larger_target_needs_faster_growth(phantom):
    _, _, p0 = phantom
    small = volume_guided_forecast(p0, SPACING, DAY, 8.0)
    large = volume_guided_forecast(p0, SPACING, DAY, 12.0)
    assert large.growth_rate_per_day > small.growth_rate_per_day


def test_volume_jump_across_the_target_is_reported_honestly(phantom):
    """On this symmetric phantom the argmax volume jumps from 13.4 to above 14.5 mL (a whole shell of voxels):
    a 14 mL target cannot be met; the closer end is returned, flagged, with a warning."""
    _, _, p0 = phantom
    with pytest.warns(GuidedForecastWarning, match="approximately"):
        result = volume_guided_forecast(p0, SPACING, DAY, 14.0)
    assert not result.within_tolerance and not result.clamped
    rate = result.growth_rate_per_day
    below, above = (argmax_volume_ml(forecast_at(p0, r)) for r in (rate - 1.5e-4, rate + 1.5e-4))
    assert below < 14.0 - result.tolerance_ml and above > 14.0 + result.tolerance_ml
    assert result.volume_ml == argmax_volume_ml(forecast_at(p0, rate))


def test_unreachable_target_raises_or_clamps(phantom):
    _, _, p0 = phantom
    with pytest.raises(ParameterError, match="above the volume the model reaches"):
        volume_guided_forecast(p0, SPACING, DAY, 5000.0, growth_rate_range=(0.0, 0.2))
    with pytest.raises(ParameterError, match="below the volume the model reaches without growth"):
        volume_guided_forecast(p0, SPACING, DAY, 0.2)
    with pytest.warns(GuidedForecastWarning, match="clamped"):
        clamped = volume_guided_forecast(p0, SPACING, DAY, 5000.0, growth_rate_range=(0.0, 0.2),
                                         on_unreachable="clamp")
    assert clamped.clamped and not clamped.within_tolerance
    assert clamped.growth_rate_per_day == 0.2
    assert clamped.volume_ml == argmax_volume_ml(forecast_at(p0, 0.2))


def test_bad_inputs_are_refused(phantom):
    labels, _, p0 = phantom
    no_tumour = labels.copy()
    no_tumour[no_tumour == TUMOUR] = BRAIN_SCHEMA.index("white_matter")
    with pytest.raises(InputError, match="no tumour"):
        volume_guided_forecast(labels_to_field(no_tumour, 5), SPACING, DAY, 10.0)
    with pytest.raises(ParameterError, match="> 0"):
        volume_guided_forecast(p0, SPACING, 0.0, 10.0)
    with pytest.raises(ParameterError, match="> 0 mL"):
        volume_guided_forecast(p0, SPACING, DAY, -1.0)
    with pytest.raises(InputError, match="shape"):
        volume_guided_forecast(p0[:3], SPACING, DAY, 10.0)
    with pytest.raises(InputError, match="learned model"):
        volume_guided_forecast(p0, SPACING, DAY, 10.0, model=object())


def test_cancel_stops_during_a_pde_run(phantom):
    _, _, p0 = phantom
    polls = []

    def cancel() -> bool:
        polls.append(1)
        return len(polls) > 3  # after three solver steps of the first batch

    with pytest.raises(Cancelled):
        guided_ensemble(p0, SPACING, DAY, [8.0, 12.0], cancel=cancel)
    assert len(polls) == 4


def test_probability_map_is_the_member_average(phantom):
    labels, _, p0 = phantom
    targets = [7.0, 10.0, 13.0, 16.0]
    ens = guided_ensemble(p0, SPACING, DAY, targets)
    prob = ens.probability
    assert prob.dtype == np.float32 and prob.shape == SHAPE
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    assert set(np.unique(prob * 4).round(6)) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    assert ens.within_tolerance.all() and not ens.clamped.any()
    assert np.all(np.diff(ens.growth_rates_per_day) > 0)
    # independent aggregation: re-run each member's PDE and average its argmax tumour mask
    masks = [(forecast_at(p0, r).argmax(dim=0) == TUMOUR).numpy() for r in ens.growth_rates_per_day]
    np.testing.assert_array_equal(prob, np.mean(masks, axis=0).astype(np.float32))
    # monotone sanity: the baseline tumour keeps growing, so its voxels are tumour in every member
    assert np.all(prob[labels == TUMOUR] == 1.0)
    # far from the tumour (the other hemisphere's white matter) nothing is tumour
    far = np.zeros(SHAPE, dtype=bool)
    far[:, :, :6] = True
    assert np.all(prob[far] == 0.0)
    assert (prob.sum() * VOXEL_ML) == pytest.approx(ens.volumes_ml.mean(), rel=1e-6)


def test_probability_map_from_a_burden_bootstrap_uses_stratified_members(phantom):
    _, _, p0 = phantom
    days = np.array([-40.0, -20.0, 0.0])
    truth = BurdenParameters(4.25, 0.02)
    fit = fit_burden(days, burden_volume(days, truth, schedule_from_plan(None)) * np.array([1.02, 0.97, 1.0]))
    boot = bootstrap_burden(fit, 200, seed=0)
    prob = growth_probability_map(p0, SPACING, DAY, boot, members=3)
    ens = guided_ensemble(p0, SPACING, DAY, boot, members=3)
    np.testing.assert_array_equal(prob, ens.probability)
    np.testing.assert_allclose(ens.targets_ml, boot.volume_quantiles(DAY, 3))
    assert np.all(np.abs(ens.volumes_ml - ens.targets_ml) <= ens.tolerances_ml)


def test_guided_forecast_under_treatment(phantom):
    """Radiotherapy shrinks the tumour; the growth rate is steered to the (smaller) target under the plan."""
    labels, _, p0 = phantom
    plan = {"radiotherapy": {"start_day": 5, "fractions": 10, "dose_per_fraction_gy": 2.0}}
    target = 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuidedForecastWarning)
        result = volume_guided_forecast(p0, SPACING, DAY, target, plan=plan)
    assert abs(result.volume_ml - target) <= result.tolerance_ml
    again = forecast_at(p0, result.growth_rate_per_day, plan=plan)
    assert argmax_volume_ml(again) == result.volume_ml


def test_cli_probability_map_round_trip(tmp_path, phantom, capsys):
    labels, geometry, _ = phantom
    write_labelmap(tmp_path / "seg.nii.gz", labels, geometry)
    (tmp_path / "v.csv").write_text("day,volume_ml\n-40,1.9\n-20,2.85\n0,4.25\n")
    (tmp_path / "plan.json").write_text(json.dumps({"version": 1}))
    out = tmp_path / "map.nii.gz"
    argv = ["probability-map", "--segmentation", str(tmp_path / "seg.nii.gz"), "--volumes", str(tmp_path / "v.csv"),
            "--plan", str(tmp_path / "plan.json"), "--day", str(DAY), "--members", "4", "--bootstrap", "100",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 members" in printed and "R² =" in printed
    prob, geo = read_image(out)
    assert geo.matches(geometry) and prob.shape == labels.shape
    assert prob.dtype == np.float32 and prob.min() >= 0.0 and prob.max() <= 1.0
    assert np.all(prob[labels == TUMOUR] == 1.0) and prob.max() == 1.0
    # the same map from the library with the same inputs
    from AnatomyDTLib.burden import read_volumes_csv

    days, vols = read_volumes_csv(tmp_path / "v.csv")
    boot = bootstrap_burden(fit_burden(days, vols, None), 100, seed=0)
    ref = growth_probability_map(labels_to_field(labels, 5), SPACING, DAY, boot, members=4)
    np.testing.assert_array_equal(prob, ref)
    # refusals: existing output without --force, a segmentation file as output
    stamp = out.stat().st_mtime_ns
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    assert out.stat().st_mtime_ns == stamp
    bad = argv[:-1] + [str(tmp_path / "map.seg.nrrd")]
    assert main(bad) == 2 and "float image" in capsys.readouterr().err
