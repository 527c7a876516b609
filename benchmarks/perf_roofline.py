"""Roofline of the no-grad IMEX step on 240×240×155, K = 5 (issue 9, target 1): a measurement, not a test.

    python benchmarks/perf_roofline.py                      # brain case + dense worst case, 5 repeats
    python benchmarks/perf_roofline.py --threads 1 --repeats 5
    python benchmarks/perf_roofline.py --only dense --compile   # + torch.compile experiment (needs a C++ compiler)
    python benchmarks/perf_roofline.py --paths fused            # only the fused kernel (default: fused and torch)

Every configuration runs in its own subprocess (fresh allocator, its own peak RSS). Printed:

* the machine's memory-copy bandwidth, measured in the same run (torch ``copy_`` of 512 MB,
  median of 7) before and after the measurements, and the 1-minute load average;
* the machine's arithmetic roof: the theoretical float32 peak of the cores used
  (``perf_common.arithmetic_peak_gflops``: cores × clock × 32 flop/cycle with AVX2 + FMA);
* for the fused path, each step's time split (medians over the steps) into the kernel's call, the
  floor-and-bound pass that finds the next step's box, and the rest (Python, torch, events);
* per configuration and path — ``fused`` is the one-pass numba kernel the product runs
  (AnatomyDTLib/fused.py), ``torch`` the torch inference path (``ANATOMYDT_FUSED=0``) — the median
  step time (median over steps inside a run, the first step excluded, then over repeats; the
  spread over repeats in brackets), the bytes the step must move at least, the achieved bytes/s
  and its ratio to the copy bandwidth (the bandwidth roofline); for the fused path also its
  arithmetic (``flops_per_voxel``), the flop/byte ratio against the machine balance, and the
  full roofline bound max(bytes / bandwidth, flops / arithmetic roof).

Cases:

* ``brain``: the bundled sample case resampled to 240×240×155 at 1 mm, ``pde-only`` brain
  defaults (tumour D 0.2/0.02 mm²/day by tissue, χ = −0.01 on three rows, α = 0.05/day,
  Δt = 1 day, m = 2 Jacobi sweeps), the sample Stupp plan, 90 steps (days 0–90). The inference
  path works on the active box (where the tumour is non-zero); the box is reported.
* ``dense``: everything active — a random Dirichlet field (every voxel a mixture of all 5
  classes), every class diffuses (D = 0.05–0.2 mm²/day), every ordered pair cross-diffuses
  (|χ| <= 0.02, well-posed), logistic growth; 5 steps per run, the first discarded (warm-up).

Traffic counts (float32, N voxels, K = 5 channels), per step:

* ``minimum``: read the state once and write it once, 2·K·N·4 bytes, plus every coefficient array
  the step must read (brain: the tumour's 3 face-weight arrays, 3·N·4; dense: none, the D are
  per-class scalars). A solver that fused the whole step into one pass would move this much.
* ``per-stage``: the same for a solver that streams each stage once: explicit part (read K,
  write K), each of the m Jacobi sweeps (read u and rhs, write u: 3 per diffused class) and the
  projection (read K, write K), plus the coefficient arrays once per sweep.

For the brain case both counts are given three times: over the full grid (what a dense solver
moves, ``full-grid``), over the box the step computes (``box``: the bounding box of every voxel it
may change), and over the voxels it actually changes (``changed``: any channel differs after the
step; measured in a separate untimed run at a few sample steps, ``changed_voxels``). The tumour
fills about a third of its bounding box, so the ``changed`` count is the strict one: a solver that
touched nothing but the voxels that change would still have to move that much.

With that count the brain case also prints how far a closer layout could go
(``print_sparsity_ceiling``): the voxels the kernel computes per step and its wall time per computed
voxel; the step of a kernel computing only the 8³ bricks that hold a changed voxel, only each row's
run of changed voxels, or exactly the changed voxels, at that time per voxel plus the same rest of
the step (no overhead charged to the layout: an upper bound for each); and the share of the
arithmetic roof that 1/3 of the strict roofline would need.
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

K = 5
SHAPE_XYZ = (240, 240, 155)
GB = 1e9


# --------------------------------------------------------------------------------------------
# child: one configuration, one repeat; prints a JSON line
# --------------------------------------------------------------------------------------------

def _dense_problem(shape_zyx):
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():  # the same field in every process (Dirichlet.sample takes no generator)
        torch.manual_seed(0)
        p0 = torch.distributions.Dirichlet(torch.full((K,), 0.7)).sample(shape_zyx).permute(3, 0, 1, 2).contiguous()
    chi = (torch.rand(K, K, generator=g, dtype=torch.float64) - 0.5) * 0.04  # |χ| <= 0.02 < D_j + D_k: well-posed
    chi.fill_diagonal_(0)
    kwargs = dict(diffusion=[0.05, 0.2, 0.1, 0.1, 0.05], growth_rate=0.05, cross_diffusion=chi, dt=1.0,
                  jacobi_iters=2, tumor_class=1)
    return p0, kwargs


def _brain_problem():
    from AnatomyDTLib.plan import load_plan
    from AnatomyDTLib.predict import PDEOnlyModel

    p0, spacing = pc.brain_field(SHAPE_XYZ)
    model = PDEOnlyModel()
    kwargs = model.parameters.simulate_kwargs(p0, model.schema)
    kwargs["plan"] = load_plan(str(pc.brain_case(SHAPE_XYZ)["plan"]), schema=model.schema)
    kwargs["schema"] = model.schema
    return p0, spacing, kwargs


def _timed_kernel_calls() -> dict:
    """Record (start time, duration) of every call of the fused kernel's step and of its
    floor-and-bound pass (when the kernel is in use), so that a solver step's time splits into the
    kernel, the pass that finds the next box (run only when the kernel could not report the boxes,
    e.g. after an event), and the rest (Python, torch, events): {"kernel": [(t, s), ...], ...}."""
    from AnatomyDTLib import fused

    calls: dict = {"kernel": [], "floor": [], "event": [], "computed": []}
    if not fused.fused_kernel_available():
        return calls
    kernels = fused._kernels()
    for name, key in (("_fused_step", "kernel"), ("_floor_and_bound", "floor")):
        def timed(*args, _original=getattr(kernels, name), _key=key):
            t0 = time.perf_counter()
            result = _original(*args)
            # the pass at floor 0 is a radiotherapy fraction finding the tumour's box: an event, not the step's
            key = "event" if _key == "floor" and args[3] == 0 else _key
            calls[key].append((t0, time.perf_counter() - t0))
            if key == "kernel":  # _fused_step(p, box, ..., plane_rows)
                calls["computed"].append((t0, computed_voxels(args[1], args[-1])))
            return result
        setattr(kernels, name, timed)  # this child process only
    return calls


def computed_voxels(box, plane_rows) -> int:
    """Voxels a kernel call computes: on each plane of ``box`` = (z0, z1, y0, y1, x0, x1), the rows
    the kernel's own ``_slab_rows`` takes from ``plane_rows`` (as ``perf_stages.row_shares`` counts
    them), each the box's full x extent (the kernel's flat loops compute whole rows)."""
    from AnatomyDTLib import fused

    z0, z1, y0, y1, x0, x1 = (int(v) for v in box[:6])
    rows = fused._kernels()._slab_rows(plane_rows, z0, z1, y0, y1)
    return int((rows[:, 1] - rows[:, 0]).sum()) * (x1 - x0)


def step_split(bounds: list[float], calls: dict) -> dict | None:
    """Per step (between consecutive ``bounds``, the first step excluded): the kernel's time, the
    floor pass's (0 in a step that did not need it) and the rest; medians of each, and the share of
    steps that ran the floor pass. None when a step made no kernel call (e.g. the torch path)."""
    steps = list(zip(bounds[:-1], bounds[1:]))[1:]

    def per_step(key):
        totals = [0.0] * len(steps)
        for start, seconds in calls[key]:
            for i, (a, b) in enumerate(steps):
                if a <= start < b:
                    totals[i] += seconds
        return totals

    kernel, floor, computed = per_step("kernel"), per_step("floor"), per_step("computed")
    if not steps or any(k == 0.0 for k in kernel):
        return None
    rest = [(b - a) - k - f for (a, b), k, f in zip(steps, kernel, floor)]
    return {"kernel": statistics.median(kernel), "floor": statistics.median(floor), "rest": statistics.median(rest),
            "floor_steps": sum(f > 0 for f in floor) / len(steps),
            "kernel_s_per_computed_voxel": statistics.median(k / c for k, c in zip(kernel, computed)),
            "computed_voxels": statistics.median(computed)}


def problem(case: str):
    """(p0, spacing in mm, simulate keyword arguments) of the ``brain`` or the ``dense`` case."""
    if case == "brain":
        return _brain_problem()
    p0, kwargs = _dense_problem(tuple(reversed(SHAPE_XYZ)))
    return p0, (1.0, 1.0, 1.0), kwargs


def child(case: str, days: int) -> dict:
    import torch

    from AnatomyDTLib import simulate

    calls = _timed_kernel_calls()
    structure: dict = {}
    boxes = pc.record_step_boxes(structure)
    p0, spacing, kwargs = problem(case)
    stamps = []
    t0 = time.perf_counter()
    c0 = time.process_time()
    with torch.no_grad():
        simulate(p0, spacing=spacing, days=float(days), progress=lambda day, horizon: stamps.append(time.perf_counter()),
                 **kwargs)
    total = time.perf_counter() - t0
    cpu = time.process_time() - c0
    steps = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    return {"case": case, "steps": steps, "split": step_split([t0] + stamps, calls), "boxes": boxes, "total_s": total,
            "cpu_s": cpu, "structure": structure,
            "voxels": int(p0[0].numel()), "threads": torch.get_num_threads()}


SAMPLE_STEPS = (15, 45, 75)  # brain steps (0-based: day d -> d + 1) at which the changed voxels are counted


def changed_voxels(case: str, sample_steps=SAMPLE_STEPS) -> list[dict]:
    """For each sample step d of the case's solve: the voxels the step from day d to day d + 1
    changes (any channel differs; counted on the trajectory of one untimed run with those output
    days) and the voxels of the box the stepper computed at that step."""
    import torch

    from AnatomyDTLib import simulate

    boxes = pc.record_step_boxes()
    p0, spacing, kwargs = problem(case)
    days = [float(d) for step in sample_steps for d in (step, step + 1)]
    with torch.no_grad():
        trajectory = simulate(p0, spacing=spacing, days=days, return_trajectory=True, **kwargs)
    counts = []
    for i, step in enumerate(sample_steps):
        before, after = trajectory[2 * i], trajectory[2 * i + 1]
        changed = (before != after).any(dim=0)
        counts.append({"step": step, "changed": int(changed.sum()), "box": boxes[step],
                       "row_ranges": row_range_voxels(changed), "bricks": brick_voxels(changed, BRICK)})
    return counts


BRICK = 8  # edge (voxels) of the cubic bricks of a block-sparse layout, for brick_voxels


def row_range_voxels(mask) -> int:
    """Voxels a kernel would compute if it computed, on every row (z, y) of a (Z, Y, X) mask, the
    x range from the row's first to its last set voxel: a layout following the shape within rows."""
    import torch

    x = torch.arange(mask.shape[-1])
    first = torch.where(mask, x, mask.shape[-1]).amin(dim=-1)
    last = torch.where(mask, x, -1).amax(dim=-1)
    return int((last - first + 1).clamp(min=0).sum())


