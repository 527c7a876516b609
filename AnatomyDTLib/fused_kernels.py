"""The numba kernels of the fused no-grad IMEX step; :mod:`AnatomyDTLib.fused` explains the
scheme and is the only caller (it imports this module on first use, so that runs which never
take the fused path do not import numba).

The kernel works line by line: every inner loop runs over x along one contiguous line with no
branch, so that LLVM can vectorise it; the channel, face and boundary logic sits outside. Lines of
grid-sized arrays are rows from the box's first x on (views ``[ox:]``); lines of a slab's ring
buffers are box-sized. Scalars reach the kernels in two small arrays, ``par`` (floats, in the
state's dtype so that float32 stays float32) and ``fl`` (int flags); :func:`parameter_array` and
:func:`flag_array` fill them by name.

Units: Δt in days, spacing in mm, χ and D in mm²/day, rates in 1/day.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba import uint64 as _u  # unsigned indices: no wraparound test, so the loops vectorise

_NETWORK_LANES = 8  # class counts up to this are projected by the register sorting network

# parameter slots of the kernel's float array (kept in the state's dtype so float32 stays float32)
_DT, _OMEGA, _CHEMO, _CLEAR, _SLACK, _INV_HZ, _INV_HY, _INV_HX, _ZERO, _ONE = range(10)
# flag slots of the kernel's int array
(_TUMOUR, _DYING, _SINK, _HAS_GROWTH, _GROWTH_FIELD, _KAPPA_FIELD, _HAS_DOMAIN, _HAS_CLEARABLE,
 _DIFF_FIELD, _SCALE_FIELD, _SWEEPS, _THREADS) = range(12)



def parameter_array(dtype, *, dt, omega, chemo_fraction, clearance_fraction, slack, inverse_spacing):
    """``par``: Δt (days), ω, the chemotherapy kill fraction 1 − exp(−c·Δt) of this step, the
    clearance fraction of the dying cells, the simplex slack, 1/h per axis (1/mm), 0 and 1."""
    values = [0.0] * 10
    values[_DT], values[_OMEGA], values[_CHEMO], values[_CLEAR], values[_SLACK] = (
        dt, omega, chemo_fraction, clearance_fraction, slack)
    values[_INV_HZ], values[_INV_HY], values[_INV_HX] = inverse_spacing
    values[_ZERO], values[_ONE] = 0.0, 1.0
    return np.array(values, dtype=dtype)


def flag_array(*, tumour, dying, sink, has_growth, growth_field, kappa_field, has_domain, has_clearable,
               diffusion_field, scale_field, sweeps, threads):
    """``fl``: channel indices (dying −1 when there is none), which coefficients are per-voxel
    fields, the number of Jacobi sweeps and of parallel slabs."""
    values = [0] * 12
    values[_TUMOUR], values[_DYING], values[_SINK] = tumour, dying, sink
    values[_HAS_GROWTH], values[_GROWTH_FIELD], values[_KAPPA_FIELD] = int(has_growth), int(growth_field), int(kappa_field)
    values[_HAS_DOMAIN], values[_HAS_CLEARABLE] = int(has_domain), int(has_clearable)
    values[_DIFF_FIELD], values[_SCALE_FIELD] = int(diffusion_field), int(scale_field)
    values[_SWEEPS], values[_THREADS] = sweeps, threads
    return np.array(values, dtype=np.int64)



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

# ------------------------------------------------------------------------------------------------
# Padded planes. Every stage works on one plane of the box at a time, held as one flat line of
# (ny + 2)·(nx + 2) values: row ly, column lx of the box at index (ly + 1)·W + lx + 1 with
# W = nx + 2, framed by a ring of ghost cells. A ghost holds a copy of the box cell next to it, so
# every difference across the box border is exactly zero: no flux crosses it, as the box holds
# every non-zero value of the classes that move plus a margin (module docstring of fused.py). Loops
# then run over one contiguous span per plane, [W + 1, W·(ny + 1) − 1), with neighbours at ±1
# (x) and ±W (y) and no per-row work; the span also covers the ghost columns between rows, whose
# values are recomputed (finite, never used) and then overwritten by the next ghost refresh.
# ------------------------------------------------------------------------------------------------

@njit(cache=True, fastmath=True, nogil=True)
def _gather(src, base, stride, ny, nx, width, dst):
    """dst[(ly + 1)·W + lx + 1] = src[base + ly·stride + lx] for the box's ny rows of nx values."""
    for ly in range(ny):
        s = base + ly * stride
        d = (ly + 1) * width + 1
        for lx in range(nx):
            dst[_u(d + lx)] = src[_u(s + lx)]

