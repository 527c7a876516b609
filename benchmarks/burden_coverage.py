"""Coverage of the burden model's 90 % bootstrap band and parameter recovery on synthetic patients.

    python benchmarks/burden_coverage.py [--patients 200] [--bootstrap 500] [--seed 0] [--noise 0.10]
    python benchmarks/burden_coverage.py --phantom 24 [--bootstrap 500] [--seed 0]

Each synthetic patient gets a treatment scenario (natural history, radiotherapy alone, Stupp,
surgery + Stupp), true parameters drawn from the priors of docs/burden.md (V0 5-40 mL and rho
0.005-0.05 /day log-uniform), measurement days like the phantom cohort's, and measured volumes =
true volumes x exp(noise x N(0, 1)). The model is fitted with the automatic free-parameter rule,
bootstrapped, and the 90 % band at 30, 60 and 90 days after the last measurement is compared with the
true (noise-free) volume. Printed: coverage per scenario and forecast horizon, median band width, and
the median relative error of the fitted free parameters. Quoted in docs/burden.md.

``--phantom N`` instead takes N synthetic patients of the brain phantom (AnatomyDTLib.brain.phantom,
a spatial simulator richer than the burden model: invasion, hypoxia, mass effect, resection by
mask), fits the burden model to all their visible tumour volumes but the last and checks the
forecast of the last one (seed 002's "ODE validation" experiment). Patients whose tumour is not
visible on a scan (0 mL), or with fewer than 3 scans, are skipped and counted.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from AnatomyDTLib.burden import (PRIORS, BurdenParameters, bootstrap_burden, burden_volume,  # noqa: E402
                                 fit_burden, schedule_from_plan)
from AnatomyDTLib.plan import load_plan, weekly_fraction_days  # noqa: E402

SCENARIOS = ("natural_history", "rt_only", "stupp", "surgery_stupp")
HORIZONS = (30.0, 60.0, 90.0)


def scenario_plan(name: str, rng: np.random.Generator) -> dict:
    """A plan dict (format v1) for a scenario, with the phantom cohort's timing."""
    if name == "natural_history":
        return {"version": 1}
    surgery = float(rng.integers(2, 11)) if name == "surgery_stupp" else None
    start = surgery + float(rng.integers(21, 36)) if surgery is not None else float(rng.integers(14, 29))
    plan: dict = {"version": 1, "radiotherapy": {"start_day": start, "fractions": 30, "dose_per_fraction_gy": 2.0}}
    if surgery is not None:
        plan["surgery"] = [{"day": surgery, "extent": 0.8}]
    if name in ("stupp", "surgery_stupp"):
        end = weekly_fraction_days(start, 30, 5)[-1] + 1.0
        plan["chemotherapy"] = [{"agent": "temozolomide", "kill_rate_per_day": 0.01, "windows": [[start, end]]},
                                {"agent": "temozolomide", "kill_rate_per_day": 0.01, "start_day": end + 28.0,
                                 "cycles": 6, "days_on": 5, "cycle_length_days": 28}]
    return plan


def measurement_days(name: str, rng: np.random.Generator) -> np.ndarray:
    """Day 0 and 2-4 follow-ups 30-180 days apart by >= 14 days; natural history adds a pre-baseline scan."""
    n = int(rng.integers(2, 5))
    days: list[float] = []
    while len(days) < n:
        d = float(rng.integers(30, 181))
        if all(abs(d - e) >= 14 for e in days):
            days.append(d)
    out = [0.0] + sorted(days)
    if name == "natural_history":
        out = [-float(rng.integers(20, 60))] + out
    return np.asarray(out)


def true_parameters(schedule, rng: np.random.Generator) -> BurdenParameters:
    def loguniform(lo, hi):
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    s = schedule.rt_prior.draw(rng, 1)[0] if schedule.has_rt else 1.0
    r = float(np.clip(rng.uniform(0.1, 0.3), 0.01, 1)) if schedule.has_surgery else 1.0
    return BurdenParameters(loguniform(5, 40), loguniform(0.005, 0.05), s, r,
                            PRIORS["clearance_half_life_days"].draw(rng, 1)[0],
                            PRIORS["death_delay_days"].draw(rng, 1)[0])