def brick_voxels(mask, edge: int) -> int:
    """Voxels of the edge³ bricks (on a grid from index 0) holding any set voxel of a (Z, Y, X)
    mask: what a block-sparse layout with that brick size would compute."""
    import torch

    pad = [(-n) % edge for n in reversed(mask.shape)]
    padded = torch.nn.functional.pad(mask[None, None].float(), [v for p in pad for v in (0, p)])
    return int((torch.nn.functional.max_pool3d(padded, edge) > 0).sum()) * edge ** 3


# --------------------------------------------------------------------------------------------
# traffic model
# --------------------------------------------------------------------------------------------

def traffic_bytes(case: str, voxels: int, jacobi_iters: int = 2) -> dict:
    """Bytes per step (float32) of the two counts of the module docstring for ``voxels`` voxels."""
    n4 = voxels * 4
    if case == "brain":
        diffused, coefficient_arrays = 1, 3  # the tumour; its 3 face-weight arrays
    else:
        diffused, coefficient_arrays = K, 0
    minimum = 2 * K * n4 + coefficient_arrays * n4
    per_stage = (2 * K + jacobi_iters * 3 * diffused + 2 * K) * n4 + jacobi_iters * coefficient_arrays * n4
    return {"minimum": minimum, "per_stage": per_stage}


