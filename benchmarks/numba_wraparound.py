"""Why the fused kernel's loops index from 0 (views) and never with a run-time offset: a
measurement, not a test.

    python benchmarks/numba_wraparound.py

numba treats a negative signed index as counting from the end, so ``a[i - w]`` with ``i`` from
``range(lo, hi)`` and run-time ``lo``, ``w`` carries a wraparound test that LLVM cannot remove;
the loop's loads are then not provably consecutive and it does not vectorise. The same 5-point
stencil is timed three ways on 100 000 float32 values: signed offsets, the indices cast to
``numba.uint64`` (no wraparound test), and 0-based loops over shifted views (what
``AnatomyDTLib/fused_kernels.py`` does per row). Printed: ns per element, median of 5 runs of
2000 calls, and that the three agree exactly.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from numba import njit, uint64


@njit(fastmath=True)
def signed_offsets(src, dst, lo, hi, w):
    for i in range(lo, hi):
        dst[i] = src[i] + 0.5 * (src[i - w] + src[i + w]) + src[i - 1] * src[i + 1]


@njit(fastmath=True)
def unsigned_indices(src, dst, lo, hi, w):
    for i in range(lo, hi):
        dst[uint64(i)] = (src[uint64(i)] + 0.5 * (src[uint64(i - w)] + src[uint64(i + w)])
                          + src[uint64(i - 1)] * src[uint64(i + 1)])


@njit(fastmath=True)
def shifted_views(src, dst, lo, hi, w):
    centre, south, north = src[lo:hi], src[lo - w:hi - w], src[lo + w:hi + w]
    west, east, out = src[lo - 1:hi - 1], src[lo + 1:hi + 1], dst[lo:hi]
    for j in range(hi - lo):
        out[j] = centre[j] + 0.5 * (south[j] + north[j]) + west[j] * east[j]


def main() -> None:
    n, w, calls = 100_000, 80, 2000
    src = np.random.default_rng(0).random(n).astype(np.float32)
    results = []
    for kernel in (signed_offsets, unsigned_indices, shifted_views):
        dst = np.zeros(n, np.float32)
        kernel(src, dst, w + 1, n - w - 1, w)  # compile
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                kernel(src, dst, w + 1, n - w - 1, w)
            runs.append((time.perf_counter() - t0) / calls / n * 1e9)
        results.append(dst)
        print(f"{kernel.__name__:18s} {statistics.median(runs):.3f} ns/element [{min(runs):.3f}–{max(runs):.3f}]")
    print("identical results:", all(np.array_equal(results[0], r) for r in results[1:]))


if __name__ == "__main__":
    main()
