"""What a radiologist waits for in Slicer: ``scene.predict_into_scene`` on the 1 mm brain case, in a
real MRML scene (the ``slicer-core`` wheel); a measurement, not a test.

    python benchmarks/perf_scene.py                       # pde-only, with and without 3D surfaces, 3 repeats
    python benchmarks/perf_scene.py --model default --repeats 5 --threads 2

The case is ``perf_end_to_end.py``'s (the sample case resampled to 240×240×155 at 1 mm, Stupp plan,
output days 30, 60 and 90). Each repeat runs in a fresh process, which first loads the FLAIR and
imports the baseline segmentation into the scene as a user has them (``Testing/test_scene.py``'s
way) and runs one short forecast (day 1, no surfaces): the state of a Slicer session after its first
Apply (modules imported, the solver kernel loaded). Then it times the Apply itself:

* ``with 3D surfaces``: what the panel does by default: per output day a segmentation node with its
  closed-surface (3D) representation, a tumour probability volume, the sequences, the table;
* ``without``: the same with ``create_surfaces=False``;
* of those, the forecast alone (``predict.predict``'s share, timed by cProfile's cumulative time,
  whose overhead on this call tree of a few thousand Python calls is a few milliseconds) and the
  surfaces alone (``vtkMRMLSegmentationNode.CreateClosedSurfaceRepresentation``);
* how well the progress bar follows the wait: at each progress call, the fraction shown against
  the share of the Apply's time gone by; printed is the largest gap between the two (0: the bar
  moves at an even pace), and the bar's value when the forecast ended against the time share.

Printed: medians [min–max] in seconds, with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_common as pc  # noqa: E402

DAYS = (30, 60, 90)


def child(model: str, surfaces: bool, threads: int) -> dict:
    import cProfile
    import pstats
    import time

    import numpy as np
    import SimpleITK as sitk
    import slicer
    import torch

    if threads:
        torch.set_num_threads(threads)

    sys.path.insert(0, str(pc.REPO / "Testing"))
    import test_scene as scene_inputs

    from AnatomyDTLib import scene
    from AnatomyDTLib.io import Geometry, read_labelmap

    case = pc.brain_case((240, 240, 155))
    baseline = read_labelmap(case["seg"])
    image = sitk.ReadImage(str(case["flair"]))
    ijk_to_ras = scene_inputs.LPS_FROM_RAS @ Geometry.from_sitk(image).ijk_to_lps()
    mrml = slicer.vtkMRMLScene()
    flair = scene_inputs._add_volume(mrml, sitk.GetArrayFromImage(image).astype(np.float32), ijk_to_ras, "FLAIR")
    segmentation = scene_inputs._import_segmentation(mrml, baseline.labels.astype(np.uint8), ijk_to_ras, flair)
    scene.predict_into_scene(mrml, segmentation, flair, days=[1], model=model, create_surfaces=False)
    profile = cProfile.Profile()
    calls = []  # (seconds since the start, fraction shown)
    start = time.perf_counter()
    profile.enable()
    scene.predict_into_scene(mrml, segmentation, flair, days=list(DAYS), plan=str(case["plan"]), model=model,
                             create_surfaces=surfaces,
                             progress=lambda fraction: calls.append((time.perf_counter() - start, float(fraction))))
    profile.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)

    def cumulative(name: str, file_part: str = "") -> float:
        return sum(v[3] for k, v in stats.items() if k[2] == name and file_part in k[0])

    forecast = cumulative("predict", "AnatomyDTLib")
    # the bar when the forecast ended: the last fraction shown before its end (calls start when reading ends)
    read_s = next((t for t, f in calls if f > 0.0), 0.0)
    at_forecast_end = max((f for t, f in calls if t <= read_s + forecast + 1e-3), default=0.0)
    return {"total_s": total, "forecast_s": forecast,
            "surfaces_s": cumulative("<method 'CreateClosedSurfaceRepresentation' of "
                                     "'slicer_core.MRMLCore.vtkMRMLSegmentationNode' objects>"),
            "progress_gap": max(abs(f - t / total) for t, f in calls),
            "progress_at_forecast_end": at_forecast_end, "time_share_at_forecast_end": (read_s + forecast) / total}


def measure(model: str, surfaces: bool, repeats: int, threads: int) -> dict:
    runs = []
    for _ in range(repeats):
        load = pc.machine_load()
        out = subprocess.run([pc.python(), __file__, "--child", model, "--surfaces", str(int(surfaces)),
                              "--threads", str(threads)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"the scene run failed:\n{out.stderr[-3000:]}")
        runs.append({**pc.last_json_line(out.stdout), "load": load})
    keys = ("total_s", "forecast_s", "surfaces_s", "progress_gap", "progress_at_forecast_end",
            "time_share_at_forecast_end", "load")
    return {key: [r[key] for r in runs] for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pde-only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--surfaces", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, bool(args.surfaces), args.threads)))
        return
    try:
        import slicer
    except ImportError:
        raise SystemExit("perf_scene.py needs the slicer-core wheel (pip install slicer-core)")
    if not hasattr(slicer, "vtkMRMLScene"):
        raise SystemExit("perf_scene.py: 'slicer' here is not 3D Slicer's Python (install slicer-core)")
    print(f"machine: {pc.machine_text()}; {pc.load_text()}")
    print(f"predict_into_scene, 240x240x155 at 1 mm, model {args.model}, Stupp plan, days {list(DAYS)}, "
          f"{args.repeats} fresh processes each (after one short forecast in the same process)")
    for surfaces in (True, False):
        r = measure(args.model, surfaces, args.repeats, args.threads)
        line = (f"  {'with 3D surfaces' if surfaces else 'without 3D surfaces'}: {pc.spread(r['total_s'])}; "
                f"of it the forecast {pc.spread(r['forecast_s'])}")
        if surfaces:
            line += f", the surfaces {pc.spread(r['surfaces_s'])}"
        print(line + f" (load {min(r['load']):.2f}-{max(r['load']):.2f})")
        print(f"    progress bar: largest gap to the time gone by {statistics.median(r['progress_gap']):.2f}; at the "
              f"forecast's end it showed {statistics.median(r['progress_at_forecast_end']):.2f} with "
              f"{statistics.median(r['time_share_at_forecast_end']):.2f} of the time gone by")
    print(pc.load_text())


if __name__ == "__main__":
    main()
