"""End-to-end ``anatomydt predict`` on a 240×240×155, 1 mm case over 90 days (issue 9, target 2).

    python benchmarks/perf_end_to_end.py                              # --model default and pde-only, 5 repeats
    python benchmarks/perf_end_to_end.py --model pde-only --repeats 5 --threads 2

Each repeat runs the real command line in a fresh process under GNU ``/usr/bin/time -v``:

    python -m AnatomyDTLib predict --seg CASE/baseline.seg.nrrd --image CASE/flair.nii.gz
        --days 30 60 90 --plan CASE/plan_stupp.json --model MODEL --device cpu --out OUT --force

so the wall time includes the Python start-up and imports, reading the segmentation, the
forecast, and writing every output (3 × (.seg.nrrd, labelmap, tumour probability map), CSV,
two PNGs, run.json). Peak memory is the process's maximum resident set size as GNU time
reports it. The case is the bundled sample case resampled to 240×240×155 at 1 mm
(``perf_common.brain_case``, made once in ``/tmp/anatomydt_perf``). Targets: <= 15 s wall, <= 4 GB.

Printed per model: median wall time over the repeats (min–max), the CLI's own timing line, peak
RSS, and the 1-minute load average before each run (the machine is shared with training).

``--delayed-death DELAY,HALF_LIFE`` (days) runs the same case with the plan's radiotherapy given
delayed death (killed cells stay visible for DELAY days, then clear with that half-life; the
calibrated forecasts always have it): a copy of the case's plan with ``delayed_death`` added,
written next to it.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_common as pc  # noqa: E402

TARGET_WALL_S = 15.0
TARGET_RSS_GB = 4.0


def predict_command(case: dict, model: str, out: Path, days=(30, 60, 90)) -> list[str]:
    return [sys.executable, "-m", "AnatomyDTLib", "predict", "--seg", str(case["seg"]), "--image", str(case["flair"]),
            "--days", *[str(d) for d in days], "--plan", str(case["plan"]), "--model", model, "--device", "cpu",
            "--out", str(out), "--force"]


def with_delayed_death(case: dict, delay_days: float, half_life_days: float) -> dict:
    """The case with a copy of its plan whose radiotherapy has delayed death."""
    import json

    plan = json.loads(Path(case["plan"]).read_text())
    plan["radiotherapy"]["delayed_death"] = {"delay_days": delay_days, "clearance_half_life_days": half_life_days}
    path = Path(case["dir"]) / f"plan_stupp_delayed_{delay_days:g}_{half_life_days:g}.json"
    path.write_text(json.dumps(plan, indent=1))
    return {**case, "plan": path}


def measure(model: str, repeats: int, threads: int, shape_xyz, days, delayed_death=None) -> dict:
    case = pc.brain_case(shape_xyz)
    if delayed_death is not None:
        case = with_delayed_death(case, *delayed_death)
    runs = []
    with tempfile.TemporaryDirectory(prefix="anatomydt_e2e_") as tmp:
        for i in range(repeats):
            out = Path(tmp) / f"run{i}"
            r = pc.run_measured(predict_command(case, model, out, days),
                                env={"OMP_NUM_THREADS": str(threads), "ANATOMYDT_NO_PROGRESS": "1"})
            if r["returncode"] != 0:
                tail = (r["stderr"] or r["stdout"]).strip().splitlines()[-3:]
                raise RuntimeError(f"predict --model {model} failed: {' | '.join(tail)}")
            cli = re.search(r"outputs in .* \(([\d.]+) s\)", r["stdout"])
            runs.append({"wall_s": r["wall_s"], "peak_rss_bytes": r["peak_rss_bytes"], "load": r["load_before"],
                         "cli_s": float(cli.group(1)) if cli else None})
    walls = [r["wall_s"] for r in runs]
    return {"model": model, "repeats": repeats, "threads": threads, "wall_median_s": statistics.median(walls),
            "wall_min_s": min(walls), "wall_max_s": max(walls),
            "cli_median_s": statistics.median([r["cli_s"] for r in runs if r["cli_s"] is not None] or [float("nan")]),
            "peak_rss_gb": max(r["peak_rss_bytes"] for r in runs) / 1e9, "loads": [round(r["load"], 2) for r in runs],
            "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append",
                        help="model to run ('default', 'pde-only' or a weights file); repeatable "
                             "(default: default and pde-only; 'default' is skipped with a note if it does not load)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per model (median reported; default 5)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the predict process (default 2)")
    parser.add_argument("--days", type=float, nargs="+", default=[30, 60, 90], help="output days (default 30 60 90)")
    parser.add_argument("--grid", default="240x240x155", help="grid x×y×z at 1 mm (default 240x240x155)")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--delayed-death", metavar="DELAY,HALF_LIFE",
                        help="give the plan's radiotherapy delayed death (days), as calibrated forecasts have it")
    args = parser.parse_args()
    delayed = None
    if args.delayed_death:
        from AnatomyDTLib.commands.calibrate import parse_delayed_death
        from AnatomyDTLib.errors import InputError

        try:
            delayed = parse_delayed_death(args.delayed_death)  # the calibrate command's own parser
        except InputError as exc:
            parser.error(str(exc))
        if delayed is None:
            parser.error("--delayed-death none: leave the option out to run the plan without delayed death")
    models = args.model or ["default", "pde-only"]
    shape = tuple(int(n) for n in args.grid.split("x"))
    print(f"machine: {pc.machine_text()}; {pc.load_text()}")
    results = []
    for model in models:
        if model == "default":
            from AnatomyDTLib.errors import InputError
            from AnatomyDTLib.predict import load_model

            try:
                load_model("default")
            except InputError as exc:
                print(f"\n--model default skipped: {exc}")
                continue
        r = measure(model, args.repeats, args.threads, shape, args.days, delayed)
        results.append(r)
        ok_wall = "meets" if r["wall_median_s"] <= TARGET_WALL_S else "MISSES"
        ok_rss = "meets" if r["peak_rss_gb"] <= TARGET_RSS_GB else "MISSES"
        print(f"\n--model {model}{' (plan with delayed death ' + args.delayed_death + ')' if delayed else ''}: wall median {r['wall_median_s']:.1f} s [{r['wall_min_s']:.1f}–{r['wall_max_s']:.1f}] "
              f"over {r['repeats']} runs ({ok_wall} the {TARGET_WALL_S:g} s target); CLI's own timer (after start-up) "
              f"{r['cli_median_s']:.1f} s; peak RSS {r['peak_rss_gb']:.2f} GB ({ok_rss} {TARGET_RSS_GB:g} GB); "
              f"load before each run {r['loads']}")
    print(f"\n{pc.load_text()}")
    if args.json:
        pc.write_json(args.json, {"machine": pc.machine_text(), "results": results})


if __name__ == "__main__":
    main()
