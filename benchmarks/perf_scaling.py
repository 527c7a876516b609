"""How the no-grad solver's time scales with the grid and the horizon (issue 9, target 4).

    python benchmarks/perf_scaling.py                     # grids 64³..256³, horizons; PNG into docs/figures/
    python benchmarks/perf_scaling.py --repeats 3 --sizes 64 128 256

Two problems, each run in a fresh subprocess per point:

* ``brain``: the sample case resampled to an n³ grid covering the same 240 mm cube (spacing
  240/n mm), ``pde-only`` brain defaults, untreated, Δt = 1 day; time per step is the median over
  the steps of a 30-day run (the first step, which builds the problem, excluded). The inference
  path works on the box where the tumour is, so the work grows with that box, not with the grid.
* ``dense``: everything active (random mixture of 5 classes, every class diffuses, every pair
  cross-diffuses; see ``perf_roofline.py``) on an n³ grid at 1 mm; median of 3 steps after one
  warm-up step.

Versus horizon: the 240×240×155 brain case over 10–80 days (total forecast time), and the dense
problem on 96³ over 2–16 steps.

The fitted exponent is the least-squares slope of log(time) against log(voxels) (or log(days)):
1 means linear. Printed as a table and drawn in ``docs/figures/perf_scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_common as pc  # noqa: E402
import perf_roofline  # noqa: E402

FIGURE = pc.REPO / "docs" / "figures" / "perf_scaling.png"
CUBE_MM = 240.0


def child(kind: str, n: int, days: float) -> dict:
    import torch

    from AnatomyDTLib import simulate
    from AnatomyDTLib.predict import PDEOnlyModel

    if kind == "brain":
        shape = (n, n, n) if n > 0 else (240, 240, 155)
        spacing_mm = CUBE_MM / n if n > 0 else 1.0
        p0, spacing = pc.brain_field(shape, spacing_mm)
        model = PDEOnlyModel()
        kwargs = model.parameters.simulate_kwargs(p0, model.schema)
        kwargs["schema"] = model.schema
    else:
        p0, kwargs = perf_roofline._dense_problem((n, n, n))
        spacing = (1.0, 1.0, 1.0)
    stamps = []
    t0 = time.perf_counter()
    with torch.no_grad():
        simulate(p0, spacing=spacing, days=float(days), progress=lambda d, h: stamps.append(time.perf_counter()),
                 **kwargs)
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    return {"kind": kind, "n": n, "voxels": int(p0[0].numel()), "days": days, "total_s": total,
            "step_s": statistics.median(steps[1:]) if len(steps) > 1 else steps[0]}


def measure(kind: str, n: int, days: float, repeats: int, threads: int) -> dict:
    runs = []
    for _ in range(repeats):
        r = pc.run_measured([sys.executable, __file__, "--child", kind, "--n", str(n), "--days", str(days)],
                            env={"OMP_NUM_THREADS": str(threads), "ANATOMYDT_PERF_THREADS": str(threads)})
        if r["returncode"] != 0:
            raise RuntimeError(f"{kind} n={n} failed:\n{r['stderr'][-3000:]}")
        res = pc.last_json_line(r["stdout"])
        res["load"] = r["load_before"]
        runs.append(res)
    return {"kind": kind, "n": n, "voxels": runs[0]["voxels"], "days": days,
            "step_s": statistics.median(r["step_s"] for r in runs), "total_s": statistics.median(r["total_s"] for r in runs),
            "loads": [round(r["load"], 2) for r in runs], "repeats": repeats}


def slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def _style(axes, xlabel: str, ylabel: str, title: str) -> None:
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()


def plot(grid_rows: dict, horizon_rows: dict, exponents: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, rows in grid_rows.items():
        if rows:
            a.loglog([r["voxels"] for r in rows], [r["step_s"] for r in rows], "o-",
                     label=f"{kind} (exponent {exponents['grid_' + kind]:.2f})")
    _style(a, "voxels", "time per step (s)", "no-grad step vs grid size")
    for kind, rows in horizon_rows.items():
        if rows:
            label = "brain 240×240×155 (days)" if kind == "brain" else "dense 96³ (steps = days)"
            b.loglog([r["days"] for r in rows], [r["total_s"] for r in rows], "o-",
                     label=f"{label}, exponent {exponents['horizon_' + kind]:.2f}")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    horizons = sorted({r["days"] for rows in horizon_rows.values() for r in rows})
    if horizons:  # label the horizons measured, in plain numbers (log-axis minor labels overlap)
        b.set_xticks(horizons)
        b.xaxis.set_major_formatter(ScalarFormatter())
    b.xaxis.set_minor_formatter(NullFormatter())
    b.yaxis.set_minor_formatter(NullFormatter())
    _style(b, "horizon (days, Δt = 1 day)", "forecast time (s)", "forecast time vs horizon")
    fig.suptitle(f"AnatomyDT no-grad solver, {pc.machine_text()}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 160, 192, 224, 256])
    parser.add_argument("--brain-days", type=float, default=30.0)
    parser.add_argument("--horizons", type=float, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--dense-horizons", type=float, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5, help="runs per point (median; default 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=("brain", "dense"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--days", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("ANATOMYDT_PERF_THREADS", "2")))
        print(json.dumps(child(args.child, args.n, args.days)))
        return
    print(f"machine: {pc.machine_text()}; {pc.load_text()}; {args.repeats} runs per point, medians")
    for n in args.sizes:  # make the cases outside the timings
        pc.brain_case((n, n, n), CUBE_MM / n)
    pc.brain_case((240, 240, 155), 1.0)
    kinds = ["brain"] + ([] if args.skip_dense else ["dense"])
    grid_rows = {k: [] for k in kinds}
    print(f"\n{'problem':8} {'grid':>9} {'voxels':>11} {'s/step':>9} {'ns/voxel·step':>14}  load")
    for kind in kinds:
        for n in args.sizes:
            r = measure(kind, n, args.brain_days if kind == "brain" else 4, args.repeats, args.threads)
            grid_rows[kind].append(r)
            print(f"{kind:8} {str(n) + '³':>9} {r['voxels']:>11,} {r['step_s']:9.4f} "
                  f"{r['step_s'] / r['voxels'] * 1e9:14.2f}  {r['loads']}", flush=True)
    horizon_rows = {k: [] for k in kinds}
    print(f"\n{'problem':8} {'days':>6} {'forecast s':>11}  load")
    for kind in kinds:
        for days in (args.horizons if kind == "brain" else args.dense_horizons):
            r = measure(kind, 0 if kind == "brain" else 96, days, args.repeats, args.threads)
            horizon_rows[kind].append(r)
            print(f"{kind:8} {days:6g} {r['total_s']:11.2f}  {r['loads']}", flush=True)
    exponents = {}
    for kind in kinds:
        exponents["grid_" + kind] = slope([r["voxels"] for r in grid_rows[kind]], [r["step_s"] for r in grid_rows[kind]])
        exponents["horizon_" + kind] = slope([r["days"] for r in horizon_rows[kind]],
                                             [r["total_s"] for r in horizon_rows[kind]])
    print("\nfitted exponents (time ∝ size^e; 1 = linear): " +
          ", ".join(f"{k} {v:.2f}" for k, v in exponents.items()))
    plot(grid_rows, horizon_rows, exponents, args.figure)
    print(f"figure: {args.figure}\n{pc.load_text()}")
    if args.json:
        pc.write_json(args.json, {"grid": grid_rows, "horizon": horizon_rows, "exponents": exponents})


if __name__ == "__main__":
    main()
