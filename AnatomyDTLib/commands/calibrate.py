"""``anatomydt calibrate``: fit one patient's PDE parameters to their scan history, then forecast.

    anatomydt calibrate --history A.seg.nrrd@0 B.seg.nrrd@60 [C.seg.nrrd@120 ...] --plan PLAN.json|none
                        --days 90[,120] --out DIR [--alpha scalar|field] [--iterations N]
                        [--delayed-death DELAY,HALF_LIFE|none] [--fit-clearance auto|always|never]
                        [--hypoxia OER|none] [--fit-hypoxia] [--ensemble N [--ensemble-seed S]]
                        [--classes MAP] [--force]

Days (``@DAY`` and ``--days``) count on the treatment plan's day axis: day 0 is the plan's
baseline (for most plans the first scan). ``--plan none`` states that the patient had no
treatment. See :mod:`AnatomyDTLib.calibration` and docs/calibration.md.

Writes into DIR:

* ``calibrated_parameters.json`` — the fitted parameters in the PDEParameters format
  (``anatomydt simulate --params``); with ``--alpha field`` α there is the scalar α0 and
* ``growth_rate_map.nii.gz`` — α(x) in 1/day on the last scan's grid;
* ``fit_report.csv`` — per later history scan: observed and fitted tumour volume (mL), the
  error, tumour Dice, and the same with the starting parameters;
* ``loss_curve.csv`` — loss and its terms per iteration;
* ``forecast_day{D}.seg.nrrd`` — the forecast segmentation per requested day D (on the last scan's grid);
* ``volumes.csv`` — class volumes in mL: the last scan, then every forecast day;
* with ``--ensemble N`` (how sure the forecast is, :mod:`AnatomyDTLib.calibration_ensemble`):
  ``forecast_day{D}_tumour_probability.nii.gz`` — per day, the fraction of the N forecasts over
  the delayed-death priors in which each voxel is tumour (0..1), and ``volume_band.csv`` — per
  day, the point forecast's tumour volume and the members' median, 5-95 % band, min and max (mL);
* ``calibration.json`` — everything above plus inputs, settings and software versions; written
  last, so its presence means the run completed.

Inputs are only read; every output is written atomically; existing outputs are refused without
``--force``.
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import math
import time
from pathlib import Path

from ..errors import InputError, OutputExistsError
from ..io import atomic_output, write_image, write_labelmap
from ..outputs import day_tag, software_versions, write_json, write_volumes_csv
from ..plan import plan_summary
from ..schema import DEFAULT_SCHEMA
from ._common import (add_class_map_argument, add_force_argument, format_volume_table, parse_class_map, parse_days,
                      progress_bar_count, read_baseline)

NAME = "calibrate"
HELP = "Fit a patient's PDE parameters to their earlier scans (digital twin), then forecast later days."
DESCRIPTION = (
    "Calibrate the tumour's diffusivity per tissue, growth rate (scalar or smooth field) and mass effect to two or "
    "more segmentations of one patient by gradient descent through the differentiable solver, report the fit, "
    "and forecast from the last scan to the requested days. Days count from the treatment plan's day 0. "
    "See docs/calibration.md."
)
RUN_FILES = ("calibrated_parameters.json", "fit_report.csv", "loss_curve.csv", "volumes.csv", "calibration.json")
FIELD_FILE = "growth_rate_map.nii.gz"
FORECAST_FILE = "forecast_day{day}.seg.nrrd"
PROBABILITY_FILE = "forecast_day{day}_tumour_probability.nii.gz"
BAND_FILE = "volume_band.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--history", required=True, nargs="+", metavar="SEG@DAY",
                        help="two or more segmentations with their day on the plan's axis, oldest first, e.g. "
                             "pre.seg.nrrd@0 post.seg.nrrd@60 (.seg.nrrd or labelmap .nii.gz/.nrrd)")
    parser.add_argument("--plan", required=True, metavar="PLAN.json",
                        help="the patient's treatment plan (docs/plan.md), or 'none' for no treatment")
    parser.add_argument("--days", required=True, nargs="+", metavar="D",
                        help="forecast days on the plan's axis, after the last scan (e.g. 90 or 90,120)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--alpha", choices=("scalar", "field"), default="scalar",
                        help="fit the growth rate as one value or as a smooth field (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=30, metavar="N",
                        help="most gradient steps (each one rollout forward and back; default %(default)s)")
    parser.add_argument("--observation", choices=("threshold", "argmax"), default="threshold",
                        help="how a tumour density becomes a label: above a visibility threshold (FLAIR-like; "
                             "default) or by argmax (docs/calibration.md)")
    parser.add_argument("--visibility-threshold", type=float, default=0.1, metavar="TAU",
                        help="tumour density (fraction of capacity) a scan shows as tumour (default %(default)s)")
    parser.add_argument("--delayed-death", default="14,21", metavar="DELAY,HALF_LIFE|none",
                        help="when the plan's radiotherapy gives no delayed_death: assume irradiated cells stay "
                             "visible DELAY days, then clear with HALF_LIFE days; the forecast then starts with "
                             "the fitted share of the last scan's tumour that is already dying. 'none': killed "
                             "cells vanish at once (default: %(default)s)")
    # calibration.CLEARANCE_FITS, written out: importing calibration here would add ~2 s to every command's start.
    parser.add_argument("--fit-clearance", choices=("auto", "always", "never"), default="never",
                        help="fit the clearance half-life of irradiated cells (the delay stays): 'auto' when two "
                             "later scans follow the first fraction and the last one its delay, 'always', or "
                             "'never' (default: %(default)s; docs/calibration.md)")
    parser.add_argument("--fit-hypoxia", action="store_true",
                        help="fit the oxygen enhancement ratio of the plan's or --hypoxia's hypoxia together with the "
                             "radiosensitivity (off by default; docs/calibration.md)")
    parser.add_argument("--hypoxia", default="none", metavar="OER|none",
                        help="when the plan's radiotherapy gives no hypoxia: assume densely packed tumour (60-95 %% "
                             "of a voxel) is hypoxic and needs OER times the dose (oxygen enhancement ratio, 1..4, "
                             "e.g. 2.25; docs/plan.md). 'none': every cell responds alike (default: %(default)s)")
    parser.add_argument("--restart-density", choices=("ordered", "coded"), default="ordered",
                        help="how the forecast codes the last scan's lesion as a density: 'ordered' puts the coded "
                             "densities where the fitted rollout is densest (where the lesion is oldest), 'coded' "
                             "makes them rise with the depth in the last lesion only (default: %(default)s; "
                             "docs/calibration.md)")
    parser.add_argument("--ensemble", type=int, default=0, metavar="N",
                        help="also say how sure the forecast is: N more forecasts (2..256, e.g. 16), each with a "
                             "death delay and clearance half-life of irradiated cells drawn from their priors (the "
                             "values two scans cannot fit); writes a tumour probability map per day and a volume "
                             "band. The band is the spread of that assumption only, a lower bound on the "
                             "uncertainty: on held-out phantoms it held the true volume in 14 of 31 forecasts "
                             "(default: %(default)s = off; docs/calibration.md)")
    parser.add_argument("--ensemble-seed", type=int, default=0, metavar="S",
                        help="seed of the ensemble's draws (default: %(default)s)")
    add_class_map_argument(parser)
    add_force_argument(parser)


def parse_hypoxia(text: str) -> float | None:
    """``OER`` -> the oxygen enhancement ratio (1..4); ``none`` -> None."""
    from ..plan import MAX_OXYGEN_ENHANCEMENT_RATIO

    if text.strip().lower() == "none":
        return None
    try:
        oer = float(text)
    except ValueError:
        raise InputError(f"--hypoxia {text!r}: give an oxygen enhancement ratio (e.g. 2.25) or 'none'.") from None
    if not (math.isfinite(oer) and 1.0 <= oer <= MAX_OXYGEN_ENHANCEMENT_RATIO):
        raise InputError(f"--hypoxia {text!r}: the oxygen enhancement ratio must be between 1 (no effect) and "
                         f"{MAX_OXYGEN_ENHANCEMENT_RATIO:g}.")
    return oer


def parse_delayed_death(text: str) -> tuple[float, float] | None:
    """``DELAY,HALF_LIFE`` (days) -> (delay, half-life); ``none`` -> None."""
    if text.strip().lower() == "none":
        return None
    parts = text.split(",")
    try:
        delay, half_life = (float(v) for v in parts)
    except ValueError:
        raise InputError(f"--delayed-death {text!r}: write DELAY,HALF_LIFE in days (e.g. 14,21) or 'none'.") from None
    if not (math.isfinite(delay) and math.isfinite(half_life) and delay >= 0 and half_life > 0):
        raise InputError(f"--delayed-death {text!r}: the delay must be >= 0 days and the half-life > 0 days.")
    return delay, half_life


def parse_history_item(text: str) -> tuple[str, float]:
    """``PATH@DAY`` -> (path, day)."""
    if "@" not in text:
        raise InputError(f"--history entry {text!r} has no day; write it as SEGMENTATION@DAY, e.g. {text}@0.")
    path, day_text = text.rsplit("@", 1)
    if not path:
        raise InputError(f"--history entry {text!r} has no file before '@'.")
    try:
        day = float(day_text)
    except ValueError:
        raise InputError(f"--history entry {text!r}: the day {day_text!r} is not a number of days.") from None
    if not math.isfinite(day):
        raise InputError(f"--history entry {text!r}: the day must be finite.")
    return path, day


def output_paths(out: Path, days: list[float], alpha: str, ensemble: bool = False) -> list[Path]:
    paths = [out / FORECAST_FILE.format(day=day_tag(d)) for d in days] + [out / n for n in RUN_FILES]
    if ensemble:
        paths += [out / PROBABILITY_FILE.format(day=day_tag(d)) for d in days] + [out / BAND_FILE]
    return paths + ([out / FIELD_FILE] if alpha == "field" else [])


def _check_outputs(out: Path, paths: list[Path], inputs: list[str], force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; give a folder for the calibration outputs.")
    resolved = {Path(p).resolve() for p in inputs if p}
    for path in paths:
        if path.resolve() in resolved:
            raise InputError(f"Output {str(path)!r} is one of the inputs; choose another --out folder "
                             "(inputs are never modified).")
    existing = [p for p in paths if p.exists()]
    if out.is_dir():
        existing += [p for pattern in (FORECAST_FILE, PROBABILITY_FILE) for p in out.glob(pattern.format(day="*"))
                     if p not in existing]
    if existing and not force:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        shown = ", ".join(p.name for p in existing[:3]) + more
        raise OutputExistsError(f"Output folder {str(out)!r} already holds calibration outputs ({shown}); pass --force "
                                "to overwrite them or choose another --out folder.")


def _write_csv(path: Path, header: list[str], rows: list[list], force: bool) -> None:
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_output(path, force) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def fit_table(calibration) -> str:
    """The per-scan fit as an aligned text table."""
    header = ["scan", "day", "observed mL", "fitted mL", "error mL", "tumour Dice", "Dice at start"]
    body = [[f.name, f"{f.day:g}", f"{f.observed_tumour_ml:.2f}", f"{f.fitted_tumour_ml:.2f}",
             f"{f.volume_error_ml:+.2f}", f"{f.tumour_dice:.3f}", f"{f.initial_tumour_dice:.3f}"]
            for f in calibration.fits]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [header] + body)


def delayed_death_line(calibration) -> str:
    """What the fit and forecast assume about irradiated cells, and what the forecast carries over."""
    summary = calibration.to_dict()["radiotherapy"]["delayed_death"]
    if summary is None:
        return ("delayed death: none (no radiotherapy, or --delayed-death none): killed cells vanish at once")
    fitted = ", half-life fitted" if summary["clearance_half_life_fitted"] else ""
    text = (f"delayed death: irradiated cells stay visible {summary['delay_days']:g} days, then clear with a "
            f"half-life of {summary['clearance_half_life_days']:.3g} days ({summary['source']}{fitted})")
    if summary["carried_into_forecast"]:
        text += (f"; the forecast starts with {100 * summary['dying_share_of_last_scan_tumour']:.0f} % of the last "
                 "scan's tumour already lethally hit (from the fitted history)")
    return text


def ensemble_line(ensemble) -> str:
    """One line per forecast day: the members' median tumour volume and 90 % band."""
    drawn = " and ".join("death delay" if n == "death_delay_days" else "clearance half-life" for n in ensemble.drawn)
    parts = [f"day {row['day']:g}: {row['median_ml']:.2f} mL ({row['p5_ml']:.2f}-{row['p95_ml']:.2f})"
             for row in ensemble.volume_band()]
    return (f"ensemble of {ensemble.members} over the {drawn} priors (seed {ensemble.seed}), tumour median "
            f"(5-95 %): " + "; ".join(parts) + " -- the spread of that assumption only, a lower bound on the "
            "forecast's uncertainty")


