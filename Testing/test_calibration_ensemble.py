"""How sure a calibrated forecast is (AnatomyDTLib.calibration_ensemble, ``calibrate --ensemble``).

The patient is the irradiated slice patient of test_calibration: 20 fractions on days 2-27, killed
cells visible 14 days, then cleared with a half-life of 21 days, seen on days 0, 30, 50 and 80. The
plan given to the calibration has no delayed death, so it assumes one and the ensemble draws it.
Every aggregate of the ensemble is recomputed here from single forecasts made with the library's
public functions.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from AnatomyDTLib import calibration as C
from AnatomyDTLib import calibration_ensemble as E
from AnatomyDTLib.burden import PRIORS
from AnatomyDTLib.errors import ParameterError
from AnatomyDTLib.schema import BRAIN_SCHEMA
from test_calibration import _irradiated_history, _irradiated_plan, run

os.environ["ANATOMYDT_NO_PROGRESS"] = "1"
TUMOUR = BRAIN_SCHEMA.tumour_index
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plan_without_delayed_death() -> dict:
    plan = _irradiated_plan()
    del plan["radiotherapy"]["delayed_death"]
    return plan


@pytest.fixture(scope="module")
def two_scan_fit():
    """Calibrated on days 0 and 30 (inside the delay: the scans cannot show the clearance)."""
    scans = _irradiated_history()
    calibration = C.calibrate(scans[:2], _plan_without_delayed_death(), settings=C.CalibrationSettings(iterations=6))
    return scans, calibration


def test_replaying_the_calibrations_own_assumption_gives_back_its_forecast_state(two_scan_fit):
    _, calibration = two_scan_fit
    rt = calibration.plan.radiotherapy.delayed_death
    same = C.with_assumed_delayed_death(calibration, rt.delay_days, rt.clearance_half_life_days)
    assert same.carried is not None and calibration.carried is not None
    np.testing.assert_allclose(same.carried.dying_share, calibration.carried.dying_share, atol=1e-6)
    assert len(same.carried.pending) == len(calibration.carried.pending)
    for (d1, m1), (d2, m2) in zip(same.carried.pending, calibration.carried.pending):
        assert d1 == pytest.approx(d2) and np.allclose(m1, m2, atol=1e-6)
    assert [f.tumour_dice for f in same.fits] == pytest.approx([f.tumour_dice for f in calibration.fits], abs=1e-9)
    assert same.parameters == calibration.parameters  # nothing is refitted


def test_a_longer_delay_keeps_more_cohorts_pending_at_the_last_scan(two_scan_fit):
    """Fractions on days 2-27, last scan on day 30: with a delay of 7.5 days the cohorts of days
    23-27 are pending (released after day 30), with 26.5 days all from day 4 on; the forecast of
    day 80 keeps more tumour when the killed cells stay visible longer and clear more slowly."""
    _, calibration = two_scan_fit
    fractions = _irradiated_plan()["radiotherapy"]["fraction_days"]
    short = C.with_assumed_delayed_death(calibration, 7.5, 10.0)
    long = C.with_assumed_delayed_death(calibration, 26.5, 45.0)
    assert len(short.carried.pending) == sum(d + 7.5 > 30.0 for d in fractions) == 5
    assert len(long.carried.pending) == sum(d + 26.5 > 30.0 for d in fractions) == len(fractions) - 2
    assert long.plan.radiotherapy.delayed_death.clearance_half_life_days == pytest.approx(45.0)
    volume = {name: C.forecast(c, [80.0]).volumes_ml()[1][1]["tumour"] for name, c in (("short", short),
                                                                                      ("long", long))}
    assert volume["long"] > volume["short"] + 0.1 * volume["long"]


def test_draws_are_stratified_seeded_and_inside_the_priors(two_scan_fit):
    _, calibration = two_scan_fit
    draws = E.delayed_death_draws(calibration, 10, seed=3)
    assert draws == E.delayed_death_draws(calibration, 10, seed=3)
    assert draws != E.delayed_death_draws(calibration, 10, seed=4)
    for name, values in (("death_delay_days", [d.delay_days for d in draws]),
                         ("clearance_half_life_days", [d.half_life_days for d in draws])):
        prior = PRIORS[name]
        unit = (np.asarray(values) - prior.low) / (prior.high - prior.low)
        assert ((unit >= 0) & (unit < 1)).all()
        assert sorted(np.floor(unit * 10).astype(int)) == list(range(10))  # one member per tenth of the range
    # A fitted half-life is kept; only the delay is drawn.
    fitted = replace(calibration, clearance_fitted=True)
    kept = calibration.plan.radiotherapy.delayed_death.clearance_half_life_days
    assert E.drawn_assumptions(fitted) == ("death_delay_days",)
    assert {d.half_life_days for d in E.delayed_death_draws(fitted, 4)} == {kept}


def test_nothing_to_draw_or_a_bad_member_count_is_refused(two_scan_fit):
    scans, calibration = two_scan_fit
    stated = C.calibrate(scans[:2], _irradiated_plan(), settings=C.CalibrationSettings(iterations=0))
    with pytest.raises(ParameterError, match="plan states the delayed death"):
        E.forecast_ensemble(stated, [80.0], members=4)
    untreated = C.calibrate(scans[:2], None, settings=C.CalibrationSettings(iterations=0))
    with pytest.raises(ParameterError, match="no radiotherapy"):
        E.forecast_ensemble(untreated, [80.0], members=4)
    for members in (1, 0, 257, 4.0, True):
        with pytest.raises(ParameterError, match="between 2 and 256 members"):
            E.delayed_death_draws(calibration, members)
    with pytest.raises(ParameterError, match="half-life > 0"):
        C.with_assumed_delayed_death(calibration, 14.0, 0.0)


def test_ensemble_maps_and_band_are_those_of_its_members_and_hold_the_truth(two_scan_fit):
    """The probability map is the mean of the members' tumour masks and the volumes theirs (each
    member forecast again here). On this patient, calibrated inside the delay, every forecast of
    day 80 is too large (the point forecast 50 pixels, the truth 14); the band is wide enough to
    hold the true volume, and the map says where it is unsure (0 < p < 1) around the truth."""
    scans, calibration = two_scan_fit
    ensemble = E.forecast_ensemble(calibration, [50.0, 80.0], members=6, seed=1)
    assert ensemble.days == [50.0, 80.0] and ensemble.members == 6 and ensemble.tumour_probability.shape == (
        2,) + scans[0].labels.shape
    masks, volumes = [], []
    for draw in ensemble.draws:
        member = C.forecast(C.with_assumed_delayed_death(calibration, draw.delay_days, draw.half_life_days),
                            [50.0, 80.0])
        masks.append(np.stack([member.labels(i) == TUMOUR for i in range(2)]))
        volumes.append([v["tumour"] for _, v in member.volumes_ml()[1:]])
    np.testing.assert_allclose(ensemble.tumour_probability, np.mean(masks, axis=0), atol=1e-7)
    np.testing.assert_allclose(ensemble.tumour_ml, volumes, rtol=1e-9)
    band = ensemble.volume_band()[1]
    assert band["median_ml"] == pytest.approx(np.median(np.asarray(volumes)[:, 1]))
    assert band["p5_ml"] == pytest.approx(np.percentile(np.asarray(volumes)[:, 1], 5))
    assert band["max_ml"] > band["min_ml"]  # the draws matter for a shrinking lesion

    truth = scans[3].labels == TUMOUR
    true_ml = truth.sum() * scans[3].geometry.voxel_volume_ml
    assert band["p5_ml"] <= true_ml <= band["p95_ml"]
    assert (ensemble.tumour_probability[1][truth] > 0).mean() >= 0.95
    unsure = (ensemble.tumour_probability[1] > 0) & (ensemble.tumour_probability[1] < 1)
    assert unsure.sum() >= truth.sum()
    summary = ensemble.to_dict()
    assert summary["members"] == 6 and len(summary["draws"]) == 6 and summary["drawn"] == [
        "death_delay_days", "clearance_half_life_days"]
    assert summary["volume_band_ml"][1]["median_ml"] == pytest.approx(band["median_ml"], abs=1e-4)


def _irradiated_files(tmp_path) -> tuple:
    from AnatomyDTLib.io import write_labelmap

    scans = _irradiated_history()
    paths = []
    for scan in scans[:2]:
        path = tmp_path / f"{scan.name}.seg.nrrd"
        write_labelmap(path, scan.labels, scan.geometry, BRAIN_SCHEMA)
        paths.append(path)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_plan_without_delayed_death()))
    return paths, plan


def test_cli_ensemble_writes_probability_maps_and_the_band(tmp_path, capsys):
    (a, b), plan = _irradiated_files(tmp_path)
    out = tmp_path / "out"
    assert run("--history", f"{a}@0", f"{b}@30", "--plan", plan, "--days", "50,80", "--iterations", 2,
               "--ensemble", 4, "--ensemble-seed", 2, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "ensemble of 4 over the death delay and clearance half-life priors (seed 2)" in printed
    for day in (50, 80):
        image = sitk.ReadImage(str(out / f"forecast_day{day}_tumour_probability.nii.gz"))
        values = sitk.GetArrayFromImage(image)
        assert set(np.unique(values)) <= {0.0, 0.25, 0.5, 0.75, 1.0} and values.max() == 1.0
        assert image.GetSpacing()[:2] == pytest.approx((1.5, 1.5))
    with open(out / "volume_band.csv") as fh:
        band = list(csv.DictReader(fh))
    assert [r["day"] for r in band] == ["50", "80"] and all(r["members"] == "4" for r in band)
    assert all(float(r["p5_tumour_ml"]) <= float(r["median_tumour_ml"]) <= float(r["p95_tumour_ml"]) for r in band)
    record = json.loads((out / "calibration.json").read_text())
    assert record["ensemble"]["members"] == 4 and record["ensemble"]["seed"] == 2
    assert "volume_band.csv" in record["outputs"]
    with open(out / "volumes.csv") as fh:
        point = {r["day"]: float(r["tumour_ml"]) for r in csv.DictReader(fh)}
    assert float(band[1]["point_forecast_tumour_ml"]) == pytest.approx(point["80"], abs=1e-3)
    # A probability map from an earlier run is an output too: refused without --force, even without --ensemble.
    again = tmp_path / "again"
    again.mkdir()
    stale = again / "forecast_day80_tumour_probability.nii.gz"
    stale.write_bytes((out / stale.name).read_bytes())
    assert run("--history", f"{a}@0", f"{b}@30", "--plan", plan, "--days", "50", "--iterations", 1,
               "--out", again) == 2
    assert stale.name in capsys.readouterr().err and sorted(again.iterdir()) == [stale]


@pytest.mark.parametrize("plan_kind, extra, phrase", [
    ("stated", [], "the plan states it"), ("none", [], "no radiotherapy"),
    ("assumed", ["--delayed-death", "none"], "assumes none (--delayed-death none"),
    ("assumed", ["--ensemble", 1], "between 2 and 256")])
def test_cli_ensemble_without_anything_to_draw_is_refused_before_any_output(tmp_path, capsys, plan_kind, extra,
                                                                            phrase):
    (a, b), plan = _irradiated_files(tmp_path)
    if plan_kind == "stated":
        plan.write_text(json.dumps(_irradiated_plan()))
    out = tmp_path / "out"
    options = ["--history", f"{a}@0", f"{b}@30", "--plan", "none" if plan_kind == "none" else plan, "--days", "80",
               "--iterations", 1, "--ensemble", 4, *extra, "--out", out]
    assert run(*options) == 2
    assert phrase in capsys.readouterr().err and not out.exists()


def test_benchmark_scores_of_a_probability_map_match_a_hand_count():
    """benchmarks/calibration_phantom.py's ensemble scores on a 2 x 5 map whose counts are written out."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration_phantom.py"
    spec = importlib.util.spec_from_file_location("calibration_phantom", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    p = np.array([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.0, 0.05, 0.0])
    truth = np.array([0, 0, 0, 1, 1, 1, 0, 1, 0, 0], bool)
    point = np.array([0, 0, 0, 0, 1, 1, 1, 0, 0, 0], bool)
    last = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0], bool)
    p, truth, point, last = (a.reshape(2, 5) for a in (p, truth, point, last))
    scores = bench.ensemble_scores(p, point, last, truth, (1.0, 1.0), 10.0, 0.001)
    p, truth, point = p.ravel(), truth.ravel(), point.ravel()
    region = [2, 3, 4, 5, 6, 7, 8]  # last | truth | point | p > 0
    brier = np.mean([(p[i] - float(truth[i])) ** 2 for i in region])
    assert scores["brier"] == pytest.approx(brier)
    assert scores["point_brier"] == pytest.approx(np.mean([float(point[i] != truth[i]) for i in region]))
    assert scores["truth_recall"] == pytest.approx(3 / 4) and scores["point_truth_recall"] == pytest.approx(2 / 4)
    assert scores["majority_dice"] == pytest.approx(2 * 3 / (4 + 4))  # p >= 0.5 at 3, 4, 5, 6
    # bins: p = 0 (index 7), (0, 0.1] (0.05), (0.2, 0.3] (0.25), (0.4, 0.5] (0.5), (0.7, 0.8], (0.9, 1] (two)
    assert scores["bin_voxels"] == "1;1;0;1;0;1;0;0;1;0;2"
    assert scores["bin_tumour"] == "1;0;0;0;0;1;0;0;1;0;1"