def flops_per_voxel(structure: dict) -> int:
    """Arithmetic of one step per voxel as the fused kernel computes it (AnatomyDTLib/fused.py),
    counting every add, multiply, divide, min and max as one flop (a multiply-add as two):

    * drift potentials: 2·rows·cols; with a single column none (Δφ of row r is χ[r, 0] times the
      pushing class's difference: one multiply per face, 4·rows);
    * logistic growth (if on): 2·C + 12;
    * cross-diffusion, per row of χ: 4 face velocities (3 each), 4 upwind fluxes (5 each), the
      x-face flux (9) and the sum (9): 50;
    * Jacobi, per diffused class and sweep: x-face flow (2), 4 other faces (2 each), their sum (4),
      the x terms (2), the update (5): 21;
    * simplex projection: sums and minimum (2·C), Batcher's 19-comparator network (38), the
      threshold (28), the flags (4), the write (5·C): 7·C + 70.
    """
    c = structure["channels"]
    single_column = structure["cols"] == 1
    flops = (4 if single_column else 2 * structure["cols"]) * structure["rows"] + 50 * structure["rows"]
    flops += (2 * c + 12) if structure["growth"] else 0
    flops += 21 * structure["diffused"] * structure["sweeps"]
    return flops + 7 * c + 70


# --------------------------------------------------------------------------------------------
# torch.compile experiment (dense case): a fused prototype of the transport + projection step
# --------------------------------------------------------------------------------------------