def _write_ensemble(out: Path, ensemble, volumes, geometry, schema, force: bool) -> None:
    """The probability map of every day and the volume band table."""
    for i, day in enumerate(ensemble.days):
        write_image(out / PROBABILITY_FILE.format(day=day_tag(day)), ensemble.tumour_probability[i], geometry,
                    force=force)
    from ..calibration_ensemble import BAND_TABLE_COLUMNS

    rows = ensemble.band_table([v[schema.names[schema.tumour_index]] for _, v in volumes[1:]])
    text = [[f"{day:g}", *(f"{v:.3f}" for v in millilitres), members] for day, *millilitres, members in rows]
    _write_csv(out / BAND_FILE, list(BAND_TABLE_COLUMNS), text, force)


def run(args) -> int:
    from ..calibration import CalibrationSettings, HistoryScan, calibrate, forecast, load_plan_on_grid, prepare_history
    from ..calibration_ensemble import check_ensemble_possible, check_members, forecast_ensemble

    started = time.perf_counter()
    schema = DEFAULT_SCHEMA
    items = [parse_history_item(t) for t in args.history]
    if len(items) < 2:
        raise InputError(f"--history needs at least 2 segmentations with their days (got {len(items)}), e.g. "
                         "--history pre.seg.nrrd@0 post.seg.nrrd@60.")
    days = parse_days(args.days)
    assumed_delayed_death = parse_delayed_death(args.delayed_death)
    assumed_hypoxia = parse_hypoxia(args.hypoxia)
    if args.iterations < 0:
        raise InputError(f"--iterations must be >= 0, got {args.iterations}.")
    if not 0.001 <= args.visibility_threshold <= 0.9:
        raise InputError(f"--visibility-threshold must be a tumour density between 0.001 and 0.9 (a fraction of "
                         f"the carrying capacity; FLAIR-like: 0.1), got {args.visibility_threshold:g}.")
    if args.ensemble:
        check_members(args.ensemble)
    out = Path(args.out)
    plan_arg = None if args.plan.strip().lower() == "none" else args.plan
    paths = output_paths(out, days, args.alpha, bool(args.ensemble))
    _check_outputs(out, paths, [p for p, _ in items] + [plan_arg], args.force)

    # Inputs, all checked before the fit runs.
    class_map = parse_class_map(args.classes)
    scans = []
    for path, day in items:
        state = read_baseline(path, schema, class_map)
        scans.append(HistoryScan(state.to_labels(), state.geometry, day, Path(path).name))
    common = prepare_history(scans)
    reference = common[-1]
    shape = tuple(reference.labels.shape)
    plan = load_plan_on_grid(plan_arg, reference.geometry, shape)
    if args.ensemble:
        check_ensemble_possible(plan, assumed_delayed_death)
    if days[0] <= reference.day:
        raise InputError(f"--days must come after the last history scan (day {reference.day:g}); got "
                         f"{', '.join(f'{d:g}' for d in days)}. Days count on the plan's axis, like the @DAY of "
                         "--history.")
    print(f"history: {', '.join(f'{s.name} (day {s.day:g})' for s in common)}; grid of {reference.name}: "
          f"{'x'.join(str(n) for n in reversed(shape))} voxels, spacing "
          f"{'x'.join(f'{v:g}' for v in reference.geometry.spacing)} mm")
    print(f"plan: {plan_summary(plan)}")

    settings = CalibrationSettings(alpha=args.alpha, iterations=args.iterations, observation=args.observation,
                                   visibility_threshold=args.visibility_threshold,
                                   assumed_delayed_death=assumed_delayed_death, assumed_hypoxia=assumed_hypoxia,
                                   fit_clearance=args.fit_clearance, fit_hypoxia=args.fit_hypoxia,
                                   order_density=args.restart_density == "ordered")
    settings.check()
    with progress_bar_count(max(args.iterations, 1), "iteration") as bar:
        calibration = calibrate(common, plan, settings=settings,
                                on_iteration=lambda r: bar(r["iteration"], args.iterations))
    print(f"fit: {calibration.iterations} iterations, {calibration.stop_reason}, {calibration.seconds:.1f} s; "
          f"loss {calibration.loss_history[0]['loss']:.4f} -> {min(r['loss'] for r in calibration.loss_history):.4f}"
          if calibration.loss_history else "fit: no iterations (starting parameters kept)")
    print(fit_table(calibration))
    print(delayed_death_line(calibration))
    hypoxia = None if calibration.plan.radiotherapy is None else calibration.plan.radiotherapy.hypoxia
    if hypoxia is not None:
        print(f"hypoxia: dose divided by up to {hypoxia.oxygen_enhancement_ratio:.3g} where tumour fills "
              f"{100 * hypoxia.dense_from:.0f}-{100 * hypoxia.dense_to:.0f} % of a voxel"
              + (" (ratio fitted)" if calibration.hypoxia_fitted else ""))
    result = forecast(calibration, days)
    ensemble = None
    if args.ensemble:
        with progress_bar_count(args.ensemble, "member") as bar:
            ensemble = forecast_ensemble(calibration, days, members=args.ensemble, seed=args.ensemble_seed,
                                         progress=lambda f: bar(min(args.ensemble, int(f * args.ensemble)),
                                                                args.ensemble))

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the output folder {str(out)!r}: {exc.strerror or exc}.") from exc
    force = args.force
    write_json(out / "calibrated_parameters.json", calibration.parameters.to_dict(), force=force)
    alpha_map = calibration.growth_rate_map()
    if alpha_map is not None:
        write_image(out / FIELD_FILE, alpha_map, reference.geometry, force=force)
    _write_csv(out / "fit_report.csv", ["scan", "day", "observed_tumour_ml", "fitted_tumour_ml", "volume_error_ml",
                                        "tumour_dice", "initial_tumour_ml", "initial_tumour_dice"],
               [[f.name, f"{f.day:g}", f"{f.observed_tumour_ml:.3f}", f"{f.fitted_tumour_ml:.3f}",
                 f"{f.volume_error_ml:.3f}", f"{f.tumour_dice:.4f}", f"{f.initial_tumour_ml:.3f}",
                 f"{f.initial_tumour_dice:.4f}"] for f in calibration.fits], force)
    terms = ["loss", "tumour_dice", "volume", "classes_dice", "penalty", "learning_rate", "backtracked"]
    _write_csv(out / "loss_curve.csv", ["iteration"] + terms,
               [[r["iteration"]] + [f"{r[t]:.6g}" if isinstance(r[t], float) else r[t] for t in terms]
                for r in calibration.loss_history], force)
    tags = result.prediction.segment_tags()
    for i, day in enumerate(result.days):
        write_labelmap(out / FORECAST_FILE.format(day=day_tag(day)), result.labels(i), reference.geometry, schema,
                       force=force, extra_segment_tags=tags)
    volumes = result.volumes_ml()
    write_volumes_csv(out / "volumes.csv", volumes, schema, force=force)
    if ensemble is not None:
        _write_ensemble(out, ensemble, volumes, reference.geometry, schema, force)
    record = {
        "anatomydt_run": "calibrate",
        "inputs": {"history": [{"path": str(Path(p).resolve()), "day": d} for p, d in items],
                   "plan_file": None if plan_arg is None else str(Path(plan_arg).resolve()),
                   "class_map": class_map},
        "days_axis": "days from the treatment plan's day 0 (the baseline its events count from)",
        "plan": plan.to_dict(),
        "plan_summary": plan_summary(plan),
        "calibration": calibration.to_dict(),
        "forecast": {"days": result.days, "start_day": result.start_day, "model": result.prediction.model_name,
                     "volumes_ml": [{"day": d, **{k: round(v, 4) for k, v in vols.items()}} for d, vols in volumes]},
        "ensemble": None if ensemble is None else ensemble.to_dict(),
        "outputs": [p.name for p in paths],
        "software": software_versions(),
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    write_json(out / "calibration.json", record, force=force)
    rows = [(f"last scan (day {volumes[0][0]:g})", volumes[0][1])] + [(f"day {d:g}", v) for d, v in volumes[1:]]
    print(format_volume_table(rows, schema))
    if ensemble is not None:
        print(ensemble_line(ensemble))
    print(f"outputs in {out.resolve()} ({time.perf_counter() - started:.1f} s)")
    return 0
