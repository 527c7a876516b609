"""Fused CPU kernel of the no-grad IMEX step: one streaming pass over the state per step.

The torch inference path (:mod:`AnatomyDTLib.inference`) runs each stage of a step — reaction,
cross-diffusion, each Jacobi sweep, the simplex projection — as a chain of whole-array torch
operations, so a 240×240×155×5 state crosses memory some 50 times per step. This module computes
the same step voxel by voxel in one compiled kernel (numba), pipelined along the slowest axis:

    for each plane e (of the box, in order):
        explicit part at plane e          reaction + cross-diffusion from p^n     -> q[e]
        Jacobi sweep s at plane e - s     for s = 1..m, from sweep s-1's planes   -> u_s[e - s]
        finish plane e - L                diffused classes from u_m, the others from q,
                                          simplex projection, written back into p (in place)

Only a few planes of q and of each sweep live at a time (ring buffers: ≈ 1 MB per slab for a
brain tumour's box, ≈ 14 MB for full 240×240 planes of 5 classes, so they stay in the caches), so
main memory sees the state read once and written once — the step's unavoidable traffic. Every
stage is a vectorised loop along x per row; on short rows the rows' fixed cost weighs
(docs/performance.md, benchmarks/perf_row_length.py). The output lags the input by L = max(m, 1) planes, so every plane the explicit part still
has to read (its stencil reaches one plane ahead and one behind) is unchanged when read. The box
is split into one slab of planes per thread; each slab recomputes m + 1 planes of halo around it
from a copy of its neighbours' input planes, taken before any slab writes.

What it computes is the torch path's step exactly (same discretisation, same order: reaction,
then the cross-diffusion increment from p^n, the m Jacobi sweeps, then the projection of the
voxels that left the simplex); ``Testing/test_fused_step.py`` checks the agreement within
rounding on problems that use every feature. It covers the product's problems:

* reaction: logistic growth (α and κ scalar or per voxel), chemotherapy kill, clearance of the
  dying compartment, a domain mask (outside it nothing changes);
* cross-diffusion with a constant χ sub-matrix (rows × columns of the non-zero entries), when the
  outflow limiter provably cannot act for this Δt (``InferenceStepper.limiter_free_dt``);
* implicit diffusion of any subset of classes with uniform or per-face weights, conservative or
  classic Jacobi scaling, relaxation ω.

Everything else (a spatial χ, a limited cross-diffusion step, a learned reaction hook, CUDA
tensors, numba not installed, or ``ANATOMYDT_FUSED=0``) runs on the torch path, which stays the
reference. numba compiles the kernel on first use (≈ 20 s per dtype on a 2-core machine) and
caches the machine code on disk (next to this file, or in numba's user cache when that is
read-only), so later runs and later processes load it in well under a second.

Units: Δt in days, spacing in mm, χ and D in mm²/day, rates in 1/day.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

try:  # numba is a dependency, but a broken or missing install must not break predictions
    import numba
    from numba import njit, prange
except Exception:  # pragma: no cover - exercised only where numba cannot be imported
    numba = None

ENV_SWITCH = "ANATOMYDT_FUSED"
_NETWORK_LANES = 8  # class counts up to this are projected by the register sorting network

# parameter slots of the kernel's float array (kept in the state's dtype so float32 stays float32)
_DT, _OMEGA, _CHEMO, _CLEAR, _SLACK, _INV_HZ, _INV_HY, _INV_HX, _ZERO, _ONE = range(10)
# flag slots of the kernel's int array
(_TUMOUR, _DYING, _SINK, _HAS_GROWTH, _GROWTH_FIELD, _KAPPA_FIELD, _HAS_DOMAIN, _HAS_CLEARABLE,
 _DIFF_FIELD, _SCALE_FIELD, _SWEEPS, _THREADS) = range(12)


def fused_kernel_available() -> bool:
    """Whether the fused kernel can run here: numba importable and not switched off by the user
    (``ANATOMYDT_FUSED=0`` forces the torch path, e.g. to compare the two)."""
    return numba is not None and os.environ.get(ENV_SWITCH, "1").strip() not in ("0", "false", "no", "off")


if numba is not None:
    # The kernel works line by line: every inner loop runs over x along one contiguous line with
    # no branch, so that LLVM can vectorise it; the channel, face and boundary logic sits outside.
    # Lines of grid-sized arrays are rows from the box's first x on (views [ox:]); lines
    # of the slab's ring buffers are box-sized and indexed at x.

    @njit(cache=True, fastmath=True, nogil=True)
    def _row(p, c, z, y, z0, z1, lower, lower_start, upper, ox, y0):
        """Row (c, z, y, ox:) of the input state: the slab's own planes from p, its neighbours'
        planes from the copies (of the box's part of them) taken before any slab wrote."""
        if z < z0:
            return lower[c, z - lower_start, y - y0]
        if z >= z1:
            return upper[c, z - z1, y - y0]
        return p[c, z, y, ox:]

    @njit(cache=True, fastmath=True, nogil=True)
    def _coefficient_row(field, is_field, z, y, ox, constant_row):
        """Row (z, y, ox:) of a per-voxel coefficient (Z, Y, X), or its constant row."""
        if is_field:
            return field[z, y, ox:]
        return constant_row

    @njit(cache=True, fastmath=True, nogil=True)
    def _potential_plane(p, z, z0, z1, lower, lower_start, upper, chi, cols, y0, y1, ox, nx, out):
        """out[r] = Σ_c χ[r, c]·p[cols[c]] on plane z: the drift potential of each row of χ."""
        zero = chi[0, 0] - chi[0, 0]
        for r in range(chi.shape[0]):
            for y in range(y0, y1):
                o = out[r, y - y0]
                for x in range(nx):
                    o[x] = zero
                for c in range(cols.shape[0]):
                    w = chi[r, c]
                    src = _row(p, cols[c], z, y, z0, z1, lower, lower_start, upper, ox, y0)
                    for x in range(nx):
                        o[x] += w * src[x]

    @njit(cache=True, fastmath=True, nogil=True)
    def _reaction_line(q, ly, growth, kappa, mask, fl, par, ox, nx, tmp):
        """Logistic growth and chemotherapy on one line of q (in place), as the torch path."""
        n_channels = q.shape[0]
        dt, zero, one = par[_DT], par[_ZERO], par[_ONE]
        tumour, dying, sink = fl[_TUMOUR], fl[_DYING], fl[_SINK]
        viable = q[tumour, ly]
        sink_line = q[sink, ly]
        if fl[_HAS_GROWTH] == 1:
            others, keep, grow, shrink = tmp[0], tmp[1], tmp[2], tmp[3]
            for x in range(nx):
                others[x] = zero
            for c in range(n_channels):
                if c != tumour and c != dying:
                    line = q[c, ly]
                    for x in range(nx):
                        others[x] += line[x]  # the tissue share available to be displaced
            total = tmp[4]
            for x in range(nx):
                total[x] = viable[x]
            if dying >= 0:
                dying_line = q[dying, ly]
                for x in range(nx):
                    total[x] += dying_line[x]
            for x in range(nx):
                gain = (one - total[x] / kappa[x]) * viable[x] * growth[x] * dt * mask[x]
                shrink[x] = min(gain, zero)
                g = min(max(gain, zero), others[x])
                grow[x] = g
                keep[x] = one - g / others[x] if others[x] > zero else one
            for c in range(n_channels):
                if c != tumour and c != dying:
                    line = q[c, ly]
                    for x in range(nx):
                        line[x] *= keep[x]
            for x in range(nx):
                viable[x] += grow[x] + shrink[x]
                sink_line[x] -= shrink[x]
        if par[_CHEMO] > zero:
            for x in range(nx):
                killed = viable[x] * par[_CHEMO] * mask[x]
                viable[x] -= killed
                sink_line[x] += killed

    @njit(cache=True, fastmath=True, nogil=True)
    def _explicit_plane(p, e, z0, z1, lower, lower_start, upper, phi_ring, q, rows, growth, kappa, domain, clearable,
                        fl, par, bz0, bz1, y0, y1, ox, nx, constants, tmp):
        """q = reaction(p^n) + Δt·(cross-diffusion tendency at p^n) on plane e of the box."""
        dt, zero = par[_DT], par[_ZERO]
        n_channels = q.shape[0]
        has_domain = fl[_HAS_DOMAIN] == 1
        ones = constants[0, 0]
        phi_c = phi_ring[e % 3]
        for y in range(y0, y1):
            ly = y - y0
            for c in range(n_channels):
                src = _row(p, c, e, y, z0, z1, lower, lower_start, upper, ox, y0)
                dst = q[c, ly]
                for x in range(nx):
                    dst[x] = src[x]
            mask = domain[e, y, ox:] if has_domain else ones
            _reaction_line(q, ly, _coefficient_row(growth, fl[_GROWTH_FIELD] == 1, e, y, ox, constants[0, 1]),
                           _coefficient_row(kappa, fl[_KAPPA_FIELD] == 1, e, y, ox, constants[0, 2]), mask, fl, par, ox,
                           nx, tmp)
            if fl[_HAS_CLEARABLE] == 1:  # clearance of the dying cells whose delay has passed
                dying_line, sink_line = q[fl[_DYING], ly], q[fl[_SINK], ly]
                cl = clearable[e, y, ox:]
                for x in range(nx):
                    cleared = cl[x] * par[_CLEAR]
                    dying_line[x] -= cleared
                    sink_line[x] += cleared
            # cross-diffusion: Δt·Σ_axes (flux in through the lower face − out through the upper) / h,
            # flux = upwind(Δφ/h); at the box border a face's neighbour is the cell itself (Δφ = 0: no flux)
            fz = dt * par[_INV_HZ] * par[_INV_HZ]
            fy = dt * par[_INV_HY] * par[_INV_HY]
            fx = dt * par[_INV_HX] * par[_INV_HX]
            below, above = max(e - 1, bz0), min(e + 1, bz1 - 1)
            south, north = max(y - 1, y0), min(y + 1, y1 - 1)
            mask_zl = domain[below, y, ox:] if has_domain else ones
            mask_zu = domain[above, y, ox:] if has_domain else ones
            mask_yl = domain[e, south, ox:] if has_domain else ones
            mask_yu = domain[e, north, ox:] if has_domain else ones
            x_flux = tmp[0]  # x_flux[i] = flux through the face left of cell i; x_flux[0] = x_flux[nx] = 0
            for r in range(rows.shape[0]):
                k = rows[r]
                acc = q[k, ly]
                here = _row(p, k, e, y, z0, z1, lower, lower_start, upper, ox, y0)
                rho_zl = _row(p, k, below, y, z0, z1, lower, lower_start, upper, ox, y0)
                rho_zu = _row(p, k, above, y, z0, z1, lower, lower_start, upper, ox, y0)
                rho_yl = _row(p, k, e, south, z0, z1, lower, lower_start, upper, ox, y0)
                rho_yu = _row(p, k, e, north, z0, z1, lower, lower_start, upper, ox, y0)
                centre = phi_c[r, ly]
                phi_zl, phi_zu = phi_ring[below % 3, r, ly], phi_ring[above % 3, r, ly]
                phi_yl, phi_yu = phi_c[r, south - y0], phi_c[r, north - y0]
                x_flux[0] = zero
                x_flux[nx] = zero
                for x in range(nx - 1):
                    v = (centre[x + 1] - centre[x]) * mask[x] * mask[x + 1]
                    x_flux[x + 1] = fx * (max(v, zero) * here[x] + min(v, zero) * here[x + 1])
                for x in range(nx):
                    m = mask[x]
                    v_zl = (centre[x] - phi_zl[x]) * mask_zl[x] * m
                    v_zu = (phi_zu[x] - centre[x]) * m * mask_zu[x]
                    v_yl = (centre[x] - phi_yl[x]) * mask_yl[x] * m
                    v_yu = (phi_yu[x] - centre[x]) * m * mask_yu[x]
                    in_z = max(v_zl, zero) * rho_zl[x] + min(v_zl, zero) * here[x]
                    out_z = max(v_zu, zero) * here[x] + min(v_zu, zero) * rho_zu[x]
                    in_y = max(v_yl, zero) * rho_yl[x] + min(v_yl, zero) * here[x]
                    out_y = max(v_yu, zero) * here[x] + min(v_yu, zero) * rho_yu[x]
                    acc[x] += fz * (in_z - out_z) + fy * (in_y - out_y) + x_flux[x] - x_flux[x + 1]

    @njit(cache=True, fastmath=True, nogil=True)
    def _sweep_plane(z, u_ring, u_slots, channels, rhs, rhs_channels, out, wz, wy, wx, scale, fl, par, bz0, bz1,
                     y0, y1, ox, nx, constants, lap):
        """One Jacobi sweep u ← u + ω/(1 + Δt·c)·(rhs − u + Δt·∇·(D∇u)) on plane z of the box.

        Diffused class d is channel ``channels[d]`` of the planes ``u_ring[plane % u_slots]`` and
        channel ``rhs_channels[d]`` of ``rhs``; the result goes to ``out[d]``. Faces across the box
        border carry no flux: the box holds every non-zero value of the diffused classes plus a
        margin of m + 1 voxels. Face weights are D/h² (1/day) on faces (z-, y-, x-faces arrays)."""
        dt = par[_DT]
        field = fl[_DIFF_FIELD] == 1
        scale_field = fl[_SCALE_FIELD] == 1
        u_here = u_ring[z % u_slots]
        # at the box border a face's neighbour is the cell itself: zero difference, no flux
        below, above = max(z - 1, bz0), min(z + 1, bz1 - 1)
        u_below, u_above = u_ring[below % u_slots], u_ring[above % u_slots]
        zero = par[_ZERO]
        for d in range(out.shape[0]):
            c = channels[d]
            for y in range(y0, y1):
                ly = y - y0
                south, north = max(y - 1, y0), min(y + 1, y1 - 1)
                u = u_here[c, ly]
                u_zl, u_zu = u_below[c, ly], u_above[c, ly]
                u_yl, u_yu = u_here[c, south - y0], u_here[c, north - y0]
                w_zl = _coefficient_row(wz[d], field and z > bz0, z - 1, y, ox, constants[1 + d, 0])
                w_zu = _coefficient_row(wz[d], field and z < bz1 - 1, z, y, ox, constants[1 + d, 0])
                w_yl = _coefficient_row(wy[d], field and y > y0, z, y - 1, ox, constants[1 + d, 1])
                w_yu = _coefficient_row(wy[d], field and y < y1 - 1, z, y, ox, constants[1 + d, 1])
                w_x = _coefficient_row(wx[d], field and nx > 1, z, y, ox, constants[1 + d, 2])
                lap[0] = zero  # lap[i] = flow through the face left of cell i; lap[0] = lap[nx] = 0
                lap[nx] = zero
                for x in range(nx - 1):
                    lap[x + 1] = w_x[x] * (u[x + 1] - u[x])
                s = _coefficient_row(scale[d], scale_field, z, y, ox, constants[1 + d, 3])
                o = out[d, ly]
                r = rhs[rhs_channels[d], ly]
                for x in range(nx):
                    div = (w_zl[x] * (u_zl[x] - u[x]) + w_zu[x] * (u_zu[x] - u[x]) + w_yl[x] * (u_yl[x] - u[x])
                           + w_yu[x] * (u_yu[x] - u[x]) + lap[x + 1] - lap[x])
                    o[x] = u[x] + s[x] * (r[x] - u[x] + dt * div)

    @njit(cache=True, fastmath=True, nogil=True, inline="always")
    def _exchange(a, b):
        """Compare-exchange of a sorting network: (larger, smaller)."""
        return max(a, b), min(a, b)

    @njit(cache=True, fastmath=True, nogil=True, inline="always")
    def _threshold_candidate(running, theta, u_j, reciprocal, one):
        """One step j of the threshold search: running sum of the sorted values, c_j, and θ = c_j
        if u_j > c_j (``reciprocal`` = 1/j)."""
        running = running + u_j
        c_j = (running - one) * reciprocal
        return running, (c_j if u_j > c_j else theta)

    @njit(cache=True, fastmath=True, nogil=True)
    def _threshold_network(lanes, theta, nx, one, reciprocals):
        """θ of the simplex projection for up to 8 classes per voxel: the lanes sorted in registers by
        Batcher's 19-comparator network (branch-free, so the x loop vectorises), then
        θ = c_ρ with c_j = (Σ_{i<=j} u_i − 1)/j and ρ the last j with u_j > c_j. Rows of ``lanes``
        beyond the class count hold −1e30: they sort last and never satisfy u_j > c_j."""
        r2, r3, r4, r5 = reciprocals[1], reciprocals[2], reciprocals[3], reciprocals[4]
        r6, r7, r8 = reciprocals[5], reciprocals[6], reciprocals[7]
        for x in range(nx):
            v0, v1, v2, v3 = lanes[0, x], lanes[1, x], lanes[2, x], lanes[3, x]
            v4, v5, v6, v7 = lanes[4, x], lanes[5, x], lanes[6, x], lanes[7, x]
            v0, v1 = _exchange(v0, v1)
            v2, v3 = _exchange(v2, v3)
            v4, v5 = _exchange(v4, v5)
            v6, v7 = _exchange(v6, v7)
            v0, v2 = _exchange(v0, v2)
            v1, v3 = _exchange(v1, v3)
            v4, v6 = _exchange(v4, v6)
            v5, v7 = _exchange(v5, v7)
            v1, v2 = _exchange(v1, v2)
            v5, v6 = _exchange(v5, v6)
            v0, v4 = _exchange(v0, v4)
            v1, v5 = _exchange(v1, v5)
            v2, v6 = _exchange(v2, v6)
            v3, v7 = _exchange(v3, v7)
            v2, v4 = _exchange(v2, v4)
            v3, v5 = _exchange(v3, v5)
            v1, v2 = _exchange(v1, v2)
            v3, v4 = _exchange(v3, v4)
            v5, v6 = _exchange(v5, v6)
            run, th = v0, v0 - one  # j = 1: c_1 = u_1 - 1 always qualifies
            run, th = _threshold_candidate(run, th, v1, r2, one)
            run, th = _threshold_candidate(run, th, v2, r3, one)
            run, th = _threshold_candidate(run, th, v3, r4, one)
            run, th = _threshold_candidate(run, th, v4, r5, one)
            run, th = _threshold_candidate(run, th, v5, r6, one)
            run, th = _threshold_candidate(run, th, v6, r7, one)
            run, th = _threshold_candidate(run, th, v7, r8, one)
            theta[x] = th

    @njit(cache=True, fastmath=True, nogil=True)
    def _threshold_generic(lanes, n_channels, theta, running, nx, one, reciprocals):
        """θ of the simplex projection for any class count (odd-even transposition sort of a copy)."""
        order = lanes[n_channels:2 * n_channels]
        for c in range(n_channels):
            for x in range(nx):
                order[c, x] = lanes[c, x]
        for rnd in range(n_channels):
            for i in range(rnd % 2, n_channels - 1, 2):
                a, b = order[i], order[i + 1]
                for x in range(nx):
                    hi = max(a[x], b[x])
                    lo = min(a[x], b[x])
                    a[x] = hi
                    b[x] = lo
        for x in range(nx):
            running[x] = order[0, x]
            theta[x] = order[0, x] - one
        for j in range(1, n_channels):
            u_j = order[j]
            count = reciprocals[j]  # 1 / (j + 1) in the state's dtype
            for x in range(nx):
                running[x] += u_j[x]
                c_j = (running[x] - one) * count
                theta[x] = c_j if u_j[x] > c_j else theta[x]

    @njit(cache=True, fastmath=True, nogil=True)
    def _finish_plane(z, q, u_last, p, dying_out, is_diffused, domain, fl, par, y0, y1, ox, nx, constants, lanes,
                      tmp, reciprocals):
        """Write plane z back into p: diffused classes from the last sweep, the others from q. The
        voxels that left the simplex (channel sum off 1 by more than the slack, or a negative value)
        are projected — θ from a sorting network, as :func:`AnatomyDTLib.simplex.simplex_threshold`
        — the others are written as computed; outside the domain nothing changes."""
        n_channels = q.shape[0]
        dying = fl[_DYING]
        slack, zero, one = par[_SLACK], par[_ZERO], par[_ONE]
        has_domain = fl[_HAS_DOMAIN] == 1
        ones = constants[0, 0]
        total, smallest, theta, running, project = tmp[0], tmp[1], tmp[2], tmp[3], tmp[4]
        for y in range(y0, y1):
            ly = y - y0
            for c in range(n_channels):
                d = is_diffused[c]
                src = u_last[d, ly] if d >= 0 else q[c, ly]
                lane = lanes[c]
                for x in range(nx):
                    lane[x] = src[x]
            if dying >= 0:  # the integrator rescales delayed-death cohorts by the projection
                out = dying_out[z, y, ox:]
                for x in range(nx):
                    out[x] = lanes[dying, x]
            for x in range(nx):
                total[x] = lanes[0, x]
                smallest[x] = lanes[0, x]
            for c in range(1, n_channels):
                for x in range(nx):
                    total[x] += lanes[c, x]
                    smallest[x] = min(smallest[x], lanes[c, x])
            if n_channels <= _NETWORK_LANES:
                _threshold_network(lanes, theta, nx, one, reciprocals)
            else:
                _threshold_generic(lanes, n_channels, theta, running, nx, one, reciprocals)
            mask = domain[z, y, ox:] if has_domain else ones
            for x in range(nx):  # project: 1 where the voxel left the simplex inside the domain, else 0
                off = abs(total[x] - one) > slack or smallest[x] < zero
                project[x] = one if (off and mask[x] > zero) else zero
            # Outside the domain every term is masked, so the lanes equal p there exactly: writing
            # them unprojected leaves p unchanged. The blend is exact for project in {0, 1}.
            for c in range(n_channels):
                dst = p[c, z, y, ox:]
                lane = lanes[c]
                for x in range(nx):
                    dst[x] = project[x] * max(lane[x] - theta[x], zero) + (one - project[x]) * lane[x]

    @njit(cache=True, fastmath=True, nogil=True)
    def _run_slab(p, z0, z1, lower, upper, box, chi, rows, cols, growth, kappa, domain, clearable, diffused,
                  is_diffused, wz, wy, wx, scale, dying_out, fl, par, constants):
        """Advance the output planes [z0, z1) of the box by one step (the pipeline of the module
        docstring): explicit part at plane e, sweep s at e - s, output at e - max(m, 1)."""
        bz0, bz1, y0, y1, ox, x1 = box[0], box[1], box[2], box[3], box[4], box[5]
        ny, nx = y1 - y0, x1 - ox
        n_channels = p.shape[0]
        m = fl[_SWEEPS]
        lag = max(m, 1)
        q_slots = max(lag, 2) + 1
        kd = max(diffused.shape[0], 1)
        q_ring = np.empty((q_slots, n_channels, ny, nx), dtype=p.dtype)
        phi_ring = np.empty((3, max(rows.shape[0], 1), ny, nx), dtype=p.dtype)
        u_ring = np.empty((lag, 3, kd, ny, nx), dtype=p.dtype)  # u_s of sweep s = 1..m
        identity = np.arange(kd)
        tmp = np.zeros((6, nx + 1), dtype=p.dtype)
        lanes = np.full((max(2 * n_channels, _NETWORK_LANES), nx), -1e30, dtype=p.dtype)  # see _threshold_network
        reciprocals = np.empty(max(n_channels, _NETWORK_LANES), dtype=p.dtype)
        for j in range(reciprocals.shape[0]):
            reciprocals[j] = 1.0 / (j + 1)
        lower_start = z0 - lower.shape[1]
        e_first = max(z0 - m, bz0)
        e_stop = min(z1 + m, bz1)
        has_cross = rows.shape[0] > 0
        if has_cross:  # potentials of the planes the first explicit plane needs
            for z in range(max(e_first - 1, bz0), min(e_first + 1, bz1)):
                _potential_plane(p, z, z0, z1, lower, lower_start, upper, chi, cols, y0, y1, ox, nx, phi_ring[z % 3])
        for e in range(z0 - m, z1 + lag):
            if e_first <= e < e_stop:
                if has_cross and e + 1 < bz1:
                    _potential_plane(p, e + 1, z0, z1, lower, lower_start, upper, chi, cols, y0, y1, ox, nx,
                                     phi_ring[(e + 1) % 3])
                _explicit_plane(p, e, z0, z1, lower, lower_start, upper, phi_ring, q_ring[e % q_slots], rows, growth,
                                kappa, domain, clearable, fl, par, bz0, bz1, y0, y1, ox, nx, constants, tmp)
            for s in range(1, m + 1):
                zs = e - s
                if zs < max(z0 - (m - s), bz0) or zs >= min(z1 + (m - s), bz1):
                    continue
                if s == 1:  # u_0 = rhs = q, read through the diffused channels
                    _sweep_plane(zs, q_ring, q_slots, diffused, q_ring[zs % q_slots], diffused, u_ring[0, zs % 3],
                                 wz, wy, wx, scale, fl, par, bz0, bz1, y0, y1, ox, nx, constants, tmp[0])
                else:
                    _sweep_plane(zs, u_ring[s - 2], 3, identity, q_ring[zs % q_slots], diffused,
                                 u_ring[s - 1, zs % 3], wz, wy, wx, scale, fl, par, bz0, bz1, y0, y1, ox, nx,
                                 constants, tmp[0])
            zf = e - lag
            if z0 <= zf < z1:
                _finish_plane(zf, q_ring[zf % q_slots], u_ring[lag - 1, zf % 3], p, dying_out, is_diffused, domain,
                              fl, par, y0, y1, ox, nx, constants, lanes, tmp, reciprocals)

    @njit(cache=True, fastmath=True, nogil=True, parallel=True)
    def _fused_step(p, box, chi, rows, cols, growth, kappa, domain, clearable, diffused, is_diffused, wz, wy, wx,
                    scale, dying_out, fl, par, constants):
        """One IMEX step of a (C, Z, Y, X) state, in place, on ``box`` = (z0, z1, y0, y1, x0, x1):
        one slab of planes per thread, each with copies of the input planes it reads beyond its own
        range (taken before any slab writes)."""
        bz0, bz1 = box[0], box[1]
        halo = fl[_SWEEPS] + 1
        n_planes = bz1 - bz0
        slabs = max(1, min(fl[_THREADS], n_planes // (4 * halo)))
        starts = np.empty(slabs + 1, dtype=np.int64)
        for i in range(slabs + 1):
            starts[i] = bz0 + (n_planes * i) // slabs
        y0, y1, x0, x1 = box[2], box[3], box[4], box[5]
        n_channels = p.shape[0]
        lowers = np.empty((slabs, n_channels, halo, y1 - y0, x1 - x0), dtype=p.dtype)
        uppers = np.empty((slabs, n_channels, halo, y1 - y0, x1 - x0), dtype=p.dtype)
        for i in prange(slabs):  # only planes inside the box are ever read
            for h in range(halo):
                below = starts[i] - halo + h
                if bz0 <= below:
                    lowers[i, :, h] = p[:, below, y0:y1, x0:x1]
                above = starts[i + 1] + h
                if above < bz1:
                    uppers[i, :, h] = p[:, above, y0:y1, x0:x1]
        for i in prange(slabs):
            _run_slab(p, starts[i], starts[i + 1], lowers[i], uppers[i], box, chi, rows, cols, growth, kappa, domain,
                      clearable, diffused, is_diffused, wz, wy, wx, scale, dying_out, fl, par, constants)


if numba is not None:

    @njit(cache=True, fastmath=True, nogil=True, parallel=True)
    def _floor_and_bound(p, channels, window, floor, out):
        """For each listed channel: set values of magnitude below ``floor`` to zero (in place) inside
        ``window`` = (z0, z1, y0, y1, x0, x1), and write the bounding box of its non-zero voxels
        there as out[i] = (z0, z1, y0, y1, x0, x1) in grid indices (z1 = 0 when there are none)."""
        wz0, wz1, wy0, wy1, wx0, wx1 = window[0], window[1], window[2], window[3], window[4], window[5]
        n_planes = wz1 - wz0
        n = channels.shape[0]
        rows_lo = np.full((n_planes, n), wy1, dtype=np.int64)
        rows_hi = np.full((n_planes, n), -1, dtype=np.int64)
        cols_lo = np.full((n_planes, n), wx1, dtype=np.int64)
        cols_hi = np.full((n_planes, n), -1, dtype=np.int64)
        zero = p[0, 0, 0, 0] - p[0, 0, 0, 0]
        for i in prange(n_planes):
            z = wz0 + i
            for j in range(n):
                plane = p[channels[j], z]
                for y in range(wy0, wy1):
                    row = plane[y, wx0:]
                    first, last = wx1, -1
                    for x in range(wx1 - wx0):
                        v = row[x]
                        keep = abs(v) >= floor
                        row[x] = v if keep else zero
                        first = min(first, x + wx0 if keep else wx1)
                        last = max(last, x + wx0 if keep else -1)
                    if last >= 0:
                        rows_lo[i, j] = min(rows_lo[i, j], y)
                        rows_hi[i, j] = y
                        cols_lo[i, j] = min(cols_lo[i, j], first)
                        cols_hi[i, j] = max(cols_hi[i, j], last)
        for j in range(n):
            box = np.array([wz1, -1, wy1, -1, wx1, -1])
            for i in range(n_planes):
                if rows_hi[i, j] >= 0:
                    box[0] = min(box[0], wz0 + i)
                    box[1] = max(box[1], wz0 + i)
                    box[2] = min(box[2], rows_lo[i, j])
                    box[3] = max(box[3], rows_hi[i, j])
                    box[4] = min(box[4], cols_lo[i, j])
                    box[5] = max(box[5], cols_hi[i, j])
            if box[1] < 0:
                out[j, :] = 0
            else:
                out[j, 0], out[j, 1] = box[0], box[1] + 1
                out[j, 2], out[j, 3] = box[2], box[3] + 1
                out[j, 4], out[j, 5] = box[4], box[5] + 1


def floored_supports_(p: torch.Tensor, channels: list[int], window, floor: float) -> dict | None:
    """The torch path's ``InferenceStepper._floored_supports_`` in one pass per batch item: zero the
    listed channels' values below ``floor`` inside ``window`` (three slices) and return
    {channel: box of its non-zero voxels, or None}. Returns None when the kernel cannot run here
    (then the caller uses torch)."""
    if not fused_kernel_available() or p.device.type != "cpu" or p.dim() != 5 or p.dtype not in (
            torch.float32, torch.float64) or not p.is_contiguous():
        return None
    window_array = np.array([window[0].start, window[0].stop, window[1].start, window[1].stop, window[2].start,
                             window[2].stop], dtype=np.int64)
    merged: dict = {c: None for c in channels}
    out = np.zeros((len(channels), 6), dtype=np.int64)
    for b in range(p.shape[0]):
        _floor_and_bound(_as_numpy(p[b]), np.asarray(channels, dtype=np.int64), window_array, float(floor), out)
        for j, c in enumerate(channels):
            if out[j, 1] > out[j, 0]:
                box = (slice(int(out[j, 0]), int(out[j, 1])), slice(int(out[j, 2]), int(out[j, 3])),
                       slice(int(out[j, 4]), int(out[j, 5])))
                merged[c] = box if merged[c] is None else tuple(
                    slice(min(a.start, b_.start), max(a.stop, b_.stop)) for a, b_ in zip(merged[c], box))
    return merged


def _kernel_threads(default: int) -> int:
    """Slabs the kernel runs in parallel: ANATOMYDT_KERNEL_THREADS, else ``default``."""
    value = os.environ.get("ANATOMYDT_KERNEL_THREADS")
    return int(value) if value else default


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class FusedStep:
    """Adapter from an :class:`~AnatomyDTLib.inference.InferenceStepper` to the fused kernel.

    Built once per solve; :meth:`applies` says per step whether the kernel can compute it, and
    :meth:`step_` computes it in place on a box. Arrays that do not change between steps (χ, the
    face weights, α, κ, the domain) are converted once.
    """

    def __init__(self, stepper):
        self.stepper = stepper
        self.threads = torch.get_num_threads()  # slabs run in parallel (the solver may lower torch's own count)
        pr = stepper.pr
        self.usable = (fused_kernel_available() and stepper.device.type == "cpu"
                       and stepper.dtype in (torch.float32, torch.float64) and pr.reaction_hook is None
                       and stepper.cross_rows is not None and len(stepper.shape) == 5)
        if not self.usable:
            return
        np_dtype = np.float32 if stepper.dtype == torch.float32 else np.float64
        self.np_dtype = np_dtype
        spatial = stepper.shape[2:]
        if stepper.cross_rows:
            self.chi = _as_numpy(stepper.chi_sub.to(stepper.dtype)).astype(np_dtype)
            self.rows = np.asarray(stepper.cross_rows, dtype=np.int64)
            self.cols = np.asarray(stepper.cross_cols, dtype=np.int64)
        else:
            self.chi = np.zeros((1, 1), dtype=np_dtype)
            self.rows = np.zeros(0, dtype=np.int64)
            self.cols = np.zeros(1, dtype=np.int64)
        self.has_growth = not _is_zero(pr.growth_rate)
        self.growth = self._field_or_scalar(pr.growth_rate, spatial)
        self.kappa = self._field_or_scalar(pr.carrying_capacity, spatial)
        self.domain = None if pr.domain is None else pr.domain
        self.diffused = np.asarray(stepper.diffused, dtype=np.int64)
        self.sweeps = pr.jacobi_iters if stepper.diffused else 0
        is_diffused = np.full(stepper.shape[1], -1, dtype=np.int64)  # channel -> diffused index, or -1
        if self.sweeps > 0:  # with no sweep the implicit solve is the identity: every class comes from q
            for d, c in enumerate(stepper.diffused):
                is_diffused[c] = d
        self.is_diffused = is_diffused
        self.dummy3 = np.zeros((1, 1, 1), dtype=np_dtype)
        self.dummy4 = np.zeros((1, 1, 1, 1), dtype=np_dtype)

    @staticmethod
    def _field_or_scalar(value, spatial):
        """(B|1, 1, *S) or a broadcastable scalar tensor -> (tensor, is_field)."""
        t = torch.as_tensor(value)
        is_field = t.dim() >= 2 and tuple(t.shape[2:]) == tuple(spatial)
        return t, is_field

    def applies(self, dt: float) -> bool:
        """Whether this step can run fused: the torch path is used for a limited cross-diffusion step."""
        if not self.usable:
            return False
        lim = self.stepper.limiter_free_dt
        return not self.stepper.cross_rows or (lim is not None and dt <= lim)

    def _item(self, value, b: int, is_field: bool):
        """Batch item b of a coefficient: a contiguous (Z, Y, X) array for a field, else a float."""
        t = torch.as_tensor(value)
        if is_field:
            return _as_numpy(t[min(b, t.shape[0] - 1), 0].to(self.stepper.dtype).contiguous())
        per_item = t.reshape(t.shape[0], -1)[:, 0] if t.dim() > 0 else t.reshape(1)  # one value per batch item
        return float(per_item[min(b, per_item.shape[0] - 1)])

    def _diffusion_arrays(self, b: int, dt: float, constants: np.ndarray):
        """Face weights D/h² per axis (1/day) and the Jacobi scale ω/(1 + Δt·c) of the diffused
        classes for batch item b: per-face arrays when they vary, else written into ``constants``."""
        st = self.stepper
        if not st.diffused:
            return self.dummy4, self.dummy4, self.dummy4, self.dummy4, False, False
        field = not st.uniform
        arrays = []
        for axis, w in enumerate(st.weights):
            item = w[min(b, w.shape[0] - 1)]  # (Kd, faces) or (Kd, 1, 1, 1)
            if not field:
                constants[1:, axis, :] = _as_numpy(item.reshape(-1, 1).to(st.dtype))
            arrays.append(_as_numpy(item.to(st.dtype).contiguous()))
        scale = st.pr.omega / (1.0 + dt * st._diag)
        scale = scale[min(b, scale.shape[0] - 1)]  # (Kd, 1, 1, 1) conservative or (Kd, *S) classic
        scale_field = any(s > 1 for s in scale.shape[1:])
        if not scale_field:
            constants[1:, 3, :] = _as_numpy(scale.reshape(-1, 1).to(st.dtype))
        return arrays[0], arrays[1], arrays[2], _as_numpy(scale.to(st.dtype).contiguous()), field, scale_field

    def step_(self, p: torch.Tensor, box, dt: float, chemo_rate: float, clearable, dying_out) -> None:
        """One step of ``p`` (B, C, Z, Y, X), in place, on ``box`` (three slices); writes the dying
        channel before the projection into ``dying_out`` (B, 1, Z, Y, X) when there is one."""
        st = self.stepper
        pr = st.pr
        spacing = st.spacing
        clearance = 0.0
        if clearable is not None:
            clearance = 1.0 - math.exp(-pr.plan.radiotherapy.delayed_death.clearance_rate_per_day * dt)
        par = np.array([dt, pr.omega, 1.0 - math.exp(-chemo_rate * dt) if chemo_rate > 0 else 0.0, clearance,
                        st.slack, 1.0 / spacing[0], 1.0 / spacing[1], 1.0 / spacing[2], 0.0, 1.0], dtype=self.np_dtype)
        box_array = np.array([box[0].start, box[0].stop, box[1].start, box[1].stop, box[2].start, box[2].stop],
                             dtype=np.int64)
        growth, growth_field = self.growth
        kappa, kappa_field = self.kappa
        row_length = p.shape[-1]
        for b in range(p.shape[0]):
            # constant rows: [0] ones, α, κ; [1 + d] face weights z, y, x and Jacobi scale of class d
            constants = np.ones((1 + max(1, len(st.diffused)), 4, row_length), dtype=self.np_dtype)
            wz, wy, wx, scale, diff_field, scale_field = self._diffusion_arrays(b, dt, constants)
            growth_b = self._item(growth, b, growth_field)
            kappa_b = self._item(kappa, b, kappa_field)
            if not growth_field:
                constants[0, 1, :], growth_b = growth_b, self.dummy3
            if not kappa_field:
                constants[0, 2, :], kappa_b = kappa_b, self.dummy3
            domain = self.dummy3 if self.domain is None else self._item(self.domain, b, True)
            clear = self.dummy3 if clearable is None else self._item(clearable, b, True)
            dying = self.dummy3 if dying_out is None else _as_numpy(dying_out[b, 0])
            fl = np.array([pr.tumour, -1 if pr.dying is None else pr.dying, pr.sink, int(self.has_growth),
                           int(growth_field), int(kappa_field), int(self.domain is not None), int(clearable is not None),
                           int(diff_field), int(scale_field), self.sweeps, _kernel_threads(self.threads)], dtype=np.int64)
            _fused_step(_as_numpy(p[b]), box_array, self.chi, self.rows, self.cols, growth_b, kappa_b, domain, clear,
                        self.diffused, self.is_diffused, wz, wy, wx, scale, dying, fl, par, constants)


def _is_zero(value) -> bool:
    return not bool((torch.as_tensor(value) != 0).any())
