"""What reading a box out of a grid costs when its rows are short pieces of the grid's rows: a
measurement, not a test.

    python benchmarks/strided_rows.py

The fused kernel reads the state and the diffusion weights box by box. On the brain case the box
is 90 × 103 × 87 voxels of a 155 × 240 × 240 grid, so every row it reads is 87 floats taken out
of a row of 240. This script copies such a box of a 5-channel float32 field (one thread, numba,
the caches flushed before each copy by writing a 64 MB buffer) in four layouts:

* the box inside the 240-wide grid (the kernel's state, and its weights before they were packed);
* the same planes with whole rows of 240: 2.8× the bytes;
* the box packed on its own (rows of 87, contiguous);
* the box inside a grid 120 voxels wide (as the weights packed on a region around the box).

Printed: the median time of 9 copies and the rate in GB/s of the bytes the box holds. On the
machines of docs/performance.md the first two take about the same time: the cost follows the
span of memory the rows lie in, not the bytes read, which is why ``FusedStep`` packs the
diffusion weights onto a region around the box.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _copy_box_kernel():
    from numba import njit

    @njit(cache=False, fastmath=True, error_model="numpy")
    def copy_box(field, out, planes, y0, ny, x0, nx):
        for z in range(planes):
            for c in range(field.shape[0]):
                for ly in range(ny):
                    source, target = field[c, z, y0 + ly, x0:], out[c, ly]
                    for x in range(nx):
                        target[x] = source[x]

    return copy_box


def seconds_to_copy(copy_box, field: np.ndarray, y0: int, x0: int, nx: int, planes: int, ny: int,
                    repeats: int = 9) -> float:
    """Median wall time (s) of copying ``planes`` planes of ny × nx voxels (from row y0, column x0)."""
    flush = np.ones(64 * 2 ** 20 // 4, dtype=np.float32)
    out = np.zeros((field.shape[0], ny, nx), dtype=field.dtype)
    copy_box(field, out, 1, y0, ny, x0, nx)  # compile
    times = []
    for _ in range(repeats):
        flush += 1.0  # evict the field from the caches
        start = time.perf_counter()
        copy_box(field, out, planes, y0, ny, x0, nx)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import perf_common as pc

    planes, ny, nx, channels = 90, 103, 87, 5
    rng = np.random.default_rng(0)
    layouts = [
        ("box rows of 87 in a 240-wide grid", rng.random((channels, planes, 240, 240), dtype=np.float32), 61, 50, nx),
        ("whole rows of 240 (2.8x the bytes)", None, 61, 0, 240),
        ("packed box (rows of 87, contiguous)", rng.random((channels, planes, ny, nx), dtype=np.float32), 0, 0, nx),
        ("box rows of 87 in a 120-wide grid", rng.random((channels, planes, 240, 120), dtype=np.float32), 61, 16, nx),
    ]
    layouts[1] = (layouts[1][0], layouts[0][1]) + layouts[1][2:]
    copy_box = _copy_box_kernel()
    print(f"machine: {pc.machine_text()}; {pc.load_text()}; one thread")
    for label, field, y0, x0, width in layouts:
        seconds = seconds_to_copy(copy_box, field, y0, x0, width, planes, ny)
        megabytes = channels * planes * ny * width * 4 / 1e6
        print(f"  {label:38s} {1e3 * seconds:6.2f} ms for {megabytes:5.1f} MB: {megabytes / 1e3 / seconds:5.1f} GB/s")


if __name__ == "__main__":
    main()