@njit(cache=True, fastmath=True, nogil=True)
def _scatter(src, dst, base, stride, ny, nx, width):
    """The inverse of :func:`_gather`: the box's cells of a padded plane back into a flat grid array."""
    for ly in range(ny):
        d = base + ly * stride
        s = (ly + 1) * width + 1
        for lx in range(nx):
            dst[_u(d + lx)] = src[_u(s + lx)]

@njit(cache=True, fastmath=True, nogil=True)
def _refresh_ghosts(plane, ny, width):
    """Ghost cells = the box cell next to them (zero difference, hence no flux, across the border)."""
    for r in range(1, ny + 1):
        plane[r * width] = plane[r * width + 1]
        plane[r * width + width - 1] = plane[r * width + width - 2]
    last = (ny + 1) * width
    for i in range(width):
        plane[_u(i)] = plane[_u(width + i)]
        plane[_u(last + i)] = plane[_u(last - width + i)]

@njit(cache=True, fastmath=True, nogil=True)
def _state_source(p_flat, lower_flat, upper_flat, c, z, z0, z1, lower_start, halo, shape, y0, ox, ny, nx):
    """(array, offset of the box's first cell, row stride) of channel c, plane z of the step's
    input: the slab's own planes from p, its neighbours' from the copies taken before any slab
    wrote (halo planes of the box's part, (C, halo, ny, nx))."""
    if z < z0:
        return lower_flat, ((c * halo + z - lower_start) * ny) * nx, nx
    if z >= z1:
        return upper_flat, ((c * halo + z - z1) * ny) * nx, nx
    return p_flat, ((c * shape[1] + z) * shape[2] + y0) * shape[3] + ox, shape[3]

@njit(cache=True, fastmath=True, nogil=True)
def _gather_grid_plane(field, z, y0, ox, ny, nx, width, dst):
    """Plane z of a (Z, Y, X) grid array (the domain, α, κ, the clearable cells) into a padded plane,
    ghosts refreshed."""
    flat = field.reshape(field.size)
    _gather(flat, (z * field.shape[1] + y0) * field.shape[2] + ox, field.shape[2], ny, nx, width, dst)
    _refresh_ghosts(dst, ny, width)

@njit(cache=True, fastmath=True, nogil=True)
def _gather_face_weights(wz, wy, wx, scale, d, z, bz0, y0, ox, ny, nx, width, field, scale_field, out):
    """Class d's per-face weights D/h² of plane z into padded planes: out[0] the face below each
    cell (z − 1 | z; zero on the box's lowest plane), out[1] the face north of it (y | y + 1),
    out[2] the face east of it (x | x + 1), out[3] the Jacobi scale (classic variant). Faces
    beyond the box or the grid get weight 0; the differences across them are zero anyway."""
    zero = out[0, 0] - out[0, 0]
    if field:
        below = out[0]
        if z > bz0:
            w = wz[d]
            _gather(w.reshape(w.size), ((z - 1) * w.shape[1] + y0) * w.shape[2] + ox, w.shape[2], ny, nx, width,
                    below)
        else:
            for i in range(below.shape[0]):
                below[_u(i)] = zero
        north = out[1]
        w = wy[d]
        rows = min(ny, w.shape[1] - y0)  # faces y | y + 1 exist for y < Y − 1
        if rows > 0:
            _gather(w.reshape(w.size), (z * w.shape[1] + y0) * w.shape[2] + ox, w.shape[2], rows, nx, width, north)
        for ly in range(max(rows, 0), ny):
            for lx in range(nx):
                north[(ly + 1) * width + 1 + lx] = zero
        for lx in range(nx):  # the box's last row: its north neighbour is a ghost
            north[ny * width + 1 + lx] = zero
        east = out[2]
        w = wx[d]
        cols = min(nx - 1, w.shape[2] - ox)
        if cols > 0:
            _gather(w.reshape(w.size), (z * w.shape[1] + y0) * w.shape[2] + ox, w.shape[2], ny, cols, width, east)
        for ly in range(ny):
            for lx in range(max(cols, 0), nx):
                east[(ly + 1) * width + 1 + lx] = zero
    if scale_field:
        s = scale[d]
        _gather(s.reshape(s.size), (z * s.shape[1] + y0) * s.shape[2] + ox, s.shape[2], ny, nx, width, out[3])

