"""Why float32 and float64 runs drift apart with cross-diffusion: the measurements of docs/solver.md.

    python benchmarks/cross_diffusion_stability.py            # every section (~3 min on 1 core)
    python benchmarks/cross_diffusion_stability.py symbol growth refine threshold precision brain multiphase

Sections (each prints a table; numbers are quoted in docs/solver.md, "Cross-diffusion:
well-posedness and the explicit step limit"):

* ``symbol``     — the projected two-class diffusivity ½(D_j + D_k + χ_kj p_k + χ_jk p_j) for the
  states of the reported problem, and the stable step the analysis predicts.
* ``growth``     — Lyapunov-like growth rate (1/day) of a 1e-10 perturbation in float64, 1-D
  tumour slab in white matter, with each ingredient on or off (projection, outflow limiter,
  cross-diffusion) and for several h and Δt, using the *raw* IMEX step at a fixed Δt (the
  solver's automatic step limit bypassed) — this is what isolates the mechanism.
* ``refine``     — 2-D, Δt·σ_max held fixed while h shrinks: an ill-posed χ gets worse as the grid is
  refined (a property of the PDE), a well-posed one does not.
* ``threshold``  — measured growth just below and just above the predicted stable step.
* ``precision``  — the reported problem (3-D compact tumour, 90 days): float32 vs float64 through
  :func:`AnatomyDTLib.simulate`, which now applies the step limit and warns about ill-posed χ.
* ``brain``      — the same comparison on the ellipsoid brain phantom with the old and the new
  ``PDEParameters.brain_defaults``.
* ``multiphase`` — the pairwise (two-class) step limit checked against the exact amplification
  matrix of mixtures of 2–6 classes (random states, including absent classes the projection
  fills), for χ with one non-zero column and for general χ.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from AnatomyDTLib import simulate  # noqa: E402
from AnatomyDTLib.operators import (CrossDiffusionOperator, DiffusionOperator, cross_diffusion_stability,  # noqa: E402
                                    jacobi_damping, jacobi_solve, largest_symbol, two_phase_amplification)
from AnatomyDTLib.simplex import project_to_simplex  # noqa: E402
from AnatomyDTLib import treatments as tx  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")  # the ill-posed cases below warn on purpose


# --------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------

def compact_tumour_field(k: int = 5) -> torch.Tensor:
    """The 3-D field of Testing/test_inference_path.py: WM half-space, tumour block, ventricle slab."""
    labels = torch.zeros(30, 32, 28, dtype=torch.long)
    labels[:, :, 14:] = 2
    labels[10:20, 12:20, 10:18] = 1
    labels[2:6] = 4
    return torch.nn.functional.one_hot(labels, k).permute(3, 0, 1, 2).double()


def slab_field(n: int, h: float, k: int = 3) -> torch.Tensor:
    """1-D (as a 2 × n grid) tumour slab (class 1) in white matter (class 2): (1, k, 2, n)."""
    x = (torch.arange(n) + 0.5) * h
    length = n * h
    labels = torch.full((n,), 2, dtype=torch.long)
    labels[(x > 0.4 * length) & (x < 0.6 * length)] = 1
    return torch.nn.functional.one_hot(labels, k).T.double().reshape(1, k, 1, n).expand(1, k, 2, n).clone()


def raw_run(p, spacing, dt, days, diffusion, chi, *, projection="euclidean", limiter=True, growth=0.0, m=2):
    """The solver's IMEX step at a fixed Δt, with switches (no automatic step limit)."""
    k = p.shape[1]
    d = torch.as_tensor(diffusion, dtype=torch.float64).reshape((1, k) + (1,) * (p.dim() - 2))
    op = DiffusionOperator(d, spacing, None, p.shape[2:])
    cross = CrossDiffusionOperator(torch.as_tensor(chi, dtype=torch.float64), spacing) if chi is not None else None
    alpha = torch.tensor(growth, dtype=torch.float64)
    kappa = torch.tensor(1.0, dtype=torch.float64)
    states = []
    for _ in range(int(round(days / dt))):
        q = tx.logistic_growth(p, alpha, kappa, dt, 1, 0, None, None) if growth else p
        if cross is not None:
            q = q + dt * cross.tendency(p, dt if limiter else 1e-300)  # a tiny Δt switches the limiter off
        u = jacobi_solve(op, q, dt, m, 1.0)
        if projection == "euclidean":
            p = project_to_simplex(u, dim=1)
        elif projection == "rescale":
            u = u.clamp(min=0.0)
            p = u / u.sum(1, keepdim=True)
        else:
            p = u
        states.append(p)
    return states


