"""Solver throughput, memory and roofline on this machine (a measurement, not a test).

    python benchmarks/solver.py            # all grids, with and without gradients
    python benchmarks/solver.py --quick    # small grids only

For K = 5 classes and the grids 128², 96×112×96 and 240×240×155 it prints, per configuration:

* voxel·class·steps per second of the IMEX step (median over repeats);
* peak resident memory of the process (each configuration runs in its own process);
* the machine's memory-copy bandwidth measured in the same run, and the roofline ratio: the
  step's unavoidable memory traffic (read the state once, write it once: 2·K·N·4 bytes in
  float32) divided by the step time, as a fraction of that bandwidth.

Two problem set-ups:

* ``brain`` — the real use: an ellipsoid brain phantom with a tumour, brain default parameters
  (tumour diffusion depending on tissue, χ on three rows, logistic growth);
* ``dense`` — a worst case: every class diffuses and every pair cross-diffuses, on a random field
  where every voxel lies at an interface.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from perf_common import copy_bandwidth_gb_s  # noqa: E402  (one bandwidth measurement for all benchmarks)

GRIDS = {"128x128": (128, 128), "96x112x96": (96, 112, 96), "240x240x155": (155, 240, 240)}
K = 5


def _problem(setup: str, shape):
    """p0 and simulate() keyword arguments for a set-up on a grid."""
    from AnatomyDTLib.parameters import PDEParameters
    from AnatomyDTLib.phantom import ellipsoid_brain
    from AnatomyDTLib.schema import BRAIN_SCHEMA
    from AnatomyDTLib.state import labels_to_field

    if setup == "brain":
        if len(shape) == 2:
            labels3, _, _ = ellipsoid_brain(shape=(3,) + shape, spacing_mm=(1.0, 1.0, 1.0), tumour_centre_mm=(0, -10, 14),
                                            tumour_radius_mm=12.0)
            labels = labels3[1]
        else:
            labels, _, _ = ellipsoid_brain(shape=shape, spacing_mm=(1.0, 1.0, 1.0), tumour_centre_mm=(0, -10, 14),
                                           tumour_radius_mm=15.0)
        p0 = labels_to_field(labels, K)
        kwargs = PDEParameters.brain_defaults().simulate_kwargs(p0, BRAIN_SCHEMA)
        kwargs["dt"] = 1.0
        return p0, kwargs
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, K, shape, generator=g)
    p0 = torch.nn.functional.one_hot(labels, K).movedim(-1, 0).float().contiguous()
    chi = (torch.rand(K, K, generator=g) - 0.5) * 0.2
    chi.fill_diagonal_(0)
    return p0, dict(diffusion=[0.05, 0.2, 0.1, 0.1, 0.05], growth_rate=0.05, cross_diffusion=chi, dt=1.0,
                    jacobi_iters=2)


def run_one(setup: str, grid: str, grad: bool, steps: int, repeats: int) -> dict:
    from AnatomyDTLib import simulate

    torch.set_num_threads(int(os.environ.get("ANATOMYDT_THREADS", "2")))
    shape = GRIDS[grid]
    p0, kwargs = _problem(setup, shape)
    spacing = (1.0,) * len(shape)
    times = []
    for _ in range(repeats):
        if grad:
            alpha = torch.tensor(float(kwargs.pop("growth_rate", 0.05)), requires_grad=True)
            t0 = time.perf_counter()
            out = simulate(p0, spacing=spacing, days=steps * kwargs["dt"], growth_rate=alpha, checkpoint=len(shape) == 3,
                           **kwargs)
            out[1].sum().backward()
            kwargs["growth_rate"] = float(alpha.detach())
        else:
            t0 = time.perf_counter()
            with torch.no_grad():
                simulate(p0, spacing=spacing, days=steps * kwargs["dt"], **kwargs)
        times.append((time.perf_counter() - t0) / steps)
    per_step = statistics.median(times)
    voxels = p0[0].numel()
    return {
        "setup": setup, "grid": grid, "grad": grad, "steps": steps, "seconds_per_step": per_step,
        "voxel_class_steps_per_s": K * voxels * 1.0 / per_step,
        "step_traffic_bytes": 2 * K * voxels * 4,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only 128x128 and 96x112x96")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed run (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = parser.parse_args()
    if args.one:
        setup, grid, grad = args.one.split(":")
        print(json.dumps(run_one(setup, grid, grad == "grad", args.steps, args.repeats)))
        return
    grids = ["128x128", "96x112x96"] if args.quick else list(GRIDS)
    bandwidth = copy_bandwidth_gb_s(repeats=5)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {os.environ.get('ANATOMYDT_THREADS', '2')} threads; "
          f"memory-copy bandwidth {bandwidth:.1f} GB/s (read+write, 512 MB, median of 5)")
    header = f"{'setup':6} {'grid':12} {'grad':5} {'s/step':>8} {'Mvox·cls·step/s':>16} {'peak GB':>8} {'roofline':>9}"
    print(header)
    print("-" * len(header))
    for setup in ("brain", "dense"):
        for grid in grids:
            for grad in (False, True):
                steps = args.steps if not grad or grid != "240x240x155" else 2
                cmd = [sys.executable, __file__, "--one", f"{setup}:{grid}:{'grad' if grad else 'nograd'}",
                       "--steps", str(steps), "--repeats", str(args.repeats if not grad else 1)]
                result = subprocess.run(cmd, capture_output=True, text=True)
                if result.returncode != 0:
                    print(f"{setup:6} {grid:12} {str(grad):5} failed: {result.stderr.strip().splitlines()[-1]}")
                    continue
                r = json.loads(result.stdout.strip().splitlines()[-1])
                achieved = r["step_traffic_bytes"] / r["seconds_per_step"] / 1e9
                print(f"{setup:6} {grid:12} {str(grad):5} {r['seconds_per_step']:8.3f} "
                      f"{r['voxel_class_steps_per_s'] / 1e6:16.1f} {r['peak_rss_gb']:8.2f} {achieved / bandwidth:9.3f}")


if __name__ == "__main__":
    main()
