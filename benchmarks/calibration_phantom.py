"""Patient-specific calibration on held-out phantom patients: does fitting the PDE to a patient's
first two scans forecast the third better than the population model and than "no change"?

For every selected patient (at least 3 scans, tumour in the first three):

* **calibrated** — :func:`AnatomyDTLib.calibration.calibrate` on scans 0 and 1 (with the patient's
  plan), then :func:`~AnatomyDTLib.calibration.forecast` from scan 1 to the day of scan 2;
* **population** — :func:`AnatomyDTLib.predict.predict` from scan 1 to the day of scan 2 with the
  population model (``--population``: ``default`` = the bundled trained model if it loads, else
  ``pde-only``; or a weights file), the plan seen from scan 1;
* **no-change** — scan 1 itself as the prediction of scan 2.

Each is scored against scan 2: tumour Dice and tumour HD95 (mm; ``AnatomyDTLib.metrics``, a
tumour missing from one map gets the image diagonal) and the tumour-volume error (mL).

    python benchmarks/calibration_phantom.py --cohort /tmp/brain/cohort_test --patients 10 --out results_calib
    python benchmarks/calibration_phantom.py --make /tmp/calib_cohort --seed 7 --patients 10 --out results_calib
    python benchmarks/calibration_phantom.py --merge part_a part_b --out results_calib   # runs split with --skip

``--make`` generates the first ``--patients`` patients of the phantom cohort of ``--seed`` (case i
depends only on (seed, i), so they are the first patients of the full cohort of that seed; seed 7
is the lead's held-out cohort, seed 0 the training cohort). Writes ``per_patient.csv``,
``summary.json`` and ``summary.md`` into ``--out`` and prints the summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

from dataclasses import replace

import numpy as np
import torch

from AnatomyDTLib.brain.cohort import load_cohort, make_brain_cohort
from AnatomyDTLib.calibration import (CLEARANCE_FITS, CalibrationSettings, HistoryScan, calibrate, forecast,
                                      load_plan_on_grid, shift_plan)
from AnatomyDTLib.calibration_ensemble import BAND_PERCENTILES, forecast_ensemble
from AnatomyDTLib.errors import InputError, ParameterError
from AnatomyDTLib.io import read_labelmap
from AnatomyDTLib.metrics import dice, hd95, image_diagonal_mm
from AnatomyDTLib.predict import load_model, predict
from AnatomyDTLib.schema import BRAIN_SCHEMA
from AnatomyDTLib.state import AnatomyState, labels_to_field

TUMOUR = BRAIN_SCHEMA.tumour_index
METHODS = ("calibrated", "population", "no_change")
HARD_CASE_NO_CHANGE_DICE = 0.65
TARGET_DICE = 0.80
VISIBLE_TRUTH_ML = 0.5
"""A scan-2 tumour below this (62 voxels of 2 mm) is "essentially gone": a forecast of no tumour is
right in substance there, yet scores Dice 0. Hard cases are also reported without such patients."""


RELIABILITY_BINS = np.linspace(0.0, 1.0, 11)
"""Bins of the ensemble's tumour probability for the reliability table (observed tumour frequency per bin)."""


def ensemble_scores(probability: np.ndarray, point: np.ndarray, last: np.ndarray, truth: np.ndarray,
                    spacing, diagonal: float, voxel_ml: float) -> dict:
    """How the ensemble's tumour probability map ``probability`` scores against the ``truth`` mask.

    Scored over the region where anything is tumour (the last scan, the truth, the point forecast
    ``point`` or any member): elsewhere every forecast is right and would only dilute the scores.
    ``brier`` is the mean squared difference of the probability and the truth there
    (``point_brier`` the same for the point forecast's 0/1 map); ``majority`` is the map at >= 0.5
    scored like the forecasts; the reliability counts are voxels per probability bin
    (:data:`RELIABILITY_BINS`, the first bin holds only p = 0) and how many of them are tumour.
    """
    region = last | truth | point | (probability > 0)
    p, t = probability[region].astype(np.float64), truth[region].astype(np.float64)
    majority = probability >= 0.5
    out = {f"majority_{k}": v for k, v in score(majority, truth, spacing, diagonal, voxel_ml).items()}
    out["brier"] = float(np.mean((p - t) ** 2)) if p.size else 0.0
    out["point_brier"] = float(np.mean((point[region].astype(np.float64) - t) ** 2)) if p.size else 0.0
    out["truth_recall"] = float((probability[truth] > 0).mean()) if truth.any() else math.nan
    out["point_truth_recall"] = float(point[truth].mean()) if truth.any() else math.nan
    bins = np.where(p <= 0, 0, np.clip(np.digitize(p, RELIABILITY_BINS[1:-1], right=True) + 1, 1,
                                       len(RELIABILITY_BINS) - 1))
    n = np.bincount(bins, minlength=len(RELIABILITY_BINS))
    hit = np.bincount(bins, weights=t, minlength=len(RELIABILITY_BINS)).astype(np.int64)
    out["bin_voxels"] = ";".join(str(int(v)) for v in n)
    out["bin_tumour"] = ";".join(str(int(v)) for v in hit)
    return out