def perturbation_growth(run, p0, days, dt):
    """A 1e-10 perturbation moving tumour into white matter: its size at the end, the first day it
    exceeds 1e-6, and its growth rate (1/day) over the second half of the run."""
    g = torch.Generator().manual_seed(0)
    e = 1e-10 * torch.rand(p0.shape[-1], generator=g, dtype=torch.float64)
    p1 = p0.clone()
    p1[:, 1] += e
    p1[:, 2] -= e
    p1 = p1.clamp(min=0.0)
    p1 = p1 / p1.sum(1, keepdim=True)
    a, b = run(p0), run(p1)
    diffs = [max(float((x - y).abs().max()), 1e-300) for x, y in zip(a, b)]
    i0 = len(diffs) // 2
    rate = (math.log(diffs[-1]) - math.log(diffs[i0])) / (dt * (len(diffs) - 1 - i0))
    exceed = next((dt * (i + 1) for i, v in enumerate(diffs) if v > 1e-6), None)
    return diffs[-1], rate, exceed


def predicted_step(d_j, d_k, chi_kj, sigma_max, m=2, omega=1.0):
    """Largest Δt with |g| <= 1 on (0, σ_max] (bisection; conservative Jacobi with uniform D)."""
    sigma = sigma_max * torch.linspace(1 / 512, 1, 512, dtype=torch.float64)

    def stable(tau):
        x = tau * sigma
        s_j = omega / (1 + tau * d_j * sigma_max / 2)
        s_k = omega / (1 + tau * d_k * sigma_max / 2)
        g = two_phase_amplification(x, d_j, d_k, chi_kj, jacobi_damping(x, torch.tensor(d_j), s_j, m),
                                    jacobi_damping(x, torch.tensor(d_k), s_k, m))
        return bool((g.abs() <= 1 + 1e-12).all())

    if d_j + d_k + chi_kj <= 0:
        return 0.0
    lo, hi = 0.0, 100.0
    if stable(hi):
        return math.inf
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if stable(mid) else (lo, mid)
    return lo


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------

def section_symbol():
    print("\n## symbol: projected two-class diffusivity λ = ½(D_T + D_W + χ_WT p_W) (tumour T, pushed class W)")
    print("D_T   D_W   χ_WT   λ(p_W=0)  λ(p_W=1)  ill-posed for   stable Δt (3-D, h=1, m=2)")
    for d_t, d_w, chi in ((0.2, 0.0, -0.3), (0.2, 0.02, -0.3), (0.2, 0.0, -0.2), (0.2, 0.02, -0.2), (0.2, 0.0, -0.15),
                          (0.2, 0.0, -0.1), (0.2, 0.0, -0.05), (0.02, 0.0, -0.05), (0.02, 0.0, -0.01), (0.2, 0.0, -0.01)):
        lam0, lam1 = 0.5 * (d_t + d_w), 0.5 * (d_t + d_w + chi)
        bad = f"p_W > {(d_t + d_w) / -chi:.2f}" if lam1 < 0 else "-"
        tau = predicted_step(d_t, d_w, chi, largest_symbol((1, 1, 1), (1000, 1000, 1000)))
        print(f"{d_t:<5} {d_w:<5} {chi:<6} {lam0:<9.3f} {lam1:<9.3f} {bad:<15} {tau:.3g} day")


