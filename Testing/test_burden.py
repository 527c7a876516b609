"""Tumour-burden model (AnatomyDTLib.burden) and ``anatomydt forecast-burden``.

The exact solution is checked against an independent numerical integration of the compartment
ODEs, the fit against known parameters, the vectorised bootstrap refit against
scipy.optimize.least_squares, and the 90 % band's coverage on synthetic patients.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.optimize import least_squares

from AnatomyDTLib import burden as B
from AnatomyDTLib.burden import (BurdenParameters, bootstrap_burden, burden_volume, fit_burden,
                                 identifiable_parameters, read_volumes_csv, refit_batch, schedule_from_plan)
from AnatomyDTLib.cli import main
from AnatomyDTLib.errors import InputError, ParameterError
from AnatomyDTLib.plan import load_plan, stupp_plan

LN2 = math.log(2.0)


def plan_with(surgery=None, extent=None, rt_start=None, fractions=30, chemo=None, delayed=None) -> dict:
    plan: dict = {"version": 1}
    if surgery is not None:
        plan["surgery"] = [{"day": surgery, "extent": extent if extent is not None else 0.8}]
    if rt_start is not None:
        plan["radiotherapy"] = {"start_day": rt_start, "fractions": fractions, "dose_per_fraction_gy": 2.0}
        if delayed is not None:
            plan["radiotherapy"]["delayed_death"] = {"delay_days": delayed[0], "clearance_half_life_days": delayed[1]}
    if chemo is not None:
        plan["chemotherapy"] = [{"agent": "temozolomide", "kill_rate_per_day": chemo[2], "windows": [[chemo[0], chemo[1]]]}]
    return plan


# ----------------------------------------------------------------------------------------------
# The exact solution
# ----------------------------------------------------------------------------------------------

def reference_volume(days, p: BurdenParameters, plan: dict) -> np.ndarray:
    """Independent reference: integrate L' = (rho - k(t)) L and the dying cohorts numerically (solve_ivp),
    applying fractions and surgeries as jumps at the start of their day (after that day's scan)."""
    tp = load_plan(plan)
    fractions = list(tp.radiotherapy.fraction_days) if tp.radiotherapy else []
    surgeries = [s.day for s in tp.surgeries]
    windows = [(a, b, c.kill_rate_per_day) for c in tp.chemotherapy for a, b in c.windows]
    lam = LN2 / p.clearance_half_life_days
    sf = p.rt_survival ** (1.0 / len(fractions)) if fractions else 1.0

    def kill(t):
        return sum(rate for a, b, rate in windows if a <= t < b)

    def rhs(t, y):
        out = np.zeros_like(y)
        out[0] = (p.rho_per_day - kill(t)) * y[0]
        for i, f in enumerate(fractions):
            if t >= f + p.death_delay_days:
                out[1 + i] = -lam * y[1 + i]
        return out

    breaks = sorted(set([0.0] + fractions + surgeries + [f + p.death_delay_days for f in fractions]
                        + [x for a, b, _ in windows for x in (a, b)]))
    y = np.zeros(1 + len(fractions))
    y[0] = p.v0_ml
    t_now = 0.0
    results = {}
    targets = sorted(days)
    events = sorted(set(fractions + surgeries))
    for d in targets:
        while True:
            nxt = min([e for e in breaks if e > t_now] + [d]) if t_now < d else d
            # events at t_now act before integrating on (jumps happen once per event day)
            if t_now in events and (t_now, "done") not in results:
                results[(t_now, "done")] = True
                if t_now in surgeries:
                    y = y * p.surgery_residual
                for i, f in enumerate(fractions):
                    if f == t_now:
                        hit = (1 - sf) * y[0]
                        y[0] -= hit
                        y[1 + i] += hit
            if nxt <= t_now:
                break
            sol = solve_ivp(rhs, (t_now, nxt), y, rtol=1e-11, atol=1e-12, method="DOP853")
            y = sol.y[:, -1]
            t_now = nxt
            if t_now >= d:
                break
        results[d] = y.sum()
    return np.array([results[d] for d in days])


@pytest.mark.parametrize("plan", [
    plan_with(),
    plan_with(rt_start=20, fractions=10),
    plan_with(surgery=5, extent=0.7, rt_start=30, fractions=6, chemo=(30, 45, 0.03)),
    plan_with(rt_start=10, fractions=5, delayed=(3.0, 8.0), chemo=(5, 60, 0.02)),
])
def test_exact_solution_matches_numerical_integration(plan):
    p = BurdenParameters(12.0, 0.02, 0.25, 0.3, 15.0, 9.0)
    schedule = schedule_from_plan(plan)
    if schedule.delay_days is not None:
        p = BurdenParameters(12.0, 0.02, 0.25, 0.3, schedule.half_life_days, schedule.delay_days)
    days = [0.0, 4.5, 7.0, 20.0, 21.0, 33.0, 60.0, 100.5]
    np.testing.assert_allclose(burden_volume(days, p, schedule), reference_volume(days, p, plan), rtol=1e-7)


def test_single_fraction_is_seed_002_split_at_rt_start():
    """F = 1: at RT start the tumour splits into s V (keeps growing) and (1 - s) V (decays after the delay)."""
    plan = {"radiotherapy": {"fraction_days": [30.0], "dose_per_fraction_gy": 2.0}}
    v0, rho, s, half, delay = 8.0, 0.015, 0.4, 20.0, 10.0
    p = BurdenParameters(v0, rho, s, 1.0, half, delay)
    t = np.array([10.0, 30.0, 35.0, 40.0, 55.0, 120.0])
    at_rt = v0 * math.exp(rho * 30.0)
    hand = np.where(t <= 30.0, v0 * np.exp(rho * t),
                    s * at_rt * np.exp(rho * (t - 30.0))
                    + (1 - s) * at_rt * np.exp(-LN2 / half * np.clip(t - 30.0 - delay, 0, None)))
    np.testing.assert_allclose(burden_volume(t, p, schedule_from_plan(plan)), hand, rtol=1e-12)


def test_timing_convention_volume_on_event_day_is_before_the_event():
    schedule = schedule_from_plan(plan_with(surgery=10, extent=0.9))
    p = BurdenParameters(10.0, 0.0, 1.0, 0.1)
    v = burden_volume([10.0, 10.5], p, schedule)
    assert v[0] == pytest.approx(10.0) and v[1] == pytest.approx(1.0)


def test_batched_parameters_give_rows():
    schedule = schedule_from_plan(stupp_plan(28))
    batch = BurdenParameters(np.array([5.0, 10.0]), np.array([0.01, 0.02]), np.array([0.3, 0.5]), np.ones(2),
                             np.array([20.0, 30.0]), np.array([10.0, 14.0]))
    out = burden_volume([0, 50, 100], batch, schedule)
    assert out.shape == (2, 3)
    for i in range(2):
        single = BurdenParameters(*(float(np.asarray(getattr(batch, n))[i]) for n in B.PARAMETER_NAMES))
        np.testing.assert_allclose(out[i], burden_volume([0, 50, 100], single, schedule), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# Fitting and identifiability
# ----------------------------------------------------------------------------------------------

def test_two_untreated_points_recover_v0_and_rho_exactly():
    fit = fit_burden([0.0, 40.0], [10.0, 10.0 * math.exp(0.02 * 40)])
    assert fit.free == ["v0_ml", "rho_per_day"]
    assert fit.parameters.v0_ml == pytest.approx(10.0, rel=1e-6)
    assert fit.parameters.rho_per_day == pytest.approx(0.02, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0) and any("as many free parameters" in n for n in fit.notes)


def test_noise_free_rt_data_recover_all_free_parameters():
    plan = stupp_plan(20)
    schedule = schedule_from_plan(plan)
    truth = BurdenParameters(15.0, 0.012, 0.35, 1.0, 25.0, 14.0)
    days = np.array([-30.0, 0.0, 20.0, 50.0, 80.0, 110.0, 150.0, 200.0])
    fit = fit_burden(days, burden_volume(days, truth, schedule), plan)
    assert fit.free == ["v0_ml", "rho_per_day", "rt_survival", "clearance_half_life_days"]
    for name, tol in (("v0_ml", 1e-4), ("rho_per_day", 1e-4), ("rt_survival", 1e-3), ("clearance_half_life_days", 1e-3)):
        assert getattr(fit.parameters, name) == pytest.approx(getattr(truth, name), rel=tol), name
    assert fit.r2 == pytest.approx(1.0, abs=1e-9) and fit.rmse_ml < 1e-4


def synthetic_patient(rng, kind: str):
    """Known parameters from the priors, phantom-like scan days and 10 % log-normal noise."""
    if kind == "natural":
        plan = plan_with()
        days = np.array([-40.0, 0.0, float(rng.integers(30, 60)), float(rng.integers(80, 120))])
    else:
        plan = plan_with(rt_start=float(rng.integers(14, 29)), chemo=None)
        days = np.array([0.0] + sorted(rng.choice(np.arange(45, 181, 15), size=3, replace=False).astype(float).tolist()))
    schedule = schedule_from_plan(plan)
    s = schedule.rt_prior.draw(rng, 1)[0] if schedule.has_rt else 1.0
    truth = BurdenParameters(float(np.exp(rng.uniform(np.log(5), np.log(40)))),
                             float(np.exp(rng.uniform(np.log(0.005), np.log(0.05)))), s, 1.0,
                             B.PRIORS["clearance_half_life_days"].draw(rng, 1)[0],
                             B.PRIORS["death_delay_days"].draw(rng, 1)[0])
    volumes = burden_volume(days, truth, schedule) * np.exp(0.10 * rng.standard_normal(days.size))
    return plan, schedule, truth, days, volumes


def test_noisy_fits_recover_parameters_within_stated_tolerance():
    """40 natural-history patients (4 scans, 10 % noise): median relative error of rho < 25 %, of V0 < 10 %."""
    rng = np.random.default_rng(11)
    err_rho, err_v0 = [], []
    for _ in range(40):
        plan, schedule, truth, days, volumes = synthetic_patient(rng, "natural")
        fit = fit_burden(days, volumes, plan)
        err_rho.append(abs(fit.parameters.rho_per_day / truth.rho_per_day - 1))
        err_v0.append(abs(fit.parameters.v0_ml / truth.v0_ml - 1))
    assert np.median(err_rho) < 0.25 and np.median(err_v0) < 0.10


def test_band_coverage_close_to_nominal_on_synthetic_patients():
    """120 synthetic patients (natural history and radiotherapy), 90 % band at +30/+60/+90 days after
    the last scan: the coverage of the true volume must lie in [0.80, 0.97] (benchmarks/burden_coverage.py
    measures the same at larger size)."""
    rng = np.random.default_rng(2024)
    hits = []
    for i in range(120):
        plan, schedule, truth, days, volumes = synthetic_patient(rng, "natural" if i % 2 else "rt")
        fit = fit_burden(days, volumes, plan)
        boot = bootstrap_burden(fit, 200, seed=i)
        ahead = days[-1] + np.array([30.0, 60.0, 90.0])
        band = boot.band(ahead)
        true = burden_volume(ahead, truth, schedule)
        hits += list((band["lower"] <= true) & (true <= band["upper"]))
    coverage = float(np.mean(hits))
    assert 0.80 <= coverage <= 0.97, coverage


def test_identifiability_rule_follows_the_data():
    rt = schedule_from_plan(plan_with(rt_start=20))
    assert [n for n, _ in identifiable_parameters([0.0, 10.0], rt)] == ["v0_ml", "rho_per_day"]
    # a point after RT but still within the delay (14 days prior) does not show the response
    assert [n for n, _ in identifiable_parameters([0.0, 10.0, 30.0], rt)] == ["v0_ml", "rho_per_day"]
    assert [n for n, _ in identifiable_parameters([0.0, 10.0, 60.0], rt)][-1] == "rt_survival"
    assert "clearance_half_life_days" in [n for n, _ in identifiable_parameters([0.0, 10.0, 60.0, 90.0, 120.0], rt)]
    surg = schedule_from_plan(plan_with(surgery=5, rt_start=30))
    assert [n for n, _ in identifiable_parameters([0.0, 20.0, 80.0], surg)] == ["v0_ml", "rho_per_day", "surgery_residual"]
    assert [n for n, _ in identifiable_parameters([0.0, 20.0, 80.0, 120.0], surg)] == \
        ["v0_ml", "rho_per_day", "surgery_residual", "rt_survival"]
    # without a scan between surgery and RT, surgery and RT are confounded: only rt_survival is freed
    assert [n for n, _ in identifiable_parameters([0.0, 80.0, 120.0], surg)] == ["v0_ml", "rho_per_day", "rt_survival"]


@pytest.mark.parametrize("days, volumes, plan, free, error, words", [
    ([0.0], [5.0], None, None, InputError, "at least 2"),
    ([0.0, 10.0], [5.0, 0.0], None, None, InputError, "not positive"),
    ([0.0, 10.0], [5.0, -1.0], None, None, InputError, "not positive"),
    ([10.0, 0.0], [5.0, 6.0], None, None, InputError, "increasing order"),
    ([0.0, 10.0, 10.0], [5.0, 6.0, 6.5], None, None, InputError, "measured twice"),
    ([0.0, float("nan")], [5.0, 6.0], None, None, InputError, "finite"),
    ([0.0, 10.0], [5.0, 6.0, 7.0], None, None, InputError, "one volume"),
    ([40.0, 80.0], [5.0, 6.0], plan_with(rt_start=20), None, InputError, "on or before day 20"),
    ([10.0, 80.0], [5.0, 6.0], plan_with(surgery=5, rt_start=30), None, InputError, "surgery on day 5"),
    ([0.0, 60.0], [5.0, 6.0], plan_with(rt_start=20), ["v0_ml", "rho_per_day", "rt_survival"], ParameterError,
     "only 2 measured volumes"),
    ([0.0, 10.0, 25.0], [5.0, 6.0, 6.5], plan_with(rt_start=20), ["v0_ml", "rho_per_day", "rt_survival"], ParameterError,
     "after day 34"),
    ([0.0, 10.0, 25.0], [5.0, 6.0, 6.5], None, ["v0_ml", "rho_per_day", "surgery_residual"], ParameterError, "no surgery"),
    ([0.0, 10.0, 25.0], [5.0, 6.0, 6.5], None, ["v0_ml", "rho_per_day", "growth"], ParameterError, "Unknown"),
    ([0.0, 10.0, 25.0], [5.0, 6.0, 6.5], None, ["rho_per_day"], ParameterError, "v0_ml must be free"),
    ([0.0, 10.0, 25.0], [5.0, 6.0, 6.5], None, ["v0_ml"], ParameterError, "rho_per_day must be free"),
])
def test_refusals_say_what_to_supply(days, volumes, plan, free, error, words):
    with pytest.raises(error, match=words):
        fit_burden(days, volumes, plan, free=free)


def test_explicit_free_set_is_used_when_supported():
    """Freeing less than the rule would: the others stay at their priors and the fit says so."""
    plan = plan_with(rt_start=20)
    schedule = schedule_from_plan(plan)
    truth = BurdenParameters(10.0, 0.02, 0.4, 1.0, 21.0, 14.0)
    days = np.array([0.0, 15.0, 60.0, 90.0, 120.0])
    volumes = burden_volume(days, truth, schedule)
    auto = fit_burden(days, volumes, plan)
    assert auto.free == ["v0_ml", "rho_per_day", "rt_survival", "clearance_half_life_days"]
    fit = fit_burden(days, volumes, plan, free=["rho_per_day", "v0_ml"])
    assert fit.free == ["v0_ml", "rho_per_day"]
    assert fit.sources["rt_survival"] == "prior"
    assert fit.parameters.rt_survival == pytest.approx(schedule.rt_prior.nominal)
    assert fit.r2 < auto.r2


# ----------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------

def test_vectorised_refit_agrees_with_least_squares():
    """refit_batch solves the same problem as scipy.optimize.least_squares, row by row."""
    plan = stupp_plan(20)
    schedule = schedule_from_plan(plan)
    truth = BurdenParameters(15.0, 0.015, 0.35, 1.0, 21.0, 14.0)
    days = np.array([0.0, 15.0, 50.0, 90.0, 140.0])
    rng = np.random.default_rng(3)
    log_y = np.log(burden_volume(days, truth, schedule))[None] + 0.1 * rng.standard_normal((12, days.size))
    free = ["v0_ml", "rho_per_day", "rt_survival"]
    fixed = {"surgery_residual": np.ones(12), "clearance_half_life_days": rng.uniform(10, 45, 12),
             "death_delay_days": rng.uniform(7, 28, 12)}
    start = {"v0_ml": np.full(12, 12.0), "rho_per_day": np.full(12, 0.02), "rt_survival": np.full(12, 0.3)}
    batch = refit_batch(days, log_y, free, fixed, schedule, start)
    for i in range(12):
        values = {k: float(v[i]) for k, v in fixed.items()}

        def residuals(x):
            p = BurdenParameters(math.exp(x[0]), x[1], x[2], values["surgery_residual"],
                                 values["clearance_half_life_days"], values["death_delay_days"])
            return np.log(burden_volume(days, p, schedule)) - log_y[i]

        ref = least_squares(residuals, [math.log(12.0), 0.02, 0.3], bounds=([math.log(1e-3), 0, 1e-3], [math.log(1e4), 0.3, 1]),
                            xtol=1e-12, ftol=1e-12, gtol=1e-12)
        mine = residuals([math.log(batch["v0_ml"][i]), batch["rho_per_day"][i], batch["rt_survival"][i]])
        assert 0.5 * (mine ** 2).sum() <= ref.cost + 1e-7
        assert batch["rho_per_day"][i] == pytest.approx(ref.x[1], abs=2e-4)


def test_bootstrap_is_deterministic_and_band_brackets_the_fit():
    plan = stupp_plan(20)
    schedule = schedule_from_plan(plan)
    truth = BurdenParameters(15.0, 0.015, 0.35, 1.0, 21.0, 14.0)
    days = np.array([0.0, 15.0, 50.0, 90.0])
    volumes = burden_volume(days, truth, schedule) * np.array([1.05, 0.97, 1.08, 0.95])
    fit = fit_burden(days, volumes, plan)
    a, b, c = (bootstrap_burden(fit, 100, seed=s) for s in (7, 7, 8))
    band_a, band_b, band_c = (x.band([120.0, 180.0]) for x in (a, b, c))
    np.testing.assert_array_equal(band_a["upper"], band_b["upper"])
    assert not np.array_equal(band_a["upper"], band_c["upper"])
    assert np.all(band_a["lower"] < band_a["fit"]) and np.all(band_a["fit"] < band_a["upper"])
    assert np.all(band_a["lower"] < band_a["median"]) and np.all(band_a["median"] < band_a["upper"])
    q = a.volume_quantiles(120.0, 5)
    assert np.all(np.diff(q) > 0) and band_a["lower"][0] < q[2] < band_a["upper"][0]
    with pytest.raises(ParameterError, match="at least 10"):
        bootstrap_burden(fit, 5)


def test_prior_sampling_widens_the_band_when_rt_is_not_identified():
    """Untreated growth is well measured but the RT response is not: the band must show the prior's spread."""
    plan = plan_with(rt_start=20)
    days = np.array([-60.0, -30.0, 0.0, 15.0])
    fit = fit_burden(days, 10.0 * np.exp(0.01 * days) * np.array([1.03, 0.98, 1.01, 0.99]), plan)
    assert "rt_survival" not in fit.free and fit.sources["rt_survival"] == "prior"
    narrow = bootstrap_burden(fit, 300, seed=1, prior_sampling=False).band([120.0])
    wide = bootstrap_burden(fit, 300, seed=1, prior_sampling=True).band([120.0])
    assert (wide["upper"] - wide["lower"])[0] > 2.0 * (narrow["upper"] - narrow["lower"])[0]


# ----------------------------------------------------------------------------------------------
# Files and the command line
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "day,volume_ml\n0,5\n30,6.5\n",
    "0,5\n30,6.5\n",
    "# scans\nDay;Volume_mL;reader\n0;5;A\n30;6.5;B\n",
    "volume_ml\tday\n5\t0\n6.5\t30\n",
    "0 5\n30 6.5\n",
])
def test_read_volumes_csv_accepts_common_layouts(tmp_path, text):
    path = tmp_path / "v.csv"
    path.write_text(text)
    days, vols = read_volumes_csv(path)
    np.testing.assert_array_equal(days, [0.0, 30.0])
    np.testing.assert_array_equal(vols, [5.0, 6.5])