ORACLE = "truth"
"""``--delayed-death truth``: each phantom's own death delay and clearance half-life (truth.json).
A diagnostic, not a method: it tells how much of the error is the assumed clearance (which two
scans cannot determine) and how much is the rest of the model."""


def _delayed_death(text: str) -> tuple[float, float] | str | None:
    """'14,21' -> (14.0, 21.0); 'none' -> None; 'truth' -> ORACLE (resolved per patient)."""
    if text.strip().lower() == "none":
        return None
    if text.strip().lower() == ORACLE:
        return ORACLE
    try:
        delay, half_life = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--delayed-death must be DELAY,HALF_LIFE in days or 'none', got {text!r}") from None
    return delay, half_life


def population_model(name: str):
    """(model, label): ``default`` falls back to ``pde-only`` when the bundled weights do not load."""
    if name == "default":
        try:
            return load_model("default"), "default (bundled trained model)"
        except InputError as exc:
            return load_model("pde-only"), f"pde-only (default not available: {str(exc).splitlines()[0][:80]})"
    return load_model(name), name


def score(pred: np.ndarray, truth: np.ndarray, spacing, diagonal: float, voxel_ml: float) -> dict:
    a, b = pred == TUMOUR, truth == TUMOUR
    return {"dice": float(dice(a, b)), "hd95": float(hd95(a, b, spacing, empty_value=diagonal)),
            "volume_error_ml": float((a.sum() - b.sum()) * voxel_ml)}


def eligible(patient, history_scans: int = 2) -> bool:
    """At least ``history_scans`` + 1 scans with known days, each with tumour."""
    needed = history_scans + 1
    if len(patient.timepoints) < needed or not all(t.day_known for t in patient.timepoints[:needed]):
        return False
    return all((read_labelmap(t.segmentation).labels == TUMOUR).any() for t in patient.timepoints[:needed])


def _truth(patient) -> dict:
    """The phantom's truth.json (pattern, biology), or {} for a cohort without one."""
    try:
        return json.loads((patient.timepoints[0].segmentation.parent / "truth.json").read_text())
    except (OSError, ValueError):
        return {}


def oracle_delayed_death(patient) -> tuple[float, float]:
    """(delay, half-life) in days that generated this phantom patient's scans."""
    biology = _truth(patient).get("biology", {})
    try:
        return float(biology["rt_death_delay_days"]), float(biology["clearance_half_life_days"])
    except KeyError:
        raise SystemExit(f"--delayed-death truth: {patient.case} has no truth.json with the phantom's "
                         "rt_death_delay_days and clearance_half_life_days (only generated phantoms do)") from None


def _hypoxia(text: str) -> float | str | None:
    """'2.25' -> 2.25 (an assumed oxygen enhancement ratio); 'none' -> None; 'truth' -> ORACLE."""
    value = text.strip().lower()
    if value == "none":
        return None
    if value == ORACLE:
        return ORACLE
    try:
        return float(value)
    except ValueError:
        raise SystemExit(f"--hypoxia must be an oxygen enhancement ratio (1..4), 'none' or 'truth', got {text!r}") \
            from None


def oracle_hypoxia(patient) -> float:
    """The oxygen enhancement ratio of this phantom patient's dense bulk (truth.json)."""
    try:
        return float(_truth(patient)["biology"]["hypoxic_oer"])
    except KeyError:
        raise SystemExit(f"--hypoxia truth: {patient.case} has no truth.json with the phantom's hypoxic_oer") from None


def restart_variants(calibration, trust_factors) -> dict:
    """The same calibration with other restart densities (``--compare-density``): ``coded_density``
    (the coded profile as it is: the default before 2026-12-04), ``ordered_density`` (the coded
    densities rearranged in the rollout's order: ``CalibrationSettings.order_density``, the default)
    and ``trust_F`` (the rollout's density values where they are >= F * tau)."""
    carried = calibration.carried
    if carried is None or carried.tumour_density is None:
        return {}
    tau = calibration.visibility_threshold
    variants = {"coded_density": replace(calibration, carried=replace(carried, tumour_density=None)),
                "ordered_density": replace(calibration, carried=replace(carried, order_only=True))}
    for factor in trust_factors:
        variants[f"trust_{factor:g}"] = replace(calibration, carried=replace(carried, trusted_density=factor * tau,
                                                                              order_only=False))
    return variants


