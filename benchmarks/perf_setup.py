"""What a no-grad forecast costs before its first solver step: a measurement, not a test.

    python benchmarks/perf_setup.py                    # brain case, untreated and Stupp, 5 fresh processes each
    python benchmarks/perf_setup.py --repeats 3 --profile   # + the 15 largest items of one cProfile run

The brain case of ``perf_roofline.py`` (the sample case at 240×240×155, 1 mm, ``pde-only``
defaults, Δt = 1 day) is simulated for 2 days in a fresh process; the process first runs a
1-day forecast of the same problem so that the numba kernel is loaded and the allocator warm, as
in a Slicer session's second forecast. Printed: the median [min–max] time from the ``simulate``
call to the end of its first step ("set-up + step 1"), the second step alone, and their
difference, which is the set-up: checking the inputs, building the diffusion operator's face
weights and diagonal, the cross-diffusion stability analysis, the private copy of the state and
the first projection onto the simplex. Plans: ``untreated`` (no events) and ``stupp`` (the sample
case's surgery-free Stupp plan: radiotherapy with its delayed-death compartment, temozolomide).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_common as pc  # noqa: E402


def child(plan: str, profile: bool) -> dict:
    import torch

    import perf_roofline
    from AnatomyDTLib import simulate

    p0, spacing, kwargs = perf_roofline._brain_problem()
    if plan == "untreated":
        kwargs.pop("plan")
    with torch.no_grad():
        simulate(p0, spacing=spacing, days=1.0, **kwargs)  # load the kernel, warm the allocator
    stamps: list[float] = []
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    with torch.no_grad():
        simulate(p0, spacing=spacing, days=2.0, progress=lambda d, h: stamps.append(time.perf_counter()), **kwargs)
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(15)
    first, second = stamps[0] - t0, stamps[1] - stamps[0]
    return {"plan": plan, "first_step_s": first, "second_step_s": second, "setup_s": first - second}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per plan (default 5)")
    ap.add_argument("--plans", nargs="+", default=["untreated", "stupp"], choices=["untreated", "stupp"])
    ap.add_argument("--profile", action="store_true", help="also print one cProfile run per plan (not timed)")
    ap.add_argument("--child", choices=["untreated", "stupp"], help=argparse.SUPPRESS)
    ap.add_argument("--child-profile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.child_profile)))
        return 0
    print(pc.machine_text())
    print(f"brain case 240x240x155, 1 mm, pde-only defaults, dt 1 day; {args.repeats} fresh processes per plan")
    for plan in args.plans:
        runs = []
        for _ in range(args.repeats):
            r = pc.run_measured([sys.executable, __file__, "--child", plan])
            if r["returncode"] != 0:
                raise RuntimeError(f"{plan} failed:\n{r['stderr'][-3000:]}")
            res = pc.last_json_line(r["stdout"])
            res["load"] = r["load_before"]
            runs.append(res)
        first = [r["first_step_s"] for r in runs]
        setup = [r["setup_s"] for r in runs]
        second = [r["second_step_s"] for r in runs]
        print(f"  {plan:9s}: set-up + step 1 {pc.spread(first)}, step 2 {statistics.median(second) * 1e3:.1f} ms, "
              f"set-up {pc.spread(setup)} (load {min(r['load'] for r in runs):.2f}-{max(r['load'] for r in runs):.2f})")
        if args.profile:
            r = pc.run_measured([sys.executable, __file__, "--child", plan, "--child-profile"])
            print(r["stderr"].split("\tCommand being timed")[0][-6000:])  # without GNU time's report
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