def section_growth():
    print("\n## growth: 1e-10 perturbation, 1-D slab, raw step at fixed Δt, 60 days, D_T = 0.2, no growth term")
    print("χ_WT   projection  limiter  h     Δt        Δt·σ_max  final |δ|  day |δ|>1e-6  rate (2nd half)")
    cases = []
    for chi in (-0.1, -0.3):
        for h, dt in ((1.0, 1.0), (0.5, 1.0), (0.25, 0.25), (1.0, 0.25), (0.5, 0.0625), (0.25, 0.015625)):
            cases.append((chi, "euclidean", True, h, dt))
        for projection, limiter in (("euclidean", False), ("none", True), ("rescale", True)):
            for h, dt in ((0.5, 1.0), (0.25, 0.25)):
                cases.append((chi, projection, limiter, h, dt))
    cases.append((0.0, "euclidean", True, 0.25, 0.25))
    for chi, projection, limiter, h, dt in cases:
        n = int(round(40 / h))
        chi_m = [[0, 0, 0], [0, 0, 0], [0, chi, 0]]
        run = lambda p: raw_run(p, (1.0, h), dt, 60.0, [0, 0.2, 0], chi_m, projection=projection, limiter=limiter)  # noqa: E731
        final, rate, exceed = perturbation_growth(run, slab_field(n, h), 60.0, dt)
        day = "-" if exceed is None else f"{exceed:.0f}"
        print(f"{chi:<6} {projection:<11} {str(limiter):<8} {h:<5} {dt:<9} {dt * 4 / h ** 2:<9.3g} {final:<10.1e} "
              f"{day:<13} {rate:+.3f}")


def square_tumour_field(h: float, length: float = 30.0) -> torch.Tensor:
    """2-D: a 10 mm tumour square (class 1) on the border of white matter (class 2, upper half) and class 0."""
    n = int(round(length / h))
    x = (torch.arange(n) + 0.5) * h
    xx, yy = torch.meshgrid(x, x, indexing="ij")
    labels = torch.zeros(n, n, dtype=torch.long)
    labels[yy > length / 2] = 2
    labels[((xx - length / 2).abs() < 5) & ((yy - length / 2).abs() < 5)] = 1
    return torch.nn.functional.one_hot(labels, 3).permute(2, 0, 1)[None].double()


def section_refine():
    print("\n## refine: 2-D, Δt·σ_max = 1 held fixed while h shrinks (raw step); max |δ| of a 1e-10 perturbation")
    print("χ_WT   h     Δt         day 7.5    day 15     day 22.5   day 30")
    for chi in (-0.3, -0.1):
        for h in (1.0, 0.5, 0.25):
            dt = h * h / 8
            chi_m = [[0, 0, 0], [0, 0, 0], [0, chi, 0]]
            p0 = square_tumour_field(h)
            g = torch.Generator().manual_seed(0)
            e = 1e-10 * torch.rand(p0.shape[2:], generator=g, dtype=torch.float64)
            p1 = p0.clone()
            p1[:, 1] += e
            p1[:, 2] -= e
            p1 = p1.clamp(min=0.0)
            p1 = p1 / p1.sum(1, keepdim=True)
            a = raw_run(p0, (h, h), dt, 30.0, [0, 0.2, 0], chi_m)
            b = raw_run(p1, (h, h), dt, 30.0, [0, 0.2, 0], chi_m)
            diffs = [float((x - y).abs().max()) for x, y in zip(a, b)]
            n = len(diffs)
            print(f"{chi:<6} {h:<5} {dt:<10.4g} " + " ".join(f"{diffs[int(n * f) - 1]:<10.1e}" for f in (0.25, 0.5, 0.75, 1.0)))