def evaluate_patient(patient, settings: CalibrationSettings, model, compare_density: bool = False,
                     oracle_clearance: bool = False, trust_factors=(), oracle_oer: bool = False,
                     history_scans: int = 2, ensemble_members: int = 0, ensemble_seed: int = 0) -> dict:
    """Calibrate on the first ``history_scans`` scans and score the forecast of the next one.

    In the row, "scan 1" is the last history scan (the forecasts' start) and "scan 2" the scored one.
    """
    n = history_scans
    volumes = [read_labelmap(t.segmentation) for t in patient.timepoints[:n + 1]]
    scans = [HistoryScan(v.labels, v.geometry, t.day, f"{patient.case}/tp{t.index}")
             for v, t in zip(volumes, patient.timepoints)]
    history, target, last = scans[:n], scans[n], volumes[n - 1]
    geometry, truth = volumes[n].geometry, volumes[n].labels
    spacing = geometry.spacing_array_order
    diagonal = image_diagonal_mm(truth.shape, spacing)
    voxel_ml = geometry.voxel_volume_ml
    plan_path = str(patient.plan) if patient.plan is not None else None
    row = {"case": patient.case, "days": "/".join(f"{d:g}" for d in patient.days[:n + 1]),
           "history_scans": n, "horizon_days": target.day - history[-1].day}
    row["pattern"] = _truth(patient).get("pattern", "")
    if settings is not None and oracle_clearance:
        settings = replace(settings, assumed_delayed_death=oracle_delayed_death(patient))
        row["assumed_delay_days"], row["assumed_half_life_days"] = settings.assumed_delayed_death
    if settings is not None and oracle_oer:
        settings = replace(settings, assumed_hypoxia=oracle_hypoxia(patient))
    if settings is not None:
        row["assumed_oer"] = settings.assumed_hypoxia

    predictions = {}
    if settings is None:  # --population-only: the baselines without a fit
        for key in ("calibration_s", "iterations", "fit_dice_scan1", "fit_volume_error_ml", "start_fit_dice_scan1",
                    "alpha_per_day", "d_white_mm2_per_day", "edge_width_mm", "rt_scale", "dying_share_scan1",
                    "clearance_half_life_days", "oer", "forecast_s"):
            row[key] = math.nan
        row["clearance_fitted"] = False
        row["stop_reason"] = "not calibrated"
    else:
        t0 = time.perf_counter()
        calibration = calibrate(history, plan_path, settings=settings)
        row["calibration_s"] = time.perf_counter() - t0
        row["iterations"] = calibration.iterations
        row["stop_reason"] = calibration.stop_reason.split(" (")[0]
        row["fit_dice_scan1"] = calibration.fits[-1].tumour_dice          # the last history scan
        row["fit_volume_error_ml"] = calibration.fits[-1].volume_error_ml
        row["start_fit_dice_scan1"] = calibration.fits[-1].initial_tumour_dice
        row["alpha_per_day"] = calibration.parameters.growth_rate
        row["d_white_mm2_per_day"] = calibration.parameters.tumour_diffusion_by_tissue["white_matter"]
        row["edge_width_mm"] = calibration.edge_width_mm
        row["rt_scale"] = calibration.radiosensitivity_scale
        row["dying_share_scan1"] = math.nan if calibration.carried is None else calibration.carried.mean_dying_share
        dying = calibration.plan.radiotherapy.delayed_death if calibration.plan.radiotherapy is not None else None
        row["clearance_half_life_days"] = math.nan if dying is None else dying.clearance_half_life_days
        row["clearance_fitted"] = calibration.clearance_fitted
        hypoxia = calibration.plan.radiotherapy.hypoxia if calibration.plan.radiotherapy is not None else None
        row["oer"] = math.nan if hypoxia is None else float(hypoxia.oxygen_enhancement_ratio)
        t1 = time.perf_counter()
        result = forecast(calibration, [target.day])
        row["forecast_s"] = time.perf_counter() - t1
        predictions["calibrated"] = result.labels(0)
        if compare_density:
            for name, variant in restart_variants(calibration, trust_factors).items():
                predictions[name] = forecast(variant, [target.day]).labels(0)
        if ensemble_members:
            row.update(_ensemble_row(calibration, target.day, ensemble_members, ensemble_seed,
                                     predictions["calibrated"] == TUMOUR, last.labels == TUMOUR, truth == TUMOUR,
                                     spacing, diagonal, voxel_ml))

    t2 = time.perf_counter()
    plan = shift_plan(load_plan_on_grid(plan_path, last.geometry, last.labels.shape), history[-1].day)
    baseline = AnatomyState(labels_to_field(last.labels, BRAIN_SCHEMA.num_classes), last.geometry)
    population = predict(baseline, days=[target.day - history[-1].day], plan=plan, model=model)
    row["population_s"] = time.perf_counter() - t2
    predictions["population"] = population.labels(0)
    predictions["no_change"] = last.labels
    for method, labels in predictions.items():
        for key, value in score(labels, truth, spacing, diagonal, voxel_ml).items():
            row[f"{method}_{key}"] = value
    if "calibrated" not in predictions:
        row.update(calibrated_dice=math.nan, calibrated_hd95=math.nan, calibrated_volume_error_ml=math.nan)
    if compare_density:  # no carried density: every variant is the same forecast
        for name in ["coded_density", "ordered_density"] + [f"trust_{f:g}" for f in trust_factors]:
            if name not in predictions:
                for key in ("dice", "hd95", "volume_error_ml"):
                    row[f"{name}_{key}"] = row.get(f"calibrated_{key}", math.nan)
    row["truth_tumour_ml"] = float((truth == TUMOUR).sum() * voxel_ml)
    row["scan1_tumour_ml"] = float((last.labels == TUMOUR).sum() * voxel_ml)
    return row


