"""benchmarks/calibration_simulator_oracle.py: the generator-as-forecaster bound of the calibration target.

The scoring is checked on hand-made masks against counts done here (not through the script's own
helpers or AnatomyDTLib.metrics); the replay is checked on a real phantom patient: replaying it
with its own response values reproduces its scans exactly, so a draw at the truth fits the history
and the forecast perfectly. One small end-to-end run writes and re-reads the outputs.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from AnatomyDTLib.brain.phantom import BIOLOGY_RANGES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def oracle():
    spec = importlib.util.spec_from_file_location("calibration_simulator_oracle",
                                                  ROOT / "benchmarks" / "calibration_simulator_oracle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _count_dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo:hi, lo:hi] = True
    return m


def test_response_draws_are_stratified_inside_the_prior(oracle):
    draws = oracle.prior_draws(oracle.RESPONSE, 32, seed=3)
    assert draws == oracle.prior_draws(oracle.RESPONSE, 32, seed=3)
    assert draws != oracle.prior_draws(oracle.RESPONSE, 32, seed=4)
    for name in oracle.RESPONSE:
        values = np.array([d[name] for d in draws])
        lo, hi = BIOLOGY_RANGES[name]
        assert ((values >= lo) & (values <= hi)).all()
        # Latin hypercube: one draw in each of the 32 equal slices of the range
        slices = np.floor((values - lo) / (hi - lo) * 32).astype(int)
        assert sorted(slices) == list(range(32))


def test_growth_draws_are_log_uniform_and_keep_the_phantoms_front_speed_range(oracle):
    names = oracle.GROWTH + oracle.RESPONSE
    draws = oracle.prior_draws(names, 400, seed=1)
    assert 50 < len(draws) < 400  # some (D, rho) pairs fall outside the accepted front speeds
    speeds = np.array([2 * np.sqrt(d["diffusion_wm_mm2_per_day"] * d["proliferation_per_day"]) for d in draws])
    assert speeds.min() >= 0.02 and speeds.max() <= 0.15
    lo, hi = BIOLOGY_RANGES["diffusion_wm_mm2_per_day"]
    d = np.array([x["diffusion_wm_mm2_per_day"] for x in oracle.prior_draws(("diffusion_wm_mm2_per_day",), 400, 2)])
    # log-uniform: the geometric midpoint splits the draws in half (a uniform draw would put ~11 % below it)
    assert abs((d < np.sqrt(lo * hi)).mean() - 0.5) < 0.01


def test_bayes_forecast_is_the_best_vote_level_against_the_members(oracle):
    shape = (12, 12)
    members = [_box(shape, 2, 8), _box(shape, 3, 8), _box(shape, 3, 9), _box(shape, 5, 6)]
    forecast, expected = oracle.bayes_forecast(members)
    votes = np.sum(members, axis=0)
    by_level = {j: np.mean([_count_dice(votes >= j, m) for m in members]) for j in range(1, 5)}
    best = max(by_level, key=by_level.get)
    np.testing.assert_array_equal(forecast, votes >= best)
    assert expected == pytest.approx(by_level[best])


def test_score_case_accepts_the_best_history_fits_that_keep_a_visible_tumour(oracle):
    shape = (16, 16)
    baseline, scan1, target = _box(shape, 2, 12), _box(shape, 3, 11), _box(shape, 5, 9)
    empty = np.zeros(shape, bool)
    case = {"case": "case_x", "pattern": "stupp", "days": "0/30/60", "masks": [baseline, scan1, target],
            "no_change_dice": _count_dice(scan1, target), "voxel_ml": 0.008,
            "truth": {k: BIOLOGY_RANGES[k][0] for k in oracle.RESPONSE}}
    draws = [{k: BIOLOGY_RANGES[k][0] + i * 1e-3 for k in oracle.RESPONSE} for i in range(4)]
    masks = [[baseline, scan1, empty],             # perfect history, but the tumour is gone: never accepted
             [baseline, _box(shape, 3, 10), target],
             [baseline, _box(shape, 4, 10), _box(shape, 6, 9)],
             [baseline, _box(shape, 1, 13), _box(shape, 2, 12)]]
    row = oracle.score_case(case, draws, masks, history_scans=2, accept=2, tolerances=(0.3, 0.01))
    fits = [_count_dice(m[1], scan1) for m in masks]
    assert row["draws_visible_at_forecast"] == 3 and row["accepted"] == 2
    # accepted: draws 1 and 2 (the best fits among the visible ones; draw 0 fits best but is empty)
    assert row["accepted_history_dice_min"] == pytest.approx(min(fits[1], fits[2]))
    assert row["accepted_history_dice_max"] == pytest.approx(max(fits[1], fits[2]))
    assert row["best_accepted_dice"] == pytest.approx(1.0)
    assert row["best_any_dice"] == pytest.approx(1.0)
    assert row["accepted_at_target"] == sum(_count_dice(masks[i][2], target) >= 0.8 for i in (1, 2))
    assert row["nearest_draw_dice"] == pytest.approx(0.0)  # draw 0 is nearest to the truth's values
    votes = masks[1][2].astype(int) + masks[2][2]
    levels = {j: np.mean([_count_dice(votes >= j, masks[i][2]) for i in (1, 2)]) for j in (1, 2)}
    best = max(levels, key=levels.get)
    assert row["bayes_expected_dice"] == pytest.approx(levels[best])
    assert row["bayes_dice"] == pytest.approx(_count_dice(votes >= best, target))
    # tolerance 0.3: every visible draw with history Dice >= 0.7 (draws 1 and 2; draw 3 fits at 0.62)
    assert fits[3] < 0.7 <= min(fits[1], fits[2]) and fits[0] == 1.0
    assert row["within_0.3"] == 2
    assert row["bayes_dice_within_0.3"] == pytest.approx(row["bayes_dice"])
    assert row["lowest_dice_within_0.3"] == pytest.approx(min(_count_dice(masks[i][2], target) for i in (1, 2)))
    assert row["highest_dice_within_0.3"] == pytest.approx(1.0)
    # tolerance 0.01: only draw 0 fits that closely, and its tumour is gone at the forecast scan
    assert row["within_0.01"] == 0 and np.isnan(row["bayes_dice_within_0.01"])
    assert np.isnan(row["lowest_dice_within_0.01"])


def test_replaying_a_patient_with_its_own_response_reproduces_its_scans(oracle):
    case = oracle.hard_case(7, 17, history_scans=2)
    assert case is not None and case["pattern"] == "stupp"
    assert case["no_change_dice"] == pytest.approx(_count_dice(case["masks"][1], case["masks"][2]))
    assert case["no_change_dice"] <= oracle.HARD_CASE_NO_CHANGE_DICE
    replayed = oracle.replay(7, 17, 2, case["truth"])
    for a, b in zip(replayed, case["masks"]):
        np.testing.assert_array_equal(a, b)
    assert oracle.history_fit(replayed, case["masks"], 2) == 1.0
    assert oracle.history_fit(replayed, case["masks"], 2, first=0) == 1.0
    assert oracle.hard_case(7, 1, history_scans=2) is None  # case_0001: no change scores 0.92


def test_end_to_end_writes_its_tables_and_refuses_to_overwrite(oracle, tmp_path, capsys):
    out = tmp_path / "oracle"
    args = ["--cases", "17", "--draws", "4", "--accept", "2", "--workers", "1", "--out", str(out)]
    assert oracle.main(args) == 0
    with open(out / "per_case.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case"] for r in rows] == ["case_0017"] and int(rows[0]["accepted"]) <= 2
    assert 0.0 <= float(rows[0]["bayes_dice"]) <= 1.0
    assert "calibration_simulator_oracle.py --cases 17" in (out / "summary.md").read_text()
    with pytest.raises(SystemExit):
        oracle.main(args)
    assert "--force" in capsys.readouterr().err