@njit(cache=True, fastmath=True, nogil=True)
def _potential_plane(state, chi, cols, lo, hi, out):
    """out[r] = Σ_c χ[r, c]·p[cols[c]] on one padded plane (ghosts included, so they stay copies)."""
    zero = chi[0, 0] - chi[0, 0]
    for r in range(chi.shape[0]):
        o = out[r]
        for i in range(lo, hi):
            o[_u(i)] = zero
        for c in range(cols.shape[0]):
            w = chi[r, c]
            src = state[cols[c]]
            for i in range(lo, hi):
                o[_u(i)] += w * src[_u(i)]

@njit(cache=True, fastmath=True, nogil=True)
def _reaction_plane(state, q, growth, kappa, mask, fl, par, lo, hi, tmp):
    """q = the input plane after logistic growth and chemotherapy, as the torch path (every channel
    of q is written; the input is only read)."""
    n_channels = q.shape[0]
    dt, zero, one = par[_DT], par[_ZERO], par[_ONE]
    tumour, dying, sink = fl[_TUMOUR], fl[_DYING], fl[_SINK]
    viable = q[tumour]
    sink_line = q[sink]
    if fl[_HAS_GROWTH] == 1:
        others, keep, change, shrink = tmp[0], tmp[1], tmp[2], tmp[3]
        first = True
        for c in range(n_channels):
            if c != tumour and c != dying:
                line = state[c]
                if first:
                    for i in range(lo, hi):
                        others[_u(i)] = line[_u(i)]  # the tissue share available to be displaced
                    first = False
                else:
                    for i in range(lo, hi):
                        others[_u(i)] += line[_u(i)]
        if first:  # no tissue channel
            for i in range(lo, hi):
                others[_u(i)] = zero
        viable_in = state[tumour]
        dying_in = state[max(dying, 0)]
        with_dying = one if dying >= 0 else zero
        for i in range(lo, hi):
            total = viable_in[_u(i)] + with_dying * dying_in[_u(i)]
            gain = (one - total / kappa[_u(i)]) * viable_in[_u(i)] * growth[_u(i)] * dt * mask[_u(i)]
            s = min(gain, zero)
            g = min(max(gain, zero), others[_u(i)])
            keep[_u(i)] = one - g / others[_u(i)] if others[_u(i)] > zero else one
            change[_u(i)] = g + s
            shrink[_u(i)] = s
        for c in range(n_channels):
            if c != tumour and c != dying:
                line, out = state[c], q[c]
                for i in range(lo, hi):
                    out[_u(i)] = line[_u(i)] * keep[_u(i)]
        for i in range(lo, hi):
            viable[_u(i)] = viable_in[_u(i)] + change[_u(i)]
        if dying >= 0:
            line, out = state[dying], q[dying]
            for i in range(lo, hi):
                out[_u(i)] = line[_u(i)]
        for i in range(lo, hi):
            sink_line[_u(i)] -= shrink[_u(i)]
    else:
        for c in range(n_channels):
            line, out = state[c], q[c]
            for i in range(lo, hi):
                out[_u(i)] = line[_u(i)]
    if par[_CHEMO] > zero:
        for i in range(lo, hi):
            killed = viable[_u(i)] * par[_CHEMO] * mask[_u(i)]
            viable[_u(i)] -= killed
            sink_line[_u(i)] += killed