def compile_experiment(repeats: int) -> dict:
    """Compile a pure-function prototype of the dense step (uniform D, χ without the outflow limiter,
    m = 2 Jacobi sweeps, simplex projection; no growth) and compare it with the library's step
    on the same problem (growth off). Reports compile time, step times and the largest difference."""
    import torch
    import torch.nn.functional as F

    from AnatomyDTLib import simulate
    from AnatomyDTLib.simplex import project_to_simplex

    p0, kwargs = _dense_problem(tuple(reversed(SHAPE_XYZ)))
    kwargs = {**kwargs, "growth_rate": 0.0}
    d = torch.tensor(kwargs["diffusion"], dtype=torch.float32).reshape(1, K, 1, 1, 1)
    chi = kwargs["cross_diffusion"].float()
    dt, m = 1.0, 2
    scale = 1.0 / (1.0 + dt * 6.0 * d)  # conservative Jacobi: max diagonal of uniform D, h = 1 mm

    def face_flux_divergence(flux, dim):
        zero = torch.zeros_like(flux.narrow(dim, 0, 1))
        padded = torch.cat([zero, flux, zero], dim=dim)
        n = padded.shape[dim]
        return padded.narrow(dim, 0, n - 1) - padded.narrow(dim, 1, n - 1)

    def step(p):
        potential = torch.einsum("kj,bj...->bk...", chi, p)
        rhs = p
        for dim in (2, 3, 4):
            n = p.shape[dim]
            v = potential.narrow(dim, 1, n - 1) - potential.narrow(dim, 0, n - 1)
            flux = torch.clamp(v, min=0) * p.narrow(dim, 0, n - 1) + torch.clamp(v, max=0) * p.narrow(dim, 1, n - 1)
            rhs = rhs + dt * face_flux_divergence(flux, dim)
        u = rhs
        for _ in range(m):
            padded = F.pad(u, (1, 1, 1, 1, 1, 1), mode="replicate")
            centre = padded[:, :, 1:-1, 1:-1, 1:-1]
            lap = (padded[:, :, 2:, 1:-1, 1:-1] + padded[:, :, :-2, 1:-1, 1:-1] + padded[:, :, 1:-1, 2:, 1:-1]
                   + padded[:, :, 1:-1, :-2, 1:-1] + padded[:, :, 1:-1, 1:-1, 2:] + padded[:, :, 1:-1, 1:-1, :-2]
                   - 6.0 * centre) * d
            u = u + scale * (rhs - u + dt * lap)
        return project_to_simplex(u, dim=1)

    x = p0[None]
    compiled = torch.compile(step, dynamic=False)
    t0 = time.perf_counter()
    out = compiled(x)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = compiled(x)
        times.append(time.perf_counter() - t0)
    eager_times = []
    for _ in range(max(1, repeats // 2)):
        t0 = time.perf_counter()
        eager = step(x)
        eager_times.append(time.perf_counter() - t0)
    with torch.no_grad():
        library = simulate(p0, spacing=(1.0, 1.0, 1.0), days=1.0, **kwargs)
    return {"compile_s": compile_s, "compiled_step_s": statistics.median(times),
            "eager_prototype_step_s": statistics.median(eager_times),
            "max_abs_diff_vs_library": float((out[0] - library).abs().max()),
            "max_abs_diff_compiled_vs_eager": float((out - eager).abs().max())}


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------

def run_case(case: str, days: int, repeats: int, threads: int, path: str = "fused") -> list[dict]:
    """``repeats`` fresh child processes; ``path`` "torch" switches the fused kernel off (ANATOMYDT_FUSED=0)."""
    results = []
    for _ in range(repeats):
        load = pc.machine_load()
        r = pc.run_measured([sys.executable, __file__, "--child", case, "--days", str(days)],
                            env={"OMP_NUM_THREADS": str(threads), "ANATOMYDT_PERF_THREADS": str(threads),
                                 "ANATOMYDT_FUSED": "0" if path == "torch" else "1"})
        if r["returncode"] != 0:
            raise RuntimeError(f"{case} run failed:\n{r['stderr'][-3000:]}")
        result = pc.last_json_line(r["stdout"])
        result.update(load=load, peak_rss_bytes=r["peak_rss_bytes"], wall_s=r["wall_s"], path=path)
        results.append(result)
    return results


def run_changed(case: str, threads: int) -> list[dict]:
    """:func:`changed_voxels` in a fresh child process."""
    r = pc.run_measured([sys.executable, __file__, "--changed-child", case],
                        env={"OMP_NUM_THREADS": str(threads), "ANATOMYDT_PERF_THREADS": str(threads)})
    if r["returncode"] != 0:
        raise RuntimeError(f"{case} changed-voxel run failed:\n{r['stderr'][-3000:]}")
    return pc.last_json_line(r["stdout"])["changed"]


def summarise(case: str, results: list[dict], bandwidth: float, skip_first: bool, changed: list[dict] | None = None) -> dict:
    per_run = []
    for r in results:
        steps = r["steps"][1:] if skip_first and len(r["steps"]) > 1 else r["steps"]
        per_run.append(statistics.median(steps))
    step = statistics.median(per_run)
    voxels = results[0]["voxels"]
    boxes = results[0]["boxes"]
    box = statistics.median(boxes[1:] if skip_first and len(boxes) > 1 else boxes)
    full = traffic_bytes(case, voxels)
    boxed = traffic_bytes(case, box)
    mean_step = statistics.median([r["total_s"] / len(r["steps"]) for r in results])
    return {"case": case, "step_s": step, "step_spread": (min(per_run), max(per_run)), "mean_step_s": mean_step,
            "run_total_s": statistics.median([r["total_s"] for r in results]),
            "run_cpu_s": statistics.median([r["cpu_s"] for r in results]),
            "voxels": voxels, "median_box_voxels": box, "max_box_voxels": max(boxes),
            "traffic_full": full, "traffic_box": boxed,
            "roofline_full_minimum": full["minimum"] / step / GB / bandwidth,
            "roofline_full_per_stage": full["per_stage"] / step / GB / bandwidth,
            "roofline_box_minimum": boxed["minimum"] / step / GB / bandwidth,
            "roofline_box_per_stage": boxed["per_stage"] / step / GB / bandwidth,
            "changed": changed,
            "changed_share": statistics.median(c["changed"] / c["box"] for c in changed) if changed else None,
            "peak_rss_gib": max(r["peak_rss_bytes"] or 0 for r in results) / 2 ** 30,
            "loads": [round(r["load"], 2) for r in results], "repeats": len(results),
            "structure": results[0]["structure"], "flops_per_voxel": flops_per_voxel(results[0]["structure"]),
            "path": results[0].get("path", "fused"),
            "split": _median_split([r.get("split") for r in results])}


def _median_split(splits: list) -> dict | None:
    """Per part, the median over the runs of the per-run medians; None unless every run has them."""
    if not splits or any(s is None for s in splits):
        return None
    return {part: statistics.median(s[part] for s in splits) for part in splits[0]}


def print_summary(s: dict, bandwidth: float, peak_gflops: float | None) -> None:
    lo, hi = s["step_spread"]
    print(f"\n[{s['case']}, {s['path']} path] median step {s['step_s'] * 1e3:.1f} ms [{lo * 1e3:.1f}–{hi * 1e3:.1f}] over {s['repeats']} runs; "
          f"whole run {s['run_total_s']:.2f} s wall, {s['run_cpu_s']:.2f} s CPU; peak RSS {s['peak_rss_gib']:.2f} GiB; "
          f"load {s['loads']}")
    print(f"  grid {s['voxels'] / 1e6:.2f} M voxels; box changed per step: median {s['median_box_voxels'] / 1e6:.2f} M, "
          f"max {s['max_box_voxels'] / 1e6:.2f} M voxels")
    if s.get("split"):
        split = s["split"]
        print(f"  per step (medians): fused kernel {split['kernel'] * 1e3:.2f} ms, floor-and-bound pass "
              f"{split['floor'] * 1e3:.2f} ms (run in {100 * split['floor_steps']:.0f} % of the steps), "
              f"the rest (Python, torch, events) {split['rest'] * 1e3:.2f} ms")
    scopes = [("full-grid", s["traffic_full"])]
    if s["case"] == "brain":
        scopes.append(("box", s["traffic_box"]))
    if s.get("changed_share"):
        samples = ", ".join(f"step {c['step']}: {c['changed'] / 1e6:.2f} M of {c['box'] / 1e6:.2f} M" for c in s["changed"])
        print(f"  voxels the step changes (any channel differs; {samples}): median {s['changed_share']:.2f} of the box")
        scopes.append(("changed", traffic_bytes(s["case"], round(s["changed_share"] * s["median_box_voxels"]))))
    for scope, t in scopes:
        for count in ("minimum", "per_stage"):
            achieved = t[count] / s["step_s"] / GB
            print(f"  {scope:9} {count:9}: {t[count] / 1e6:8.1f} MB/step -> {achieved:6.2f} GB/s = "
                  f"{achieved / bandwidth:5.2f} of the {bandwidth:.1f} GB/s copy roofline")
    if peak_gflops and s["path"] == "fused":
        voxels = s["voxels"] if s["case"] == "dense" else s["median_box_voxels"]
        flops = s["flops_per_voxel"] * voxels
        minimum = (s["traffic_full"] if s["case"] == "dense" else s["traffic_box"])["minimum"]
        bound = max(minimum / (bandwidth * GB), flops / (peak_gflops * 1e9))
        print(f"  arithmetic: {s['flops_per_voxel']} flop/voxel ({s['structure']}) -> {flops / 1e9:.2f} GFLOP/step, "
              f"{flops / minimum:.1f} flop/byte of the minimum traffic (machine balance "
              f"{peak_gflops / bandwidth:.1f}); achieved {flops / s['step_s'] / 1e9:.1f} GFLOP/s = "
              f"{flops / s['step_s'] / 1e9 / peak_gflops:.2f} of the {peak_gflops:.0f} GFLOP/s arithmetic roof")
        print(f"  roofline bound max(traffic/bandwidth, flops/peak) = {bound * 1e3:.1f} ms -> the step takes "
              f"{s['step_s'] / bound:.1f}x that ({bound / s['step_s']:.2f} of the roofline)")
        if s.get("changed_share"):  # the same bound for a solver that computes only the voxels that change
            share = s["changed_share"]
            strict = max(share * minimum / (bandwidth * GB), share * flops / (peak_gflops * 1e9))
            print(f"  on the voxels the step changes ({share:.2f} of the box): bound {strict * 1e3:.2f} ms -> "
                  f"{strict / s['step_s']:.2f} of the roofline")
            if s.get("split") and s["split"].get("computed_voxels"):
                print_sparsity_ceiling(s, share, strict, peak_gflops)


def print_sparsity_ceiling(s: dict, share: float, strict_bound_s: float, peak_gflops: float) -> None:
    """How far the strict ratio is a matter of which voxels the kernel computes and how far of its
    speed per voxel. Printed: the voxels it computes per step, its wall time per computed voxel and
    the arithmetic roof's share that is; then, for layouts that follow the tumour's shape more
    closely (the voxels each would compute, as a share of the changed ones at the sample steps),
    the step of a kernel computing just those voxels at today's time per voxel, plus today's rest
    of the step, against the strict bound. Optimistic for each layout: none of them is charged for
    its own overhead (shorter loops, brick halos)."""
    split = s["split"]
    computed, per_voxel = split["computed_voxels"], split["kernel_s_per_computed_voxel"]
    efficiency = s["flops_per_voxel"] / per_voxel / (peak_gflops * 1e9)
    changed = share * s["median_box_voxels"]
    print(f"  the kernel computes {computed / 1e6:.2f} M voxels per step ({computed / s['median_box_voxels']:.2f} of the "
          f"box, {computed / changed:.1f}x the voxels that change), {per_voxel * 1e9:.1f} ns of wall time each "
          f"({efficiency:.2f} of the arithmetic roof on them); rest of the step {split['rest'] * 1e3:.2f} ms")
    layouts = [("whole rows of the box (today)", computed / changed),
               (f"{BRICK}³ bricks holding a changed voxel", statistics.median(c["bricks"] / c["changed"] for c in s["changed"])),
               ("per row, first to last changed voxel", statistics.median(c["row_ranges"] / c["changed"] for c in s["changed"])),
               ("exactly the voxels that change", 1.0)]
    for name, factor in layouts:
        step = factor * changed * per_voxel + split["rest"] + split["floor"]
        print(f"  computing {name} ({factor:.2f}x the changed voxels) at that time per voxel, plus the rest: "
              f"{step * 1e3:.2f} ms -> {strict_bound_s / step:.2f} of the roofline on the voxels that change")
    needed = (3 * strict_bound_s - split["rest"] - split["floor"]) / changed
    if needed > 0:
        print(f"  1/3 of it needs, even computing exactly the voxels that change, {needed * 1e9:.1f} ns per voxel: "
              f"{s['flops_per_voxel'] / needed / (peak_gflops * 1e9):.2f} of the arithmetic roof")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs per case (median reported; default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2 = the target machine)")
    parser.add_argument("--only", choices=("brain", "dense"), help="run one case")
    parser.add_argument("--brain-days", type=int, default=90)
    parser.add_argument("--dense-days", type=int, default=5)
    parser.add_argument("--paths", default="fused,torch",
                        help="comma-separated: fused (the numba kernel, default path) and/or torch (ANATOMYDT_FUSED=0)")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd dense-step prototype")
    parser.add_argument("--json", type=Path, help="write the summaries to this file")
    parser.add_argument("--no-changed", action="store_true",
                        help="skip the untimed run that counts the voxels each brain step changes (≈ 10 s)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--changed-child", help=argparse.SUPPRESS)
    parser.add_argument("--days", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("ANATOMYDT_PERF_THREADS", args.threads)))
    if args.child:
        print(json.dumps(child(args.child, args.days)))
        return
    if args.changed_child:
        print(json.dumps({"changed": changed_voxels(args.changed_child)}))
        return
    if args.compile_child:
        print(json.dumps(compile_experiment(args.repeats)))
        return
    pc.brain_case(SHAPE_XYZ)  # make the test case once, outside the timings
    bandwidth = pc.copy_bandwidth_gb_s()
    print(f"machine: {pc.machine_text()}; {pc.load_text()}")
    print(f"memory-copy bandwidth (torch copy_ of 512 MB, read + write, median of 7): {bandwidth:.1f} GB/s")
    roof = pc.arithmetic_peak_gflops(args.threads)
    peak = roof[0] if roof else None
    if roof:
        print(f"arithmetic roof (theoretical peak): {roof[0]:.0f} GFLOP/s = {roof[1]}")
    summaries = []
    changed = None
    for case in ("brain", "dense"):
        if args.only and case != args.only:
            continue
        days = args.brain_days if case == "brain" else args.dense_days
        for path in args.paths.split(","):
            results = run_case(case, days, args.repeats, args.threads, path.strip())
            if case == "brain" and changed is None and not args.no_changed:
                changed = run_changed(case, args.threads)
            s = summarise(case, results, bandwidth, skip_first=True, changed=changed if case == "brain" else None)
            print_summary(s, bandwidth, peak)
            summaries.append(s)
    after = pc.copy_bandwidth_gb_s()
    print(f"\nmemory-copy bandwidth after the runs: {after:.1f} GB/s; {pc.load_text()}")
    report = {"bandwidth_gb_s": bandwidth, "bandwidth_after_gb_s": after, "threads": args.threads,
              "arithmetic_peak_gflops": peak, "summaries": summaries}
    if args.compile:
        r = pc.run_measured([sys.executable, __file__, "--compile-child", "--repeats", str(args.repeats)],
                            env={"ANATOMYDT_PERF_THREADS": str(args.threads)})
        if r["returncode"] != 0:
            print(f"\ntorch.compile experiment failed: {r['stderr'].strip().splitlines()[-1:]}")
        else:
            c = pc.last_json_line(r["stdout"])
            report["compile"] = c
            minimum = traffic_bytes("dense", 240 * 240 * 155)["minimum"]
            print(f"\ntorch.compile (dense transport + projection prototype, no growth): compile {c['compile_s']:.1f} s, "
                  f"compiled step {c['compiled_step_s'] * 1e3:.0f} ms "
                  f"({minimum / c['compiled_step_s'] / GB / bandwidth:.2f} of roofline, minimum count), "
                  f"eager prototype {c['eager_prototype_step_s'] * 1e3:.0f} ms; max |diff| vs library step "
                  f"{c['max_abs_diff_vs_library']:.1e}")
    if args.json:
        pc.write_json(args.json, report)


if __name__ == "__main__":
    main()