ENSEMBLE_COLUMNS = ("ensemble_s", "ensemble_members", "ensemble_median_ml", "ensemble_low_ml", "ensemble_high_ml",
                    "ensemble_min_ml", "ensemble_max_ml", "truth_in_band", "truth_in_range",
                    "ensemble_history_dice_spread", "ensemble_majority_dice", "ensemble_majority_hd95",
                    "ensemble_majority_volume_error_ml", "ensemble_brier", "ensemble_point_brier",
                    "ensemble_truth_recall", "ensemble_point_truth_recall", "ensemble_bin_voxels",
                    "ensemble_bin_tumour")
"""The ``--ensemble`` columns of a patient row (NaN for a patient without radiotherapy)."""


def _ensemble_row(calibration, day: float, members: int, seed: int, point, last, truth, spacing, diagonal,
                  voxel_ml) -> dict:
    """The ``ensemble_*`` columns of a patient (``--ensemble``); NaN where there is nothing to draw."""
    t = time.perf_counter()
    try:
        ensemble = forecast_ensemble(calibration, [day], members=members, seed=seed)
    except ParameterError:  # no radiotherapy: no clearance assumption to draw
        return {key: math.nan for key in ENSEMBLE_COLUMNS}
    band = ensemble.volume_band()[0]
    low, high = (f"p{p:g}_ml" for p in BAND_PERCENTILES)
    true_ml = float(truth.sum() * voxel_ml)
    row = {"ensemble_s": time.perf_counter() - t, "ensemble_members": members,
           "ensemble_median_ml": band["median_ml"], "ensemble_low_ml": band[low], "ensemble_high_ml": band[high],
           "ensemble_min_ml": band["min_ml"], "ensemble_max_ml": band["max_ml"],
           "truth_in_band": band[low] - 1e-9 <= true_ml <= band[high] + 1e-9,
           "truth_in_range": band["min_ml"] - 1e-9 <= true_ml <= band["max_ml"] + 1e-9,
           "ensemble_history_dice_spread": float(np.ptp(ensemble.history_dice[:, -1]))}
    scores = ensemble_scores(ensemble.tumour_probability[0], point, last, truth, spacing, diagonal, voxel_ml)
    row.update({f"ensemble_{k}": v for k, v in scores.items()})
    assert tuple(row) == ENSEMBLE_COLUMNS, sorted(set(row) ^ set(ENSEMBLE_COLUMNS))
    return row


