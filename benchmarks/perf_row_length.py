"""Cost of the fused kernel per voxel against the length of the box's rows, and its parallel
speed-up: a measurement, not a test.

    python benchmarks/perf_row_length.py

The dense worst case of perf_roofline.py on three grids with the same 2.83 M voxels, whose rows
(the contiguous x axis) are 76 or 240 voxels long. Every stage of the kernel is a vectorised loop
per row, so a fixed cost per row (loop set-up and remainder, array views) shows as a higher cost per
voxel on short rows. Prints the median kernel time per step (steps 2–4 of a 4-day run, 2 threads),
then the full 240×240×155 dense grid with the kernel on one slab and on two
(``ANATOMYDT_KERNEL_THREADS``): the speed-up of the two cores.
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_common as pc  # noqa: E402
import perf_roofline as pr  # noqa: E402

SHAPES_ZYX = ((155, 240, 76), (155, 76, 240), (76, 155, 240))


def kernel_step_seconds(shape_zyx, days: float = 4.0) -> float:
    """Median time of the fused kernel's call per step (the first step excluded) on the dense case."""
    from AnatomyDTLib import fused_kernels, simulate

    p0, kwargs = pr._dense_problem(shape_zyx)
    original = fused_kernels._fused_step
    times = []

    def timed(*args):
        t0 = time.perf_counter()
        original(*args)
        times.append(time.perf_counter() - t0)

    fused_kernels._fused_step = timed
    try:
        with torch.no_grad():
            simulate(p0, spacing=(1.0, 1.0, 1.0), days=days, **kwargs)
    finally:
        fused_kernels._fused_step = original
    return statistics.median(times[1:])


def main() -> None:
    torch.set_num_threads(2)
    print(f"machine: {pc.machine_text()}; {pc.load_text()}")
    for shape in SHAPES_ZYX:
        seconds = kernel_step_seconds(shape)
        voxels = shape[0] * shape[1] * shape[2]
        print(f"grid (z, y, x) = {shape}: rows of {shape[2]} voxels; kernel {seconds * 1e3:.1f} ms/step, "
              f"{seconds / voxels * 1e9:.1f} ns/voxel")
    per_slabs = {}
    for slabs in (1, 2):
        os.environ["ANATOMYDT_KERNEL_THREADS"] = str(slabs)
        per_slabs[slabs] = kernel_step_seconds((155, 240, 240))
    os.environ.pop("ANATOMYDT_KERNEL_THREADS")
    print(f"grid (z, y, x) = (155, 240, 240): kernel on 1 slab {per_slabs[1] * 1e3:.1f} ms/step, on 2 slabs "
          f"{per_slabs[2] * 1e3:.1f} ms/step: speed-up {per_slabs[1] / per_slabs[2]:.2f} on 2 cores")


if __name__ == "__main__":
    main()
