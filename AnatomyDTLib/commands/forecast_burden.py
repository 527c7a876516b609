"""``anatomydt forecast-burden``: fit the tumour-burden model to measured volumes and forecast with a band.

    anatomydt forecast-burden --volumes V.csv [--plan PLAN.json] --days 30,60,90
                              [--bootstrap 1000] [--seed 0] [--free NAMES] [--out DIR] [--force]

V.csv has two columns, ``day`` (days from the baseline scan) and ``volume_ml`` (tumour volume in
mL), with or without a header row. Prints the fitted parameters, R², RMSE and a table of the forecast
(fit, bootstrap median and 90 % band) per day. With ``--out`` it also writes ``burden_forecast.csv``,
``burden_forecast.png`` and ``burden_fit.json`` into DIR, atomically, refusing to overwrite them
without ``--force``. Model and method: docs/burden.md.
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import json
from pathlib import Path

from ..burden import (PARAMETER_NAMES, bootstrap_burden, fit_burden, plot_burden_forecast, read_volumes_csv,
                      schedule_from_plan)
from ..io import atomic_output
from ..plan import load_plan, plan_summary
from ._common import add_force_argument, check_outputs_free, parse_days

NAME = "forecast-burden"
HELP = "Fit the tumour-burden (volume) model to measured volumes and forecast with a bootstrap band."
DESCRIPTION = (
    "Fit seed 002's compartmental tumour-burden model (exponential growth; radiotherapy splits the tumour into a "
    "surviving part and a dying part cleared after a delay; chemotherapy kill; surgery) to measured tumour volumes, "
    "and forecast the volume at the given days with a 90 % parametric-bootstrap band. See docs/burden.md."
)
OUTPUT_FILES = ("burden_forecast.csv", "burden_forecast.png", "burden_fit.json")
LEVEL = 0.90


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--volumes", required=True, metavar="V.csv",
                        help="measured volumes: columns day (days from baseline), volume_ml (mL); header optional")
    parser.add_argument("--plan", metavar="PLAN.json", help="treatment plan (docs/plan.md); default: no treatment")
    parser.add_argument("--days", required=True, nargs="+", metavar="D",
                        help="days to forecast, comma- or space-separated (e.g. 30,60,90)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap members for the band (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default %(default)s)")
    parser.add_argument("--free", metavar="NAMES",
                        help="comma-separated parameters to fit instead of the automatic rule, from: "
                             + ", ".join(PARAMETER_NAMES))
    parser.add_argument("--out", metavar="DIR", help="write burden_forecast.csv/.png and burden_fit.json here")
    add_force_argument(parser)


def run(args) -> int:
    days = parse_days(args.days)
    outputs = [Path(args.out) / name for name in OUTPUT_FILES] if args.out else []
    check_outputs_free(outputs, args.force, inputs=[args.volumes, args.plan])
    measured_days, volumes = read_volumes_csv(args.volumes)
    plan = load_plan(args.plan)
    free = [n.strip() for n in args.free.split(",") if n.strip()] if args.free else None
    fit = fit_burden(measured_days, volumes, schedule_from_plan(plan), free=free)
    boot = bootstrap_burden(fit, args.bootstrap, seed=args.seed)
    band = boot.band(days, LEVEL)

    print(f"volumes: {args.volumes} ({measured_days.size} measurements, days {measured_days[0]:g}-{measured_days[-1]:g})")
    print(f"plan: {plan_summary(plan)}")
    print("fitted burden model:")
    print(fit.summary())
    print(f"forecast ({boot.size} bootstrap members, seed {args.seed}; band = {LEVEL:.0%} interval, mL):")
    print(forecast_table(band))
    if outputs:
        csv_path, png_path, json_path = outputs
        write_forecast_csv(csv_path, band, force=args.force)
        plot_burden_forecast(boot, days, png_path, title=f"Tumour burden: {Path(args.volumes).name}", level=LEVEL,
                             force=args.force)
        write_fit_json(json_path, fit, boot, band, plan, args, force=args.force)
        print(f"wrote {', '.join(str(p) for p in outputs)}")
    return 0


def forecast_table(band: dict) -> str:
    """The forecast as an aligned text table (mL)."""
    header = ("day", "fit", "median", "5 %", "95 %")
    rows = [(f"{d:g}", f"{f:.2f}", f"{m:.2f}", f"{lo:.2f}", f"{hi:.2f}")
            for d, f, m, lo, hi in zip(band["day"], band["fit"], band["median"], band["lower"], band["upper"])]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows)


def write_forecast_csv(path, band: dict, *, force: bool = False) -> Path:
    """``day, fit_ml, median_ml, p05_ml, p95_ml``, one row per forecast day, written atomically."""
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["day", "fit_ml", "median_ml", "p05_ml", "p95_ml"])
    for d, f, m, lo, hi in zip(band["day"], band["fit"], band["median"], band["lower"], band["upper"]):
        writer.writerow([f"{d:g}", f"{f:.6g}", f"{m:.6g}", f"{lo:.6g}", f"{hi:.6g}"])
    with atomic_output(path, force) as tmp:
        tmp.write_text(buffer.getvalue())
    return Path(path)


def write_fit_json(path, fit, boot, band: dict, plan, args, *, force: bool = False) -> Path:
    """The fit (parameters, sources, R², RMSE, notes), the forecast and the run's arguments as JSON."""
    data = {
        "anatomydt_run": "forecast-burden",
        "volumes": {"day": fit.days.tolist(), "volume_ml": fit.volumes_ml.tolist()},
        "plan": plan.to_dict(),
        "parameters": fit.parameters.to_dict(),
        "sources": fit.sources,
        "free": fit.free,
        "r2": fit.r2,
        "rmse_ml": fit.rmse_ml,
        "sigma_log": fit.sigma_log,
        "notes": fit.notes,
        "bootstrap": {"members": boot.size, "seed": boot.seed, "level": LEVEL},
        "forecast": {k: [float(x) for x in v] for k, v in band.items()},
        "arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")},
    }
    with atomic_output(path, force) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)