def section_threshold():
    print("\n## threshold: predicted stable Δt (1-D, m = 2) vs measured growth rate at 0.8×, 1.25×, 2× and 4× of it")
    print("D_T   χ_WT   h     predicted Δt   0.8×     1.25×    2×       4×")
    for d_t, chi, h in ((0.2, -0.1, 0.5), (0.2, -0.1, 0.25), (0.2, -0.15, 0.5), (0.2, -0.05, 0.25), (0.2, 0.3, 0.5)):
        n = int(round(40 / h))
        tau = predicted_step(d_t, 0.0, chi, 4 / h ** 2)
        rates = []
        for factor in (0.8, 1.25, 2.0, 4.0):
            dt = tau * factor
            steps = max(60, int(round(60.0 / dt)))
            chi_m = [[0, 0, 0], [0, 0, 0], [0, chi, 0]]
            run = lambda p: raw_run(p, (1.0, h), dt, steps * dt, [0, d_t, 0], chi_m)  # noqa: E731
            rates.append(perturbation_growth(run, slab_field(n, h), steps * dt, dt)[1])
        print(f"{d_t:<5} {chi:<6} {h:<5} {tau:<14.4g} " + " ".join(f"{r:<+8.3f}" for r in rates))


def section_precision():
    print("\n## precision: 3-D compact tumour, D_T = 0.2, α = 0.05, Δt = 1 day requested; max |float32 − float64|")
    print("D_pushed  χ_WT   χ_VT   sub-steps  day 30     day 60     day 90     warning")
    p0 = compact_tumour_field()
    for d_push, c_w, c_v in ((0.0, -0.3, -0.2), (0.02, -0.3, -0.2), (0.0, -0.2, -0.2), (0.0, -0.15, -0.15),
                             (0.0, -0.1, -0.1), (0.0, -0.05, -0.05), (0.0, 0.0, 0.0)):
        chi = torch.zeros(5, 5, dtype=torch.float64)
        chi[2, 1], chi[4, 1] = c_w, c_v
        diffusion = [0, 0.2, d_push, 0, d_push]
        report = cross_diffusion_stability(torch.tensor(diffusion, dtype=torch.float64).reshape(1, 5, 1, 1, 1), chi,
                                           (1.0, 1.0, 1.0), (30, 32, 28), 1.0)
        kwargs = dict(spacing=(1.0, 1.0, 1.0), days=[30.0, 60.0, 90.0], dt=1.0, diffusion=diffusion, growth_rate=0.05,
                      cross_diffusion=chi if (c_w or c_v) else None, return_trajectory=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                a = simulate(p0, **kwargs)
                b = simulate(p0.float(), **kwargs)
        kind = "ill-posed" if report.ill_posed else ("no margin" if report.unresolved else "-")
        diffs = [float((a[i].float() - b[i]).abs().max()) for i in range(3)]
        print(f"{d_push:<9} {c_w:<6} {c_v:<6} {report.substeps:<10} " + " ".join(f"{x:<10.2e}" for x in diffs)
              + f" {kind if caught else '-'}")


def section_brain():
    from AnatomyDTLib.parameters import PDEParameters
    from AnatomyDTLib.phantom import ellipsoid_brain
    from AnatomyDTLib.schema import BRAIN_SCHEMA
    from AnatomyDTLib.state import labels_to_field

    print("\n## brain: ellipsoid phantom 40×64×56 at 1 mm, Δt = 1 day requested; max |float32 − float64|")
    labels, _, _ = ellipsoid_brain(shape=(40, 64, 56), spacing_mm=(1.0, 1.0, 1.0), tumour_centre_mm=(0, -8, 9),
                                   tumour_radius_mm=7.0)
    p0 = labels_to_field(labels, 5).double()
    old = PDEParameters.brain_defaults()
    old.tumour_diffusion_by_tissue = {"background": 0.02, "white_matter": 0.2, "grey_matter": 0.02,
                                      "lateral_ventricles": 0.0}
    old.cross_diffusion = {"lateral_ventricles": {"tumour": -0.1}, "grey_matter": {"tumour": -0.05},
                           "white_matter": {"tumour": -0.05}}
    for name, params in (("old defaults", old), ("new defaults", PDEParameters.brain_defaults())):
        kwargs = params.simulate_kwargs(p0, BRAIN_SCHEMA)
        t0 = time.perf_counter()
        with torch.no_grad():
            a = simulate(p0, spacing=(1.0, 1.0, 1.0), days=[30.0, 60.0, 90.0], return_trajectory=True, **kwargs)
            k32 = dict(kwargs)
            k32["diffusion"] = kwargs["diffusion"].float()
            b = simulate(p0.float(), spacing=(1.0, 1.0, 1.0), days=[30.0, 60.0, 90.0], return_trajectory=True, **k32)
        diffs = [float((a[i].float() - b[i]).abs().max()) for i in range(3)]
        print(f"{name:<13} " + " ".join(f"{x:.2e}" for x in diffs) + f"   ({time.perf_counter() - t0:.0f} s)")


def section_multiphase(trials: int = 600):
    print("\n## multiphase: exact amplification of mixtures of 2–6 classes at Δt <= the pairwise limit (m = 2)")
    rng = np.random.default_rng(3)
    sigma_max = 12.0
    sigmas = np.linspace(sigma_max / 32, sigma_max, 32)

    def damping(x, d, s):
        r = 1 / (1 + x * d)
        return r + (1 - s * (1 + x * d)) ** 2 * (1 - r)

    def pair_limit(d, chi):
        dt = 20.0
        diff = torch.tensor(d, dtype=torch.float64).reshape(1, -1, 1, 1, 1)
        shape = (10 ** 6,) * 3
        spacing = (1.0, 1.0, 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = cross_diffusion_stability(diff, torch.tensor(chi), spacing, shape, dt, max_substeps=2000)
        if rep.ill_posed or rep.unresolved:
            return None
        return dt / rep.substeps

    for structure in ("one column", "general"):
        worst, count = 0.0, 0
        for _ in range(trials):
            k = int(rng.integers(3, 7))
            d = rng.choice([0, 0, 0.02, 0.1, 0.2, 0.5], size=k) * rng.uniform(0.5, 1.5, size=k)
            chi = np.zeros((k, k))
            if structure == "one column":
                j = int(rng.integers(k))
                for i in range(k):
                    if i != j and rng.uniform() < 0.7:
                        chi[i, j] = rng.uniform(-0.4, 0.2)
            else:
                chi = rng.uniform(-0.4, 0.3, size=(k, k)) * (rng.uniform(size=(k, k)) < 0.4)
                np.fill_diagonal(chi, 0)
            tau_max = pair_limit(d, chi)
            if tau_max is None:
                continue
            count += 1
            for _ in range(10):
                n = int(rng.integers(2, k + 1))
                active = sorted(rng.choice(k, size=n, replace=False))
                p = np.zeros(k)
                p[active] = rng.dirichlet(np.ones(n) * rng.choice([0.2, 0.5, 2.0]))
                if rng.uniform() < 0.3:  # a class the projection fills although absent
                    p[active[0]] = 0
                    p /= p.sum()
                idx = np.array(active)
                m_cross = (-np.diag(p) @ chi)[np.ix_(idx, idx)]
                basis = np.linalg.qr(np.vstack([np.ones(n), np.eye(n)[:-1]]).T)[0][:, 1:]
                for tau in tau_max * np.array([0.25, 0.5, 1.0]):
                    s = 1 / (1 + tau * d[idx] * sigma_max / 2)
                    for sig in sigmas:
                        x = tau * sig
                        amp = basis.T @ np.diag(damping(x, d[idx], s)) @ (np.eye(n) - x * m_cross) @ basis
                        worst = max(worst, max(abs(np.linalg.eigvals(amp))) - 1)
        print(f"{structure:<11}: {count} well-posed parameter sets × 10 states × 3 steps × 32 symbols; "
              f"largest spectral radius − 1 = {worst:.2e}")


SECTIONS = {"symbol": section_symbol, "growth": section_growth, "refine": section_refine, "threshold": section_threshold,
            "precision": section_precision, "brain": section_brain, "multiphase": section_multiphase}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(SECTIONS):
        t0 = time.perf_counter()
        SECTIONS[name]()
        print(f"({name}: {time.perf_counter() - t0:.0f} s)")