@njit(cache=True, fastmath=True, nogil=True)
def _explicit_plane(here_state, below_state, above_state, phi, phi_below, phi_above, mask, mask_below, mask_above,
                    q, rows, growth, kappa, clearable, fl, par, width, lo, hi, tmp):
    """q = reaction(p^n) + Δt·(cross-diffusion tendency at p^n) on one padded plane. ``*_below`` /
    ``*_above`` are the planes z − 1 and z + 1 (the plane itself on the box's first / last plane:
    no flux there)."""
    dt, zero = par[_DT], par[_ZERO]
    n_channels = q.shape[0]
    _reaction_plane(here_state, q, growth, kappa, mask, fl, par, lo, hi, tmp)
    if fl[_HAS_CLEARABLE] == 1:  # clearance of the dying cells whose delay has passed
        dying_line, sink_line = q[fl[_DYING]], q[fl[_SINK]]
        for i in range(lo, hi):
            cleared = clearable[_u(i)] * par[_CLEAR]
            dying_line[_u(i)] -= cleared
            sink_line[_u(i)] += cleared
    # cross-diffusion: Δt·Σ_axes (flux in through the lower face − out through the upper) / h,
    # flux = upwind(Δφ/h); the face x | x + 1 is computed once per cell pair (x_flux)
    fz = dt * par[_INV_HZ] * par[_INV_HZ]
    fy = dt * par[_INV_HY] * par[_INV_HY]
    fx = dt * par[_INV_HX] * par[_INV_HX]
    x_flux = tmp[5]  # x_flux[_u(i)] = flux through the face east of cell i
    for r in range(rows.shape[0]):
        k = rows[r]
        acc = q[k]
        rho = here_state[k]
        rho_zl, rho_zu = below_state[k], above_state[k]
        centre, phi_zl, phi_zu = phi[r], phi_below[r], phi_above[r]
        for i in range(lo - 1, hi):
            v = (centre[_u(i + 1)] - centre[_u(i)]) * mask[_u(i)] * mask[_u(i + 1)]
            x_flux[_u(i)] = fx * (max(v, zero) * rho[_u(i)] + min(v, zero) * rho[_u(i + 1)])
        for i in range(lo, hi):
            m = mask[_u(i)]
            v_zl = (centre[_u(i)] - phi_zl[_u(i)]) * mask_below[_u(i)] * m
            v_zu = (phi_zu[_u(i)] - centre[_u(i)]) * m * mask_above[_u(i)]
            v_yl = (centre[_u(i)] - centre[_u(i - width)]) * mask[_u(i - width)] * m
            v_yu = (centre[_u(i + width)] - centre[_u(i)]) * m * mask[_u(i + width)]
            in_z = max(v_zl, zero) * rho_zl[_u(i)] + min(v_zl, zero) * rho[_u(i)]
            out_z = max(v_zu, zero) * rho[_u(i)] + min(v_zu, zero) * rho_zu[_u(i)]
            in_y = max(v_yl, zero) * rho[_u(i - width)] + min(v_yl, zero) * rho[_u(i)]
            out_y = max(v_yu, zero) * rho[_u(i)] + min(v_yu, zero) * rho[_u(i + width)]
            acc[_u(i)] += fz * (in_z - out_z) + fy * (in_y - out_y) + x_flux[_u(i - 1)] - x_flux[_u(i)]

