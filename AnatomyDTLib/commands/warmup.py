"""``anatomydt warmup``: compile the fused solver kernel now, so that no forecast waits for it.

    anatomydt warmup [--dtype float32 [float64]] [--force]

numba compiles the kernel of ``pde-only`` and calibration forecasts once per machine (35–50 s on 2
cores) and caches it; this command does it ahead of time, by a small forecast of a phantom (see
:mod:`AnatomyDTLib.warmup`). The Slicer module starts it in the background when its panel is first
shown. Does nothing when the kernel is already cached (unless ``--force``), or when numba is not
installed (forecasts then take the torch path).
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import warmup

NAME = "warmup"
HELP = "Compile and cache the fused solver kernel ahead of the first forecast (one-time, 35-50 s)."


def add_arguments(parser) -> None:
    parser.add_argument("--dtype", nargs="+", choices=warmup.DTYPES, default=list(warmup.DEFAULT_DTYPES),
                        help="the state's precisions to compile for (default float32: predictions and calibrations; "
                             "float64 is what 'anatomydt simulate' uses)")
    parser.add_argument("--force", action="store_true", help="run even if the kernel is marked as cached already")
    parser.add_argument("--background", action="store_true",
                        help="how warmup.start_background_warm_up (the Slicer module) runs it: at low CPU priority, "
                             "and clearing its 'running' mark at the end")


def run(args) -> int:
    try:
        if args.background and hasattr(os, "nice"):
            os.nice(10)
        report = warmup.warm_up(tuple(args.dtype), force=args.force)
        print(f"anatomydt warmup: {report.summary()}")
        if not report.skipped:
            for dtype in report.dtypes:
                print(f"  marker: {warmup.marker_path(dtype)}")
        return 0
    finally:
        if args.background:  # started by start_background_warm_up: the next one may start
            Path(warmup.cache_dir(), warmup.RUNNING_NAME).unlink(missing_ok=True)