def run(patients: int, bootstrap: int, seed: int, noise: float, verbose: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    hits = defaultdict(list)
    widths = defaultdict(list)
    errors = defaultdict(list)
    free_sets = defaultdict(int)
    started = time.perf_counter()
    for i in range(patients):
        name = SCENARIOS[i % len(SCENARIOS)]
        plan = load_plan(scenario_plan(name, rng))
        schedule = schedule_from_plan(plan)
        truth = true_parameters(schedule, rng)
        days = measurement_days(name, rng)
        volumes = burden_volume(days, truth, schedule) * np.exp(noise * rng.standard_normal(days.size))
        fit = fit_burden(days, volumes, plan)
        free_sets[(name, tuple(fit.free))] += 1
        boot = bootstrap_burden(fit, bootstrap, seed=seed * 100003 + i)
        ahead = days[-1] + np.asarray(HORIZONS)
        band = boot.band(ahead)
        true_ahead = burden_volume(ahead, truth, schedule)
        for h, lo, hi, v in zip(HORIZONS, band["lower"], band["upper"], true_ahead):
            hits[(name, h)].append(lo <= v <= hi)
            widths[(name, h)].append((hi - lo) / v)
        for nm in fit.free:
            if nm != "v0_ml":
                errors[nm].append(abs(getattr(fit.parameters, nm) - getattr(truth, nm)) / abs(getattr(truth, nm)))
        errors["v0_ml"].append(abs(fit.parameters.v0_ml - truth.v0_ml) / truth.v0_ml)
    elapsed = time.perf_counter() - started
    all_hits = [x for v in hits.values() for x in v]
    result = {"coverage": float(np.mean(all_hits)), "n": len(all_hits), "seconds": elapsed,
              "by_cell": {k: (float(np.mean(v)), float(np.median(widths[k]))) for k, v in hits.items()},
              "errors": {k: float(np.median(v)) for k, v in errors.items()}, "free_sets": dict(free_sets)}
    if verbose:
        print(f"{patients} synthetic patients, {bootstrap} bootstrap members each, log-volume noise {noise:g}, "
              f"seed {seed} ({elapsed:.1f} s)")
        print(f"overall coverage of the 90 % band: {result['coverage']:.3f} ({len(all_hits)} forecasts)")
        print("coverage (median band width / true volume) by scenario and days after the last measurement:")
        header = "  scenario          " + "".join(f"{'+%g d' % h:>18}" for h in HORIZONS)
        print(header)
        for name in SCENARIOS:
            cells = "".join(f"{result['by_cell'][(name, h)][0]:>9.3f} ({result['by_cell'][(name, h)][1]:5.2f})"
                            for h in HORIZONS)
            print(f"  {name:<18}{cells}")
        print("median relative error of the fitted parameters (when free):")
        for nm, e in result["errors"].items():
            print(f"  {nm:<26} {e:.3f}  ({len(errors[nm])} fits)")
        print("free-parameter sets chosen by the rule:")
        for (name, free), count in sorted(free_sets.items()):
            print(f"  {name:<18} {count:>4} x {', '.join(free)}")
    return result


def run_phantom(patients: int, bootstrap: int, seed: int) -> dict:
    """Leave-last-out forecasts on brain-phantom patients (2 mm atlas; about 20 s of simulation each)."""
    import json
    import tempfile

    from AnatomyDTLib.brain.phantom import case_rng, simulate_patient

    started = time.perf_counter()
    rows, skipped = [], defaultdict(int)
    for i in range(patients):
        patient = simulate_patient(case_rng(seed, i), spacing=2)
        days = np.array([s.day for s in patient.scans])
        vols = np.array([s.tumour_ml for s in patient.scans])
        if days.size < 3:
            skipped["fewer than 3 scans"] += 1
            continue
        if np.any(vols <= 0):
            skipped["tumour not visible on a scan"] += 1
            continue
        plan_dict = dict(patient.plan)
        with tempfile.TemporaryDirectory() as tmp:  # the plan names its mask/dose files: give it empty stand-ins
            for key in ("resection_mask.nii.gz", "dose_map.nii.gz"):
                (Path(tmp) / key).write_bytes(b"")
            plan = load_plan(json.loads(json.dumps(plan_dict)), base_dir=tmp)
        try:
            fit = fit_burden(days[:-1], vols[:-1], plan)
        except Exception as exc:  # noqa: BLE001 - a benchmark counts refusals
            skipped[f"refused: {type(exc).__name__}"] += 1
            continue
        band = bootstrap_burden(fit, bootstrap, seed=i).band([days[-1]])
        parts = [name for key, name in (("surgery", "surgery"), ("radiotherapy", "RT"), ("chemotherapy", "TMZ"))
                 if patient.plan.get(key)]
        rows.append(("+".join(parts) or "none", days[-1] - days[-2], vols[-1], float(band["fit"][0]), float(band["lower"][0]),
                     float(band["upper"][0]), fit.r2, len(fit.free)))
    elapsed = time.perf_counter() - started
    covered = [lo <= v <= hi for _, _, v, _, lo, hi, _, _ in rows]
    rel = [abs(f / v - 1) for _, _, v, f, _, _, _, _ in rows]
    print(f"{patients} brain-phantom patients (seed {seed}), {bootstrap} bootstrap members, {elapsed:.0f} s")
    print(f"forecast of the last scan from the earlier ones: {len(rows)} patients, 90 % band coverage "
          f"{np.mean(covered) if rows else float('nan'):.3f}, median |relative error| of the fit {np.median(rel) if rows else float('nan'):.3f}")
    print("  pattern          gap(d)  true mL   fit mL   5 %      95 %     R²(fit)  free")
    for pattern, gap, v, f, lo, hi, r2, nfree in rows:
        print(f"  {pattern:<16} {gap:6.0f} {v:8.2f} {f:8.2f} {lo:8.2f} {hi:8.2f} {r2:8.3f} {nfree:4d}")
    for reason, count in skipped.items():
        print(f"  skipped: {count} x {reason}")
    return {"coverage": float(np.mean(covered)) if rows else math.nan, "rows": rows, "skipped": dict(skipped)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.10, help="log-volume measurement noise (SD)")
    parser.add_argument("--phantom", type=int, metavar="N", help="leave-last-out forecasts on N brain-phantom patients")
    args = parser.parse_args(argv)
    if args.phantom:
        run_phantom(args.phantom, args.bootstrap, args.seed)
    else:
        run(args.patients, args.bootstrap, args.seed, args.noise)
    return 0


if __name__ == "__main__":
    sys.exit(main())