@njit(cache=True, fastmath=True, nogil=True)
def _sweep_plane(u_here, u_below, u_above, channels, rhs, rhs_channels, out, weights, weights_above, scale_constants,
                 weight_constants, fl, par, width, lo, hi, ny):
    """One Jacobi sweep u ← u + ω/(1 + Δt·c)·(rhs − u + Δt·∇·(D∇u)) on one padded plane.

    Diffused class d is channel ``channels[d]`` of the u planes and channel ``rhs_channels[d]`` of
    ``rhs``; the result goes to ``out[d]`` (ghosts refreshed). Per-face weights D/h² (1/day) come
    from the padded weight planes of this plane and the next (``weights[d]``: below, north, east,
    scale), else from ``weight_constants[d]`` (z, y, x) and ``scale_constants[d]``."""
    dt = par[_DT]
    field = fl[_DIFF_FIELD] == 1
    scale_field = fl[_SCALE_FIELD] == 1
    for d in range(out.shape[0]):
        c = channels[d]
        u, u_zl, u_zu = u_here[c], u_below[c], u_above[c]
        r = rhs[rhs_channels[d]]
        o = out[d]
        if field:
            w_zl, w_zu, w_n, w_e = weights[d, 0], weights_above[d, 0], weights[d, 1], weights[d, 2]
            if scale_field:
                s = weights[d, 3]
                for i in range(lo, hi):
                    here = u[_u(i)]
                    div = (w_zl[_u(i)] * (u_zl[_u(i)] - here) + w_zu[_u(i)] * (u_zu[_u(i)] - here)
                           + w_n[_u(i - width)] * (u[_u(i - width)] - here) + w_n[_u(i)] * (u[_u(i + width)] - here)
                           + w_e[_u(i - 1)] * (u[_u(i - 1)] - here) + w_e[_u(i)] * (u[_u(i + 1)] - here))
                    o[_u(i)] = here + s[_u(i)] * (r[_u(i)] - here + dt * div)
            else:
                s0 = scale_constants[d]
                for i in range(lo, hi):
                    here = u[_u(i)]
                    div = (w_zl[_u(i)] * (u_zl[_u(i)] - here) + w_zu[_u(i)] * (u_zu[_u(i)] - here)
                           + w_n[_u(i - width)] * (u[_u(i - width)] - here) + w_n[_u(i)] * (u[_u(i + width)] - here)
                           + w_e[_u(i - 1)] * (u[_u(i - 1)] - here) + w_e[_u(i)] * (u[_u(i + 1)] - here))
                    o[_u(i)] = here + s0 * (r[_u(i)] - here + dt * div)
        else:
            cz, cy, cx = weight_constants[d, 0], weight_constants[d, 1], weight_constants[d, 2]
            if scale_field:
                s = weights[d, 3]
                for i in range(lo, hi):
                    here = u[_u(i)]
                    div = (cz * (u_zl[_u(i)] + u_zu[_u(i)] - 2 * here) + cy * (u[_u(i - width)] + u[_u(i + width)] - 2 * here)
                           + cx * (u[_u(i - 1)] + u[_u(i + 1)] - 2 * here))
                    o[_u(i)] = here + s[_u(i)] * (r[_u(i)] - here + dt * div)
            else:
                s0 = scale_constants[d]
                for i in range(lo, hi):
                    here = u[_u(i)]
                    div = (cz * (u_zl[_u(i)] + u_zu[_u(i)] - 2 * here) + cy * (u[_u(i - width)] + u[_u(i + width)] - 2 * here)
                           + cx * (u[_u(i - 1)] + u[_u(i + 1)] - 2 * here))
                    o[_u(i)] = here + s0 * (r[_u(i)] - here + dt * div)
        _refresh_ghosts(o, ny, width)

@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _finished(q, last, is_diffused, c):
    """Channel c of a finished plane: the last Jacobi sweep for a diffused class, else q."""
    d = is_diffused[c]
    return last[max(d, 0)] if d >= 0 else q[c]

