"""Where the fused kernel's brain step spends its time, stage by stage: a measurement, not a test.

    python benchmarks/perf_stages.py                 # step 60 of the roofline's brain case, 15 rounds
    python benchmarks/perf_stages.py --step 30 --repeats 9
    python benchmarks/perf_stages.py --baseline 74645ad   # this kernel against the one of commit 74645ad
    python benchmarks/perf_stages.py --case dense --step 2 --baseline 74645ad --repeats 7

The brain case of ``perf_roofline.py`` (the sample case at 240×240×155, 1 mm, ``pde-only``
defaults, Stupp plan, Δt = 1 day) is run up to ``--step``; the arguments of that step's call of
the numba kernel (``fused_kernels._fused_step``: state, box, coefficients, flags) are captured and
the same call is timed again on fresh copies of the state (the copy is not timed), as it is and
with each stage switched off through the kernel's own flags:

* ``no sweeps``: m = 0 Jacobi sweeps (the implicit diffusion is the identity);
* ``no cross-diffusion``: no χ row;
* ``no growth``: no logistic growth;
* ``plumbing only``: all three off — what is left is reading the box's planes, the chemotherapy
  and clearance terms, the simplex check and projection, and writing the planes back;
* ``one slab``: everything on, one thread (the two-core speed-up is the ratio to the first row);
* ``grid-sized state and coefficients``: everything on, but the state and the fixed coefficient
  fields (face weights, α, κ, domain) grid-sized (the call of the same step captured with
  ``FusedStep.PACK_MARGIN`` larger than the grid, so the packed region is the whole grid), as
  before either was packed onto a region around the box;
* ``packed state``: everything on, the state (and the per-step arrays) copied to exactly the box
  first, without the region's margin of ``FusedStep.PACK_MARGIN`` voxels (the copy is not timed):
  what a margin costs. (Before the product kept its state packed, this row was the estimate of
  what packing it would give.)

It also prints the share of the box's rows the kernel computes on that step (``FusedStep.plane_rows``)
and, of those, the shares where the reaction and the cross-diffusion act.

With ``--baseline REV`` it times, instead, this kernel against ``fused_kernels.py`` as it was at
git revision REV on the same captured call (taking turns, so the machine's drift hits both), and
prints their ratio and the largest difference of their results: how an optimisation is measured
on a machine whose speed drifts by ±20 % between runs.

A stage's cost is roughly the difference between the first row and its row (the stages are not
quite independent: switching one off changes what the others see). Printed with the machine, the
load average and the box size; times are medians over ``--repeats`` rounds with [min–max].
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_common as pc  # noqa: E402

ARGUMENTS = ("p", "box", "chi", "rows", "cols", "growth", "kappa", "domain", "clearable", "diffused", "is_diffused",
             "wz", "wy", "wx", "scale", "dying_out", "fl", "par", "constants", "extents", "plane_rows")
ONE_SLAB = "one slab (1 thread)"
GRID_SIZED = "grid-sized state and coefficients"
PACKED_STATE = "packed state"


def capture_step(step: int, case: str = "brain", pack_margin: int | None = None) -> dict:
    """The keyword arguments of the kernel call of solver step ``step`` (1-based) of the brain case
    (or of the dense worst case of perf_roofline.py: ``case="dense"``). ``pack_margin``: the
    ``FusedStep.PACK_MARGIN`` to run with (a huge one makes the packed region the whole grid: the
    kernel gets a grid-sized state and coefficients, as before they were packed around the box)."""
    import numpy as np
    import torch

    import perf_roofline
    from AnatomyDTLib import fused, simulate

    if pack_margin is not None:
        default_margin = fused.FusedStep.PACK_MARGIN
        fused.FusedStep.PACK_MARGIN = pack_margin
        try:
            return capture_step(step, case)
        finally:
            fused.FusedStep.PACK_MARGIN = default_margin
    kernels = fused._kernels()
    if kernels is None:
        raise SystemExit("numba is not installed (or ANATOMYDT_FUSED=0): the fused kernel cannot run here")
    p0, spacing, kwargs = perf_roofline.problem(case)
    original = kernels._fused_step
    captured: dict = {}
    calls = [0]

    def capturing(*args):
        calls[0] += 1
        if calls[0] == step:
            captured.update({name: value.copy() if isinstance(value, np.ndarray) else value
                             for name, value in zip(ARGUMENTS, args)})
        return original(*args)

    kernels._fused_step = capturing
    try:
        with torch.no_grad():
            simulate(p0, spacing=spacing, days=float(step + 1), **kwargs)
    finally:
        kernels._fused_step = original
    if not captured:
        raise SystemExit(f"the {case} case made fewer than {step} kernel calls")
    return captured


def time_variants(calls: list[dict], repeats: int, kernels: list | None = None) -> list[list[float]]:
    """Wall times (s) of the kernel for each argument set, on fresh copies of the captured state
    (``kernels``: one kernel per argument set, default this checkout's). The variants take turns
    (round robin), so a drift of the machine's speed hits all of them alike; a first round is a
    warm-up."""
    from AnatomyDTLib import fused

    kernels = kernels or [fused._kernels()._fused_step] * len(calls)
    times: list[list[float]] = [[] for _ in calls]
    for round_ in range(repeats + 1):
        for i, arguments in enumerate(calls):
            call = dict(arguments, p=arguments["p"].copy())
            t0 = time.perf_counter()
            call_kernel(kernels[i], call)
            if round_ > 0:
                times[i].append(time.perf_counter() - t0)
    return times


def call_kernel(kernel, arguments: dict) -> None:
    """Call a ``_fused_step`` with the captured arguments it takes (by its own parameter names: a
    kernel from an older revision may take fewer, e.g. no ``extents`` before 2026-12-04)."""
    code = kernel.py_func.__code__
    kernel(*(arguments[name] for name in code.co_varnames[:code.co_argcount]))


def _slot_constants(module) -> dict:
    """The kernel module's slot constants (``_DT``, ``_TUMOUR``, …: upper-case module-level ints)."""
    return {name: value for name, value in vars(module).items()
            if name.startswith("_") and name[1:].isupper() and isinstance(value, int)}


def baseline_kernel(revision: str):
    """(``_fused_step`` of ``AnatomyDTLib/fused_kernels.py`` as it was at git ``revision``, the flag
    slots this checkout has and that version lacks), compiled from a temporary copy (first call
    ≈ 40 s, not cached). Refused when a slot both versions have differs: the captured arguments
    would mean something else to it. Slots it lacks are appended ones (the region origin of
    4f963c2: its call must hold 0 there, see :func:`compare_with_baseline`; the support floor
    of the watched channels, which a kernel older than 2026-12-04 evening does not apply; and the
    rows per strip, where an older kernel computes whole planes: the same step)."""
    import importlib.util
    import subprocess
    import tempfile

    from AnatomyDTLib import fused

    repo = Path(__file__).resolve().parent.parent
    shown = subprocess.run(["git", "show", f"{revision}:AnatomyDTLib/fused_kernels.py"], cwd=repo,
                           capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"--baseline {revision}: git cannot show AnatomyDTLib/fused_kernels.py there: "
                         f"{shown.stderr.strip()}")
    folder = Path(tempfile.mkdtemp(prefix="anatomydt_baseline_kernel_"))
    path = folder / "baseline_fused_kernels.py"
    path.write_text(shown.stdout.replace("cache=True, ", ""))
    spec = importlib.util.spec_from_file_location("baseline_fused_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    theirs, ours = _slot_constants(module), _slot_constants(fused._kernels())
    lacking = ours.keys() - theirs.keys()
    if (any(theirs[name] != ours[name] for name in theirs.keys() & ours.keys()) or theirs.keys() - ours.keys()
            or lacking - {"_REGION_Z0", "_REGION_Y0", "_REGION_X0", "_WATCHED", "_FLOOR", "_STRIP_ROWS"}):
        raise SystemExit(f"--baseline {revision}: its kernel's parameter or flag slots differ from this checkout's; "
                         "compare it with a checkout of its own instead")
    return module._fused_step, sorted(ours[name] for name in lacking & {"_REGION_Z0", "_REGION_Y0", "_REGION_X0"})


def variants(arguments: dict, grid_sized: dict | None = None) -> list[tuple[str, dict]]:
    """(label, arguments) of the full step and of the step with stages switched off; ``grid_sized``:
    the same call captured with a grid-sized state and coefficient fields."""
    import numpy as np

    from AnatomyDTLib import fused

    k = fused._kernels()

    def with_flags(**changes):
        flags = arguments["fl"].copy()
        for slot, value in changes.items():
            flags[getattr(k, slot)] = value
        return flags

    no_rows = np.zeros(0, dtype=np.int64)
    return [
        ("full step", arguments),
        ("no sweeps", dict(arguments, fl=with_flags(_SWEEPS=0))),
        ("no cross-diffusion", dict(arguments, rows=no_rows)),
        ("no growth", dict(arguments, fl=with_flags(_HAS_GROWTH=0))),
        ("plumbing only", dict(arguments, rows=no_rows, fl=with_flags(_SWEEPS=0, _HAS_GROWTH=0))),
        (ONE_SLAB, dict(arguments, fl=with_flags(_THREADS=1))),
    ] + ([(GRID_SIZED, grid_sized)] if grid_sized is not None else []) + [(PACKED_STATE, packed_state(arguments))]


def packed_state_difference(arguments: dict) -> float:
    """Largest difference between the step on the captured state (packed on its region, or
    grid-sized) and on a copy restricted to exactly the box (0: both compute the same step)."""
    import numpy as np

    from AnatomyDTLib import fused

    kernel = fused._kernels()._fused_step
    on_grid = dict(arguments, p=arguments["p"].copy(), extents=arguments["extents"].copy())
    packed = packed_state(arguments)
    call_kernel(kernel, on_grid)
    call_kernel(kernel, packed)
    z0, z1, y0, y1, x0, x1 = (int(v) for v in arguments["box"])
    return float(np.abs(on_grid["p"][:, z0:z1, y0:y1, x0:x1] - packed["p"]).max())


def packed_state(arguments: dict) -> dict:
    """The captured call on a copy of the state restricted to its box (and of the per-step arrays
    that cover the same voxels as the state: clearable, dying_out), the box moved to the origin,
    and the rows to compute per plane with it; the coefficient fields keep their region, whose
    origin is moved by the same amount."""
    import numpy as np

    from AnatomyDTLib import fused

    k = fused._kernels()
    z0, z1, y0, y1, x0, x1 = (int(v) for v in arguments["box"])
    crop = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    packed = dict(arguments, box=np.array([0, z1 - z0, 0, y1 - y0, 0, x1 - x0], dtype=np.int64))
    packed["p"] = np.ascontiguousarray(arguments["p"][(slice(None),) + crop])
    for name in ("clearable", "dying_out"):  # grid-sized when in use, (1, 1, 1) dummies otherwise
        if arguments[name].shape != (1, 1, 1):
            packed[name] = np.ascontiguousarray(arguments[name][crop])
    flags = arguments["fl"].copy()
    for slot, start in ((k._REGION_Z0, z0), (k._REGION_Y0, y0), (k._REGION_X0, x0)):
        flags[slot] -= start
    packed["fl"] = flags
    packed["extents"] = np.zeros((arguments["extents"].shape[0], z1 - z0, 4), dtype=np.int64)
    packed["plane_rows"] = arguments["plane_rows"][z0:z1] - y0  # rows per plane, in the state's indices
    return packed


def row_shares(arguments: dict) -> dict:
    """Of the captured call's box rows (planes × rows), the share the kernel computes, and of those
    the shares where the reaction and the cross-diffusion act (the kernel's own ``_slab_rows`` on
    the captured ``plane_rows``; one strip spanning the box)."""
    from AnatomyDTLib import fused

    z0, z1, y0, y1 = (int(v) for v in arguments["box"][:4])
    live = fused._kernels()._slab_rows(arguments["plane_rows"], z0, z1, y0, y1)
    computed = int((live[:, 1] - live[:, 0]).sum())
    return {"computed": computed / ((z1 - z0) * (y1 - y0)),
            "reaction": int((live[:, 5] - live[:, 4]).sum()) / max(computed, 1),
            "cross-diffusion": int((live[:, 7] - live[:, 6]).sum()) / max(computed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("brain", "dense"), default="brain",
                        help="the roofline's brain case (default) or its dense worst case")
    parser.add_argument("--step", type=int, default=60, help="which solver step to capture (default 60; the dense "
                                                              "case runs as many days as needed)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per variant (default 15)")
    parser.add_argument("--baseline", metavar="REV",
                        help="instead of the stages, time this kernel against fused_kernels.py at git revision REV "
                             "(same captured call, taking turns) and print both, their ratio and their largest "
                             "difference")
    args = parser.parse_args()
    from AnatomyDTLib import fused

    arguments = capture_step(args.step, args.case)
    if args.baseline:
        compare_with_baseline(arguments, args.baseline, args.repeats, args.step, args.case)
        return
    box = arguments["box"]
    voxels = int((box[1] - box[0]) * (box[3] - box[2]) * (box[5] - box[4]))
    print(f"machine: {pc.machine_text()}; {pc.load_text()}")
    threads = int(arguments["fl"][fused._kernels()._THREADS])
    print(f"{args.case} case step {args.step}: box z {box[0]}:{box[1]}, y {box[2]}:{box[3]}, x {box[4]}:{box[5]} "
          f"= {voxels / 1e6:.2f} M voxels, kernel threads {threads}")
    shares = row_shares(arguments)
    print(f"  rows computed: {shares['computed']:.3f} of the box's; of those, the reaction acts on "
          f"{shares['reaction']:.2f}, the cross-diffusion on {shares['cross-diffusion']:.2f}")
    labelled = variants(arguments, capture_step(args.step, args.case, pack_margin=10 ** 9))
    print(f"  the packed-state call's result differs from the full step's by {packed_state_difference(arguments):.2e}")
    all_times = time_variants([call for _, call in labelled], args.repeats)
    full = statistics.median(all_times[0])
    for (label, call), times in zip(labelled, all_times):
        median = statistics.median(times)
        if call is arguments:
            cost = ""
        elif label == ONE_SLAB:
            cost = f"   two-slab speed-up {median / full:.2f}"
        else:
            cost = f"   difference to the full step {1e3 * (full - median):+.2f} ms"
        print(f"  {label:24s} {1e3 * median:7.2f} ms [{1e3 * min(times):.2f}–{1e3 * max(times):.2f}] "
              f"{1e9 * median / voxels:5.1f} ns/voxel{cost}")
    print(f"load average after: {pc.load_text()}")


def compare_with_baseline(arguments: dict, revision: str, repeats: int, step: int, case: str = "brain") -> None:
    """Print this kernel's and ``revision``'s time on the captured call, their ratio, and the largest
    difference of their results (both from the same input state)."""
    import numpy as np

    from AnatomyDTLib import fused

    current = fused._kernels()._fused_step
    baseline, missing_slots = baseline_kernel(revision)
    baseline_arguments = arguments
    if missing_slots:  # an older kernel reads grid-sized coefficient fields: give it the call captured that way
        baseline_arguments = capture_step(step, case, pack_margin=10 ** 9)
        if any(int(baseline_arguments["fl"][slot]) != 0 for slot in missing_slots):
            raise SystemExit(f"--baseline {revision}: the call for it still has a region origin off the grid's")
    results = []
    for kernel, call in ((baseline, baseline_arguments), (current, arguments)):
        call = dict(call, p=call["p"].copy())
        call_kernel(kernel, call)
        results.append(call["p"])
    if results[0].shape != results[1].shape:  # the baseline's state is grid-sized, ours packed on a region
        grid_box, packed_box = baseline_arguments["box"], arguments["box"]
        results[0] = results[0][(slice(None),) + tuple(
            slice(int(grid_box[2 * a] - packed_box[2 * a]), int(grid_box[2 * a] - packed_box[2 * a]) + n)
            for a, n in enumerate(results[1].shape[1:]))]
    difference = float(np.abs(results[0].astype(np.float64) - results[1]).max())
    box = arguments["box"]
    voxels = int((box[1] - box[0]) * (box[3] - box[2]) * (box[5] - box[4]))
    print(f"machine: {pc.machine_text()}; {pc.load_text()}")
    print(f"{case} case step {step}: box of {voxels / 1e6:.2f} M voxels; largest difference of the two results "
          f"{difference:.2e}")
    times = time_variants([baseline_arguments, arguments], repeats, kernels=[baseline, current])
    old, new = statistics.median(times[0]), statistics.median(times[1])
    for label, median, spread in ((f"kernel at {revision}", old, times[0]), ("this kernel", new, times[1])):
        print(f"  {label:22s} {1e3 * median:7.2f} ms [{1e3 * min(spread):.2f}–{1e3 * max(spread):.2f}] "
              f"{1e9 * median / voxels:5.1f} ns/voxel")
    print(f"  this kernel / baseline: {new / old:.3f}")
    print(f"load average after: {pc.load_text()}")


if __name__ == "__main__":
    main()