def _mean(values) -> float:
    values = [v for v in values if math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def _median(values) -> float:
    values = [v for v in values if math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def summarise(rows: list[dict], info: dict) -> tuple[str, dict]:
    """Markdown summary and the JSON summary."""
    summary = {"n_patients": len(rows), **info, "methods": {}}
    lines = [f"Patients: {len(rows)} (cohort {info['cohort']}); population model: {info['population_model']}; "
             f"calibration: {info['settings_summary']}.", "",
             "| method | tumour DSC mean ± sd | median | tumour HD95 median (mm) | |volume error| median (mL) |",
             "|---|---|---|---|---|"]
    for m in METHODS:
        d = [r[f"{m}_dice"] for r in rows]
        h = [r[f"{m}_hd95"] for r in rows]
        v = [abs(r[f"{m}_volume_error_ml"]) for r in rows]
        finite = [x for x in d if math.isfinite(x)]
        sd = statistics.stdev(finite) if len(finite) > 1 else (0.0 if finite else math.nan)
        summary["methods"][m] = {"dice_mean": _mean(d), "dice_sd": sd, "dice_median": _median(d),
                                 "hd95_median_mm": _median(h), "abs_volume_error_median_ml": _median(v)}
        lines.append(f"| {m} | {_mean(d):.3f} ± {sd:.3f} | {_median(d):.3f} | {_median(h):.1f} | {_median(v):.2f} |")
    hard = [r for r in rows if r["no_change_dice"] <= HARD_CASE_NO_CHANGE_DICE]
    met = [r for r in hard if r["calibrated_dice"] >= TARGET_DICE]
    summary["hard_cases"] = {"definition": f"no-change tumour DSC <= {HARD_CASE_NO_CHANGE_DICE}", "n": len(hard),
                             "calibrated_dice_mean": _mean([r["calibrated_dice"] for r in hard]),
                             "population_dice_mean": _mean([r["population_dice"] for r in hard]),
                             "no_change_dice_mean": _mean([r["no_change_dice"] for r in hard]),
                             "n_calibrated_dice_at_least_target": len(met), "target": TARGET_DICE}
    variants = [k[:-len("_dice")] for k in (rows[0] if rows else {})
                if k.endswith("_dice") and (k.startswith("trust_") or k in ("coded_density_dice",
                                                                             "ordered_density_dice"))]
    if variants:
        lines += ["", "Restart densities from the same calibrations (change = against the coded dense core):", "",
                  "| restart | tumour DSC mean | median | |volume error| median (mL) | hard cases: mean, >= "
                  f"{TARGET_DICE} | differ from coded | better |", "|---|---|---|---|---|---|---|"]
        summary["density_comparison"] = {}
        for name in ["calibrated"] + variants:
            d = [r[f"{name}_dice"] for r in rows]
            changed = [r[f"{name}_dice"] - r["coded_density_dice"] for r in rows
                       if abs(r[f"{name}_dice"] - r["coded_density_dice"]) > 1e-9]
            hard_d = [r[f"{name}_dice"] for r in hard]
            entry = {"dice_mean": _mean(d), "dice_median": _median(d),
                     "abs_volume_error_median_ml": _median([abs(r[f"{name}_volume_error_ml"]) for r in rows]),
                     "hard_dice_mean": _mean(hard_d), "hard_at_least_target": sum(x >= TARGET_DICE for x in hard_d),
                     "n_changed": len(changed), "n_better": sum(x > 0 for x in changed),
                     "mean_change": _mean(changed) if changed else 0.0}
            summary["density_comparison"][name] = entry
            lines.append(f"| {name} | {entry['dice_mean']:.3f} | {entry['dice_median']:.3f} | "
                         f"{entry['abs_volume_error_median_ml']:.2f} | {entry['hard_dice_mean']:.3f}, "
                         f"{entry['hard_at_least_target']} of {len(hard)} | {len(changed)} | {entry['n_better']} |")
    with_ensemble = [r for r in rows if _finite(r.get("ensemble_brier"))]
    if with_ensemble:
        lines += [""] + _ensemble_summary(with_ensemble, summary)
    visible = [r for r in hard if r["truth_tumour_ml"] >= VISIBLE_TRUTH_ML]
    summary["hard_cases_visible"] = {
        "definition": f"hard cases whose scan-2 tumour is >= {VISIBLE_TRUTH_ML} mL", "n": len(visible),
        "calibrated_dice_mean": _mean([r["calibrated_dice"] for r in visible]),
        "population_dice_mean": _mean([r["population_dice"] for r in visible]),
        "no_change_dice_mean": _mean([r["no_change_dice"] for r in visible]),
        "n_calibrated_dice_at_least_target": sum(r["calibrated_dice"] >= TARGET_DICE for r in visible)}
    lines += ["", f"Hard cases (no-change tumour DSC <= {HARD_CASE_NO_CHANGE_DICE}): {len(hard)}; calibrated DSC "
                  f"mean {_mean([r['calibrated_dice'] for r in hard]):.3f} (population "
                  f"{_mean([r['population_dice'] for r in hard]):.3f}, no-change "
                  f"{_mean([r['no_change_dice'] for r in hard]):.3f}); calibrated DSC >= {TARGET_DICE}: "
                  f"{len(met)} of {len(hard)}.",
              f"Of these, with a scan-2 tumour of at least {VISIBLE_TRUTH_ML} mL: {len(visible)}; calibrated DSC mean "
              f"{_mean([r['calibrated_dice'] for r in visible]):.3f} (population "
              f"{_mean([r['population_dice'] for r in visible]):.3f}, no-change "
              f"{_mean([r['no_change_dice'] for r in visible]):.3f}).", "",
              "| case | pattern | days | tumour mL scan 1 → 2 | calibrated mL | fit DSC (scan 1) | calibrated DSC | "
              "population DSC | no-change DSC | calibrated HD95 | population HD95 | no-change HD95 | calib s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calibrated_ml = r["truth_tumour_ml"] + r["calibrated_volume_error_ml"]
        lines.append(f"| {r['case']} | {r['pattern']} | {r['days']} | {r['scan1_tumour_ml']:.1f} → "
                     f"{r['truth_tumour_ml']:.2f} | {calibrated_ml:.2f} | {r['fit_dice_scan1']:.3f} | "
                     f"{r['calibrated_dice']:.3f} | {r['population_dice']:.3f} | {r['no_change_dice']:.3f} | "
                     f"{r['calibrated_hd95']:.1f} | {r['population_hd95']:.1f} | {r['no_change_hd95']:.1f} | "
                     f"{r['calibration_s']:.0f} |")
    return "\n".join(lines), summary


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _as_bool(value) -> bool:
    return value is True or str(value) == "True"  # merged runs come back from JSON/CSV


def _ensemble_summary(rows: list[dict], summary: dict) -> list[str]:
    """Markdown lines (and ``summary["ensemble"]``) on the ``--ensemble`` columns of ``rows``."""
    groups = {"all": rows, "hard": [r for r in rows if r["no_change_dice"] <= HARD_CASE_NO_CHANGE_DICE]}
    low, high = BAND_PERCENTILES
    lines = [f"Forecast ensemble over the delayed-death priors ({rows[0]['ensemble_members']} members, the fitted "
             f"parameters fixed; band = {low:g}-{high:g} % of the members' tumour volumes):", "",
             "| patients | n | truth inside the band | inside min-max | Brier: ensemble / point forecast | DSC: "
             "majority (p >= 0.5) / point | truth inside p > 0 / inside the point forecast |",
             "|---|---|---|---|---|---|---|"]
    summary["ensemble"] = {}
    for name, group in groups.items():
        if not group:
            continue
        entry = {"n": len(group), "truth_in_band": sum(_as_bool(r["truth_in_band"]) for r in group),
                 "truth_in_range": sum(_as_bool(r["truth_in_range"]) for r in group),
                 "brier_mean": _mean([r["ensemble_brier"] for r in group]),
                 "point_brier_mean": _mean([r["ensemble_point_brier"] for r in group]),
                 "majority_dice_mean": _mean([r["ensemble_majority_dice"] for r in group]),
                 "point_dice_mean": _mean([r["calibrated_dice"] for r in group]),
                 "truth_recall_mean": _mean([r["ensemble_truth_recall"] for r in group]),
                 "point_truth_recall_mean": _mean([r["ensemble_point_truth_recall"] for r in group])}
        summary["ensemble"][name] = entry
        lines.append(f"| {name} | {len(group)} | {entry['truth_in_band']} of {len(group)} | {entry['truth_in_range']} "
                     f"of {len(group)} | {entry['brier_mean']:.3f} / {entry['point_brier_mean']:.3f} | "
                     f"{entry['majority_dice_mean']:.3f} / {entry['point_dice_mean']:.3f} | "
                     f"{entry['truth_recall_mean']:.3f} / {entry['point_truth_recall_mean']:.3f} |")
    voxels = np.sum([[int(v) for v in str(r["ensemble_bin_voxels"]).split(";")] for r in rows], axis=0)
    tumour = np.sum([[int(v) for v in str(r["ensemble_bin_tumour"]).split(";")] for r in rows], axis=0)
    edges = RELIABILITY_BINS
    names = ["0"] + [f"({edges[i]:.1f}, {edges[i + 1]:.1f}]" for i in range(len(edges) - 1)]
    summary["ensemble"]["reliability"] = [{"probability": n, "voxels": int(v), "tumour": int(t)}
                                          for n, v, t in zip(names, voxels, tumour)]
    lines += ["", "Reliability (all patients, voxels where anything is tumour):", "",
              "| tumour probability | voxels | observed tumour frequency |", "|---|---|---|"]
    lines += [f"| {n} | {int(v)} | {t / v:.3f} |" if v else f"| {n} | 0 | |" for n, v, t in zip(names, voxels, tumour)]
    return lines


def write_outputs(out: Path, rows: list[dict], info: dict) -> str:
    """per_patient.csv, summary.json and summary.md into ``out``; returns the markdown."""
    text, summary = summarise(rows, info)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "per_patient.csv", "w", newline="") as fh:
        columns = list(dict.fromkeys(key for row in rows for key in row)) or ["case"]  # rows may differ in keys
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps({**summary, "patients": rows}, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(text + "\n")
    return text


def merge(folders: list[Path], out: Path) -> int:
    """Summarise the patients of several runs (their summary.json) together; each patient once."""
    rows, parts = [], []
    for folder in folders:
        data = json.loads((folder / "summary.json").read_text())
        known = {r["case"] for r in rows}
        rows += [r for r in data["patients"] if r["case"] not in known]
        parts.append(data)
    first = parts[0]
    keys = ("population_model", "settings_summary")
    if any(tuple(p.get(k) for k in keys) != tuple(first.get(k) for k in keys) for p in parts):
        raise SystemExit("--merge: the runs differ in population model or calibration settings; merge like with like.")
    info = {k: first[k] for k in ("cohort", "population_model", "settings", "settings_summary", "threads", "machine",
                                  "python", "torch") if k in first}
    info.update(command=" ".join(sys.argv), merged_from=[str(f) for f in folders],
                wall_time_s=round(sum(p.get("wall_time_s", 0.0) for p in parts), 1),
                skipped_ineligible=sorted({c for p in parts for c in p.get("skipped_ineligible", [])}))
    print(write_outputs(out, rows, info))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cohort", type=Path, help="an existing phantom cohort (manifest.csv)")
    source.add_argument("--make", type=Path, help="generate the first --patients patients of --seed here")
    source.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                        help="summarise the patients of earlier runs together (their --out folders, e.g. the "
                             "parts of a run split with --skip) into --out")
    parser.add_argument("--seed", type=int, default=7, help="phantom seed for --make (7 = held-out cohort)")
    parser.add_argument("--patients", type=int, default=10, help="how many eligible patients to evaluate")
    parser.add_argument("--population", default="default", help="'default', 'pde-only' or a weights file")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--alpha", choices=("scalar", "field"), default="scalar")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="time limit of one calibration (s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--observation", choices=("threshold", "argmax"), default="threshold",
                        help="observation model of the fit and forecast (docs/calibration.md)")
    parser.add_argument("--population-only", action="store_true",
                        help="score only the population model and no change (no calibration; seconds per patient)")
    parser.add_argument("--delayed-death", default="14,21", metavar="DELAY,HALF_LIFE|none",
                        help="delayed death assumed when a plan has none: delay and clearance half-life in days "
                             "(CalibrationSettings.assumed_delayed_death); 'none' = killed cells vanish at once; "
                             "'truth' = each phantom's own values (a diagnostic, not a method)")
    parser.add_argument("--hypoxia", default="none", metavar="OER|none|truth",
                        help="hypoxic radioresistance assumed when a plan has none: the oxygen enhancement ratio of "
                             "dense tumour (CalibrationSettings.assumed_hypoxia; default none); 'truth' = each "
                             "phantom's own (a diagnostic)")
    parser.add_argument("--fit-clearance", choices=CLEARANCE_FITS, default="never",
                        help="fit the clearance half-life of irradiated cells (CalibrationSettings.fit_clearance)")
    parser.add_argument("--fit-hypoxia", action="store_true",
                        help="fit the OER of the (assumed) hypoxia with the radiosensitivity (CalibrationSettings.fit_hypoxia)")
    parser.add_argument("--no-carry-dying", action="store_true",
                        help="restart the forecast from the last scan with every tumour cell alive (the "
                             "behaviour before the dying compartment was carried over)")
    parser.add_argument("--carry-density", action="store_true",
                        help="also restart with the fitted rollout's tumour density inside the lesion "
                             "(CalibrationSettings.carry_density, off by default)")
    parser.add_argument("--coded-density", action="store_true",
                        help="restart with the coded density profile as it is, not rearranged in the fitted "
                             "rollout's order (CalibrationSettings.order_density=False; the default before "
                             "2026-12-04)")
    parser.add_argument("--compare-density", action="store_true",
                        help="also forecast each calibration with the coded "
                             "density inside the lesion (columns coded_density_*) and with it rearranged in the "
                             "rollout's order (ordered_density_*), from the same fits")
    parser.add_argument("--density-trust", type=float, nargs="+", default=[], metavar="F",
                        help="with --compare-density: also forecast with the rollout's density trusted where it is "
                             ">= F * tau (0 = everywhere), from the same calibration")
    parser.add_argument("--radiosensitivity-start", type=float, default=CalibrationSettings.radiosensitivity_start,
                        help="starting factor on the plan's LQ alpha and beta")
    parser.add_argument("--cases", nargs="+", metavar="CASE",
                        help="evaluate only these cases (e.g. the hard cases of an earlier run)")
    parser.add_argument("--history-scans", type=int, default=2, metavar="N",
                        help="calibrate on the first N scans (>= 2) and forecast scan N (default 2: the issue's "
                             "protocol, scans 0 and 1 -> scan 2); patients need N + 1 scans with tumour")
    parser.add_argument("--ensemble", type=int, default=0, metavar="N",
                        help="also forecast N members over the delayed-death priors and score the probability map "
                             "and the volume band (calibration_ensemble.forecast_ensemble; 0 = off)")
    parser.add_argument("--ensemble-seed", type=int, default=0, help="seed of the ensemble's draws")
    parser.add_argument("--skip", type=int, default=0, help="skip the first N eligible patients (to split a run)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.history_scans < 2:
        raise SystemExit(f"--history-scans must be at least 2 (a fit needs a start and a later scan), "
                         f"got {args.history_scans}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.make is not None:
        t = time.perf_counter()
        make_brain_cohort(args.make, args.patients + 4, args.seed, spacing=2, force=True)
        print(f"generated {args.patients + 4} phantom patients (seed {args.seed}) in {time.perf_counter() - t:.0f} s",
              flush=True)
    cohort = args.cohort if args.cohort is not None else args.make
    model, model_label = population_model(args.population)
    print(f"population model: {model_label}", flush=True)
    delayed_death = _delayed_death(args.delayed_death)
    oracle_clearance = delayed_death == ORACLE
    hypoxia = _hypoxia(args.hypoxia)
    oracle_oer = hypoxia == ORACLE
    settings = CalibrationSettings(alpha=args.alpha, iterations=args.iterations, max_seconds=args.max_seconds,
                                   observation=args.observation,
                                   assumed_delayed_death=None if oracle_clearance else delayed_death,
                                   assumed_hypoxia=None if oracle_oer else hypoxia,
                                   carry_dying=not args.no_carry_dying, carry_density=args.carry_density,
                                   order_density=not args.coded_density,
                                   fit_clearance=args.fit_clearance, fit_hypoxia=args.fit_hypoxia,
                                   radiosensitivity_start=args.radiosensitivity_start)
    rows, skipped, passed = [], [], 0
    for patient in load_cohort(cohort):
        if len(rows) >= args.patients:
            break
        if args.cases and patient.case not in args.cases:
            continue
        if not eligible(patient, args.history_scans):
            skipped.append(patient.case)
            continue
        if passed < args.skip:
            passed += 1
            continue
        row = evaluate_patient(patient, None if args.population_only else settings, model, args.compare_density,
                               oracle_clearance, args.density_trust, oracle_oer, args.history_scans,
                               args.ensemble, args.ensemble_seed)
        rows.append(row)
        print(f"{row['case']} {row['pattern']:>13} days {row['days']:>11}: fit {row['fit_dice_scan1']:.3f}; DSC "
              f"calibrated {row['calibrated_dice']:.3f} population {row['population_dice']:.3f} no-change "
              f"{row['no_change_dice']:.3f}  ({row['calibration_s']:.0f} s, {row['iterations']} it)", flush=True)
    info = {"cohort": str(cohort), "population_model": model_label, "skipped_ineligible": skipped,
            "settings": dict(vars(settings)),
            "settings_summary": ("not calibrated (--population-only)" if args.population_only else (
                f"{args.observation} observation, alpha {args.alpha}, <= {args.iterations} iterations, "
                f"<= {args.max_seconds:g} s each, delayed death {args.delayed_death}, hypoxia (OER) {args.hypoxia}, "
                f"fit clearance {args.fit_clearance}, {'fitted' if args.fit_hypoxia else 'fixed'} OER, "
                f"{'no ' if args.no_carry_dying else ''}carried dying compartment"
                f"{' with its density' if args.carry_density and not args.no_carry_dying else ''}"
                f"{' in the density order of the rollout' if not args.coded_density and not args.carry_density and not args.no_carry_dying else ''}")
            ) + f"; history: scans 0-{args.history_scans - 1}, forecast of scan {args.history_scans}",
            "threads": args.threads, "machine": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "command": " ".join(sys.argv),
            "wall_time_s": round(time.perf_counter() - started, 1)}
    print(write_outputs(args.out, rows, info))
    print(f"wall time {info['wall_time_s']:.0f} s; skipped (fewer than {args.history_scans + 1} scans or a scan "
          "without tumour): "
          f"{', '.join(skipped) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