@njit(cache=True, fastmath=True, nogil=True)
def _project_listed(q, last, is_diffused, index, count, lanes, theta, running, reciprocals, p_flat, p_base,
                    channel_stride, stride, width, one, zero):
    """Project the listed cells of a finished plane onto the simplex and write them into p: their
    channel values gathered into compact lanes (rows beyond the class count hold −1e30), θ from the
    sorting network (or the generic sort above 8 classes), p = max(u − θ, 0)."""
    n_channels = q.shape[0]
    for c in range(n_channels):
        src, lane = _finished(q, last, is_diffused, c), lanes[c]
        for j in range(count):
            lane[j] = src[index[j]]
    if n_channels <= _NETWORK_LANES:
        _threshold_network(lanes, theta, count, one, reciprocals)
    else:
        _threshold_generic(lanes, n_channels, theta, running, count, one, reciprocals)
    for j in range(count):
        i = index[j]
        offset = (i // width - 1) * stride + (i % width - 1)
        for c in range(n_channels):
            p_flat[p_base + c * channel_stride + offset] = max(lanes[c, j] - theta[j], zero)

@njit(cache=True, fastmath=True, nogil=True)
def _finish_plane(q, last, is_diffused, mask, p_flat, p_base, channel_stride, stride, dying_flat, dying_base, fl, par, width, lo,
                  hi, ny, nx, tmp, lanes, theta, running, reciprocals, index):
    """Write one finished plane into p: channel c from :func:`_finished` (the last sweep for diffused
    classes, q for the others). The cells that left the simplex (channel sum off 1 by more than the
    slack, or a negative value) inside the domain are then projected — θ as
    :func:`AnatomyDTLib.simplex.simplex_threshold` — the others stay as computed; outside the
    domain every term is masked, so p is unchanged there. The dying channel before the projection
    goes to ``dying_flat`` (the integrator rescales delayed-death cohorts by the projection)."""
    n_channels = q.shape[0]
    dying = fl[_DYING]
    slack, zero, one = par[_SLACK], par[_ZERO], par[_ONE]
    total, smallest, flags = tmp[0], tmp[1], tmp[2]
    first = _finished(q, last, is_diffused, 0)
    for i in range(lo, hi):
        total[_u(i)] = first[_u(i)]
        smallest[_u(i)] = first[_u(i)]
    for c in range(1, n_channels):
        src = _finished(q, last, is_diffused, c)
        for i in range(lo, hi):
            total[_u(i)] += src[_u(i)]
            smallest[_u(i)] = min(smallest[_u(i)], src[_u(i)])
    flagged = zero
    for i in range(lo, hi):
        off = (abs(total[_u(i)] - one) > slack) | (smallest[_u(i)] < zero)
        f = one if (off & (mask[_u(i)] > zero)) else zero
        flags[_u(i)] = f
        flagged += f
    for c in range(n_channels):
        _scatter(_finished(q, last, is_diffused, c), p_flat, p_base + c * channel_stride, stride, ny, nx, width)
    if dying >= 0:
        _scatter(_finished(q, last, is_diffused, dying), dying_flat, dying_base, stride, ny, nx, width)
    if flagged > zero:
        count = 0
        for ly in range(ny):  # box cells only: the ghost columns of the span are not cells
            start = (ly + 1) * width + 1
            for i in range(start, start + nx):
                if flags[_u(i)] > zero:
                    index[count] = i
                    count += 1
        if count > 0:
            _project_listed(q, last, is_diffused, index, count, lanes, theta, running, reciprocals, p_flat, p_base, channel_stride,
                            stride, width, one, zero)

@njit(cache=True, fastmath=True, nogil=True)
def _load_plane(z, p_flat, lower_flat, upper_flat, z0, z1, lower_start, halo, shape, y0, ox, ny, nx, width, state,
                domain, has_domain, mask, chi, cols, has_cross, lo_all, hi_all, phi):
    """Plane z of the step's input into padded planes: the state (ghosts refreshed), the domain
    mask, and the drift potentials Σ_c χ[r, c]·p[cols[c]] (ghosts included)."""
    for c in range(state.shape[0]):
        src, base, stride = _state_source(p_flat, lower_flat, upper_flat, c, z, z0, z1, lower_start, halo, shape, y0,
                                          ox, ny, nx)
        plane = state[c]
        _gather(src, base, stride, ny, nx, width, plane)
        _refresh_ghosts(plane, ny, width)
    if has_domain:
        _gather_grid_plane(domain, z, y0, ox, ny, nx, width, mask)
    if has_cross:
        _potential_plane(state, chi, cols, lo_all, hi_all, phi)

@njit(cache=True, fastmath=True, nogil=True)
def _run_slab(p, z0, z1, lower, upper, box, chi, rows, cols, growth, kappa, domain, clearable, diffused,
              is_diffused, wz, wy, wx, scale, dying_out, fl, par, constants):
    """Advance the output planes [z0, z1) of the box by one step (the pipeline of the module
    docstring of fused.py): explicit part at plane e, sweep s at e − s, output at e − max(m, 1);
    every plane held padded (see the section comment above :func:`_gather`)."""
    bz0, bz1, y0, y1, ox, x1 = box[0], box[1], box[2], box[3], box[4], box[5]
    ny, nx = y1 - y0, x1 - ox
    width = nx + 2
    size = (ny + 2) * width
    lo, hi = width + 1, width * (ny + 1) - 1
    dtype = p.dtype
    n_channels = p.shape[0]
    m = fl[_SWEEPS]
    lag = max(m, 1)
    q_slots = max(lag, 2) + 1
    kd = max(diffused.shape[0], 1)
    has_domain = fl[_HAS_DOMAIN] == 1
    has_cross = rows.shape[0] > 0
    weights_needed = m > 0 and (fl[_DIFF_FIELD] == 1 or fl[_SCALE_FIELD] == 1)
    state_ring = np.empty((3, n_channels, size), dtype=dtype)
    mask_slots = lag + 3 if has_domain else 1
    mask_ring = np.ones((mask_slots, size), dtype=dtype)
    phi_ring = np.empty((3, max(rows.shape[0], 1), size), dtype=dtype)
    q_ring = np.empty((q_slots, n_channels, size), dtype=dtype)
    u_ring = np.empty((lag, 3, kd, size), dtype=dtype)  # u_s of sweep s = 1..m
    w_slots = m + 2 if weights_needed else 1
    weight_ring = np.zeros((w_slots, kd, 4, size if weights_needed else 1), dtype=dtype)  # finite everywhere
    growth_plane = np.full(size, constants[0, 1, 0], dtype=dtype)
    kappa_plane = np.full(size, constants[0, 2, 0], dtype=dtype)
    clear_plane = np.zeros(size, dtype=dtype)
    weight_constants = np.empty((kd, 3), dtype=dtype)
    scale_constants = np.empty(kd, dtype=dtype)
    for d in range(kd):
        for axis in range(3):
            weight_constants[d, axis] = constants[1 + d, axis, 0]
        scale_constants[d] = constants[1 + d, 3, 0]
    identity = np.arange(kd)
    tmp = np.zeros((6, size), dtype=dtype)
    lanes = np.full((max(2 * n_channels, _NETWORK_LANES), size), -1e30, dtype=dtype)  # see _threshold_network
    theta = np.empty(size, dtype=dtype)
    running = np.empty(size, dtype=dtype)
    index = np.empty(size, dtype=np.int64)
    reciprocals = np.empty(max(n_channels, _NETWORK_LANES), dtype=dtype)
    for j in range(reciprocals.shape[0]):
        reciprocals[j] = 1.0 / (j + 1)
    p_flat = p.reshape(p.size)
    lower_flat, upper_flat = lower.reshape(lower.size), upper.reshape(upper.size)
    dying_flat = dying_out.reshape(dying_out.size)
    shape = p.shape
    halo = lower.shape[1]
    lower_start = z0 - halo
    channel_stride = shape[1] * shape[2] * shape[3]
    e_first = max(z0 - m, bz0)
    e_stop = min(z1 + m, bz1)
    for z in range(max(e_first - 1, bz0), min(e_first + 1, bz1)):  # the planes the first explicit plane reads
        _load_plane(z, p_flat, lower_flat, upper_flat, z0, z1, lower_start, halo, shape, y0, ox, ny, nx, width,
                    state_ring[z % 3], domain, has_domain, mask_ring[z % mask_slots], chi, cols, has_cross, 0, size,
                    phi_ring[z % 3])
    for e in range(z0 - m, z1 + lag):
        if e_first <= e < e_stop:
            if e + 1 < bz1:
                z = e + 1
                _load_plane(z, p_flat, lower_flat, upper_flat, z0, z1, lower_start, halo, shape, y0, ox, ny, nx,
                            width, state_ring[z % 3], domain, has_domain, mask_ring[z % mask_slots], chi, cols,
                            has_cross, 0, size, phi_ring[z % 3])
            below, above = max(e - 1, bz0), min(e + 1, bz1 - 1)
            if fl[_GROWTH_FIELD] == 1:
                _gather_grid_plane(growth, e, y0, ox, ny, nx, width, growth_plane)
            if fl[_KAPPA_FIELD] == 1:
                _gather_grid_plane(kappa, e, y0, ox, ny, nx, width, kappa_plane)
            if fl[_HAS_CLEARABLE] == 1:
                _gather_grid_plane(clearable, e, y0, ox, ny, nx, width, clear_plane)
            if weights_needed:
                for d in range(diffused.shape[0]):
                    _gather_face_weights(wz, wy, wx, scale, d, e, bz0, y0, ox, ny, nx, width, fl[_DIFF_FIELD] == 1,
                                         fl[_SCALE_FIELD] == 1, weight_ring[e % w_slots, d])
            q = q_ring[e % q_slots]
            _explicit_plane(state_ring[e % 3], state_ring[below % 3], state_ring[above % 3], phi_ring[e % 3],
                            phi_ring[below % 3], phi_ring[above % 3], mask_ring[e % mask_slots],
                            mask_ring[below % mask_slots], mask_ring[above % mask_slots], q, rows, growth_plane,
                            kappa_plane, clear_plane, fl, par, width, lo, hi, tmp)
            if m > 0:
                for d in range(diffused.shape[0]):  # u_0 = q: its ghosts are read by the first sweep
                    _refresh_ghosts(q[diffused[d]], ny, width)
        for s in range(1, m + 1):
            zs = e - s
            if zs < max(z0 - (m - s), bz0) or zs >= min(z1 + (m - s), bz1):
                continue
            below, above = max(zs - 1, bz0), min(zs + 1, bz1 - 1)
            weights, weights_above = weight_ring[zs % w_slots], weight_ring[above % w_slots]
            if s == 1:  # u_0 = rhs = q, read through the diffused channels
                _sweep_plane(q_ring[zs % q_slots], q_ring[below % q_slots], q_ring[above % q_slots], diffused,
                             q_ring[zs % q_slots], diffused, u_ring[0, zs % 3], weights, weights_above,
                             scale_constants, weight_constants, fl, par, width, lo, hi, ny)
            else:
                _sweep_plane(u_ring[s - 2, zs % 3], u_ring[s - 2, below % 3], u_ring[s - 2, above % 3], identity,
                             q_ring[zs % q_slots], diffused, u_ring[s - 1, zs % 3], weights, weights_above,
                             scale_constants, weight_constants, fl, par, width, lo, hi, ny)
        zf = e - lag
        if z0 <= zf < z1:
            _finish_plane(q_ring[zf % q_slots], u_ring[lag - 1, zf % 3], is_diffused, mask_ring[zf % mask_slots], p_flat, ((zf * shape[2]) + y0) * shape[3] + ox,
                          channel_stride, shape[3], dying_flat, (zf * shape[2] + y0) * shape[3] + ox, fl, par, width,
                          lo, hi, ny, nx, tmp, lanes, theta, running, reciprocals, index)


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
