"""AnatomyDT against a peer solver, TumorGrowthToolkit (issue 9, target 3): a measurement, not a test.

    python benchmarks/perf_peer_tgt.py --tgt /tmp/tgt              # a local copy of the peer (not fetched here)
    python benchmarks/perf_peer_tgt.py --tgt /tmp/tgt --repeats 5 --tgt-repeats 3

TumorGrowthToolkit (MIT, github m1balcerak/TumorGrowthToolkit) solves single-species
Fisher–Kolmogorov growth with white/grey-matter-dependent diffusion by explicit Euler in numpy
(``TumorGrowthToolkit.FK.Solver``). This script does not download it: pass the folder of a local
copy with ``--tgt`` (the folder that contains the ``TumorGrowthToolkit`` package); without it the
script says so and exits.

Same problem size for both: the 240×240×155, 1 mm test case (``perf_common.brain_case``), a
90-day horizon, tumour diffusion 0.2 mm²/day in white matter and a white/grey ratio of 10,
proliferation 0.05/day (AnatomyDT's ``pde-only`` brain defaults). The peer gets the case's white
and grey matter as its tissue maps and a seed at the centre of the case's tumour, with
``resolution_factor`` 1 (full 1 mm grid); it chooses its own explicit step count
(T·Dw/h²·8 + 100 = 244 steps). AnatomyDT runs its 5-class ``pde-only`` forecast (Δt = 1 day,
90 steps, untreated, since the peer has no treatment), through the same no-grad path as
``anatomydt predict``. Each run is a fresh subprocess (its own peak RSS).

Printed: wall time of the solve (median of repeats; the peer's solve() includes its tissue
crop and the final resampling, ours includes building the problem), the time inside the time
loop, steps, and time per voxel·step, both over the full grid (N = 240·240·155) and over the
voxels each solver actually updates per step (the peer: its brain bounding box; AnatomyDT: the
mean active box).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_common as pc  # noqa: E402

SHAPE_XYZ = (240, 240, 155)
DAYS = 90
D_WHITE = 0.2  # mm²/day
WHITE_GREY_RATIO = 10.0
RHO = 0.05  # 1/day


def _tissue_maps():
    """(white, grey, tumour-centre fractions) of the test case, float64 arrays in array order (z, y, x)."""
    import numpy as np
    import torch

    from AnatomyDTLib.schema import BRAIN_SCHEMA

    p0, _ = pc.brain_field(SHAPE_XYZ)
    wm = p0[BRAIN_SCHEMA.index("white_matter")].double().numpy()
    gm = p0[BRAIN_SCHEMA.index("grey_matter")].double().numpy()
    tumour = p0[BRAIN_SCHEMA.tumour_index]
    idx = torch.nonzero(tumour > 0.5).double().mean(dim=0)
    centre = [float(c) / n for c, n in zip(idx, tumour.shape)]
    # The peer refuses a seed outside white/grey matter; the tumour centre is tumour-labelled, so
    # give it the tissue of its surroundings there (the peer's maps are tissue fractions).
    z, y, x = (int(c * n) for c, n in zip(centre, tumour.shape))
    if wm[z, y, x] + gm[z, y, x] == 0:
        wm = wm.copy()
        core = (tumour.numpy() > 0.5)
        wm[core] = 1.0  # the tumour sits in white matter in the sample case
    return np.ascontiguousarray(wm), np.ascontiguousarray(gm), centre


def child_tgt(tgt_path: str) -> dict:
    sys.path.insert(0, tgt_path)
    from TumorGrowthToolkit.FK import Solver

    wm, gm, centre = _tissue_maps()
    info = {"steps": 0, "loop_s": 0.0, "box_voxels": None}

    class TimedSolver(Solver):  # measurement only: time the update and record the crop
        def FK_update(self, A, D_domain, f, dt, dx, dy, dz):
            t0 = time.perf_counter()
            out = super().FK_update(A, D_domain, f, dt, dx, dy, dz)
            info["loop_s"] += time.perf_counter() - t0
            info["steps"] += 1
            info["box_voxels"] = int(A.size)
            return out

    params = {"Dw": D_WHITE, "rho": RHO, "RatioDw_Dg": WHITE_GREY_RATIO, "gm": gm, "wm": wm,
              "NxT1_pct": centre[0], "NyT1_pct": centre[1], "NzT1_pct": centre[2], "init_scale": 1.0,
              "resolution_factor": 1.0, "th_matter": 0.1, "dx_mm": 1.0, "dy_mm": 1.0, "dz_mm": 1.0,
              "stopping_time": DAYS, "verbose": False}
    t0 = time.perf_counter()
    result = TimedSolver(params).solve()
    wall = time.perf_counter() - t0
    if not result.get("success"):
        raise RuntimeError(f"TumorGrowthToolkit failed: {result.get('error')}")
    pc.print_peak_rss_line()
    return {"solver": "TumorGrowthToolkit FK", "wall_s": wall, "loop_s": info["loop_s"], "steps": info["steps"],
            "voxels": int(wm.size), "box_voxels": info["box_voxels"], "classes": 1,
            "final_volume_mm3": float(result["final_volume"])}


def child_anatomydt() -> dict:
    import torch

    from AnatomyDTLib.parameters import PDEParameters
    from AnatomyDTLib.predict import PDEOnlyModel

    p0, spacing = pc.brain_field(SHAPE_XYZ)
    boxes, stamps = pc.record_step_boxes(), []
    params = PDEParameters.brain_defaults()
    model = PDEOnlyModel(parameters=params)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.forecast(p0, spacing=spacing, days=[DAYS], plan=None,
                             progress=lambda day, horizon: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    pc.print_peak_rss_line()
    return {"solver": "AnatomyDT pde-only (5 classes)", "wall_s": wall, "loop_s": stamps[-1] - stamps[0] if stamps else wall,
            "steps": len(boxes), "voxels": int(p0[0].numel()), "box_voxels": statistics.mean(boxes), "classes": 5,
            "final_volume_mm3": float(out[-1, 1].sum()) * float(torch.tensor(spacing).prod()),
            "threads": torch.get_num_threads()}


def run(kind: str, repeats: int, tgt: str | None, threads: int) -> list[dict]:
    results = []
    for _ in range(repeats):
        cmd = [sys.executable, __file__, "--child", kind] + (["--tgt", tgt] if tgt else [])
        r = pc.run_measured(cmd, env={"OMP_NUM_THREADS": str(threads), "ANATOMYDT_PERF_THREADS": str(threads)})
        if r["returncode"] != 0:
            raise RuntimeError(f"{kind} failed:\n{r['stderr'][-3000:]}")
        res = pc.last_json_line(r["stdout"])
        res.update(peak_rss_gb=(r["peak_rss_bytes"] or 0) / 1e9, load=r["load_before"], process_wall_s=r["wall_s"])
        results.append(res)
    return results


def summary(results: list[dict]) -> dict:
    wall = statistics.median(r["wall_s"] for r in results)
    loop = statistics.median(r["loop_s"] for r in results)
    r0 = results[0]
    steps = r0["steps"]
    return {"solver": r0["solver"], "classes": r0["classes"], "wall_s": wall,
            "wall_range": (min(r["wall_s"] for r in results), max(r["wall_s"] for r in results)), "loop_s": loop,
            "steps": steps, "voxels": r0["voxels"], "box_voxels": r0["box_voxels"],
            "ns_per_voxel_step_full": wall / (r0["voxels"] * steps) * 1e9,
            "ns_per_voxel_step_box": loop / (r0["box_voxels"] * steps) * 1e9,
            "peak_rss_gb": max(r["peak_rss_gb"] for r in results), "loads": [round(r["load"], 2) for r in results],
            "repeats": len(results), "final_volume_ml": statistics.median(r["final_volume_mm3"] for r in results) / 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tgt", help="folder of a local TumorGrowthToolkit copy (contains the TumorGrowthToolkit package)")
    parser.add_argument("--repeats", type=int, default=5, help="AnatomyDT runs (median; default 5)")
    parser.add_argument("--tgt-repeats", type=int, default=5, help="peer runs (median; default 5)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both (numpy's and torch's; default 2)")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--child", choices=("tgt", "anatomydt"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("ANATOMYDT_PERF_THREADS", "2")))
        print(json.dumps(child_tgt(args.tgt) if args.child == "tgt" else child_anatomydt()))
        return
    if not args.tgt:
        print("No peer given: pass --tgt PATH, the folder of a local copy of TumorGrowthToolkit "
              "(github m1balcerak/TumorGrowthToolkit; e.g. a git archive extracted to /tmp/tgt). "
              "This script downloads nothing. Skipping the comparison.")
        return
    if not (Path(args.tgt) / "TumorGrowthToolkit" / "FK" / "FK.py").is_file():
        print(f"--tgt {args.tgt}: no TumorGrowthToolkit/FK/FK.py there; give the folder that contains the package. "
              "Skipping the comparison.")
        return
    pc.brain_case(SHAPE_XYZ)
    print(f"machine: {pc.machine_text()}; {pc.load_text()}")
    ours = summary(run("anatomydt", args.repeats, None, args.threads))
    peer = summary(run("tgt", args.tgt_repeats, args.tgt, args.threads))
    for s in (ours, peer):
        lo, hi = s["wall_range"]
        print(f"\n{s['solver']}: solve {s['wall_s']:.1f} s [{lo:.1f}–{hi:.1f}] (median of {s['repeats']}), time loop "
              f"{s['loop_s']:.1f} s, {s['steps']} steps, peak RSS {s['peak_rss_gb']:.2f} GB, load {s['loads']}")
        print(f"  per voxel·step: {s['ns_per_voxel_step_full']:.2f} ns over the full grid ({s['voxels'] / 1e6:.2f} M voxels); "
              f"{s['ns_per_voxel_step_box']:.2f} ns over the voxels it updates ({s['box_voxels'] / 1e6:.2f} M per step); "
              f"tumour volume at day {DAYS}: {s['final_volume_ml']:.1f} mL (probability mass)")
    print(f"\nwall-time ratio peer / AnatomyDT: {peer['wall_s'] / ours['wall_s']:.1f}x (target > 1)")
    print(f"per voxel·step ratio peer / AnatomyDT, full grid: "
          f"{peer['ns_per_voxel_step_full'] / ours['ns_per_voxel_step_full']:.1f}x (target >= 2); per updated voxel: "
          f"{peer['ns_per_voxel_step_box'] / ours['ns_per_voxel_step_box']:.2f}x; per updated voxel and class "
          f"(AnatomyDT has 5): {peer['ns_per_voxel_step_box'] / ours['ns_per_voxel_step_box'] * 5:.2f}x")
    print(pc.load_text())
    if args.json:
        pc.write_json(args.json, {"anatomydt": ours, "peer": peer})


if __name__ == "__main__":
    main()