@pytest.mark.parametrize("text, words", [
    ("", "empty"), ("day,size\n0,5\n30,6\n", "no column 'volume_ml'"), ("0,5\n30,abc\n", "not two numbers"),
    ("0,5\n30,-1\n", "not positive"), ("0,5\n", "at least 2"),
])
def test_read_volumes_csv_refuses_bad_tables(tmp_path, text, words):
    path = tmp_path / "v.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=words):
        read_volumes_csv(path)


def test_cli_forecast_burden_round_trip(tmp_path, capsys):
    plan = stupp_plan(20).to_dict()
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    schedule = schedule_from_plan(plan)
    truth = BurdenParameters(15.0, 0.015, 0.35, 1.0, 21.0, 14.0)
    days = np.array([0.0, 15.0, 60.0, 100.0])
    vols = burden_volume(days, truth, schedule) * np.array([1.04, 0.97, 1.05, 0.96])
    (tmp_path / "v.csv").write_text("day,volume_ml\n" + "".join(f"{d:g},{v:.4f}\n" for d, v in zip(days, vols)))
    before = (tmp_path / "v.csv").read_bytes()
    out = tmp_path / "out"
    argv = ["forecast-burden", "--volumes", str(tmp_path / "v.csv"), "--plan", str(tmp_path / "plan.json"),
            "--days", "120,150", "180", "--bootstrap", "200", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "R² =" in printed and "rt_survival" in printed and "95 %" in printed
    rows = [line.split(",") for line in (out / "burden_forecast.csv").read_text().splitlines()]
    assert rows[0] == ["day", "fit_ml", "median_ml", "p05_ml", "p95_ml"]
    table = np.array([[float(x) for x in r] for r in rows[1:]])
    np.testing.assert_array_equal(table[:, 0], [120.0, 150.0, 180.0])
    assert np.all(table[:, 3] < table[:, 2]) and np.all(table[:, 2] < table[:, 4])
    # the CSV's fit column is the library's fit of the same data
    fit = fit_burden(days, np.array([float(f"{v:.4f}") for v in vols]), plan)
    np.testing.assert_allclose(table[:, 1], fit.predict([120.0, 150.0, 180.0]), rtol=1e-5)
    import matplotlib.image

    image = matplotlib.image.imread(out / "burden_forecast.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    data = json.loads((out / "burden_fit.json").read_text())
    assert data["free"] == fit.free and data["r2"] == pytest.approx(fit.r2)
    assert (tmp_path / "v.csv").read_bytes() == before

    stamp = (out / "burden_forecast.csv").stat().st_mtime_ns
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "burden_forecast.csv").stat().st_mtime_ns == stamp
    assert main(argv + ["--force", "--seed", "4"]) == 0
    assert not list(out.glob(".tmp-*"))


def test_cli_forecast_burden_reports_unsupported_fits(tmp_path, capsys):
    (tmp_path / "v.csv").write_text("day,volume_ml\n40,5\n80,6\n")
    (tmp_path / "plan.json").write_text(json.dumps(plan_with(rt_start=20)))
    code = main(["forecast-burden", "--volumes", str(tmp_path / "v.csv"), "--plan", str(tmp_path / "plan.json"),
                 "--days", "100", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "on or before day 20" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    code = main(["forecast-burden", "--volumes", str(tmp_path / "v.csv"), "--days", "1O0"])
    assert code == 2 and "not a number" in capsys.readouterr().err


def test_import_does_not_pull_torch():
    import subprocess
    import sys

    code = "import sys, AnatomyDTLib.burden; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
