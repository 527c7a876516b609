"""The numba kernels of the fused no-grad IMEX step; :mod:`AnatomyDTLib.fused` explains the
scheme and is the only caller (it imports this module on first use, so that runs which never
take the fused path do not import numba).

Every stage is a function over one plane of the box (or of a strip of its rows, when the
planes are large: :data:`STRIP_CELLS`), called once per plane, and computes only the plane's
rows that the step can change (``plane_rows``, :meth:`AnatomyDTLib.fused.FusedStep.plane_rows`);
the other rows that a neighbour's stencil reads are copied unchanged (:func:`_run_slab`). The reaction,
the cross-diffusion and the projection run over the plane as one flat line of ny·nx cells
(neighbours across y are the shifted views ±nx, a face-open mask closes the x-faces at row starts);
the explicit part reads its stencils from a ring of compact copies of the input planes. The
Jacobi sweeps keep a loop per row, reading the face weights from arrays that cover a region
around the box (their first voxel's grid index is in ``fl``; ``FusedStep`` packs them there
because short pieces of grid-sized rows read nearly as slowly as whole rows). Flat sweeps were
tried: 1.5 % faster on the brain step, 43 % slower on the dense one, whose constant weights
would have to be spread over whole planes. The earlier layout, every stage a
loop per row of the box with helper calls per row, was 1.74× slower on the brain case's rows of
≈ 90 voxels (``python benchmarks/perf_stages.py --baseline 74645ad``; docs/performance_history.md). Inner
loops index through views, or through unsigned flat indices (the input planes' rows of p), never
``[offset + x]`` with a signed run-time offset: numba's wraparound test on it stops LLVM from
vectorising (benchmarks/numba_wraparound.py). For the same reason a flat loop over a range of
cells that starts past 0 takes unsigned bounds, ``range(_u(a), _u(b))``: with signed ones the
brain step's kernel ran 3.6× slower. Every kernel compiles with numba's ``numpy`` error
model: a division by zero gives inf or nan, as in torch, instead of a zero test per division that
raises, which kept the growth loop scalar (7.7 % of the brain step, A/B). Lines of grid-sized
arrays are rows from the box's first x on (views ``[ox:]``). Scalars reach the kernels in two
small arrays, ``par`` (floats, in the state's dtype so that float32 stays float32) and ``fl``
(int flags); :func:`parameter_array` and :func:`flag_array` fill them by name.

Units: Δt in days, spacing in mm, χ and D in mm²/day, rates in 1/day.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba import uint64 as _u  # unsigned indices: no wraparound test, so the loops vectorise

_NETWORK_LANES = 8  # class counts up to this are projected by the register sorting network

# parameter slots of the kernel's float array (kept in the state's dtype so float32 stays float32)
_DT, _OMEGA, _CHEMO, _CLEAR, _SLACK, _INV_HZ, _INV_HY, _INV_HX, _ZERO, _ONE, _FLOOR = range(11)
# flag slots of the kernel's int array
(_TUMOUR, _DYING, _SINK, _HAS_GROWTH, _GROWTH_FIELD, _KAPPA_FIELD, _HAS_DOMAIN, _HAS_CLEARABLE,
 _DIFF_FIELD, _SCALE_FIELD, _SWEEPS, _THREADS, _REGION_Z0, _REGION_Y0, _REGION_X0, _WATCHED, _STRIP_ROWS) = range(17)
# A slab's planes are cut into strips of rows when a plane of the box has more cells than this: the
# ring buffers of a strip (≈ 100 plane-sized arrays of every stage) then take ≈ 10 MB per thread and
# stay in a 32 MB L3 shared by two cores; whole 240 × 240 planes took ≈ 23 MB per thread.
STRIP_CELLS = 24576



def parameter_array(dtype, *, dt, omega, chemo_fraction, clearance_fraction, slack, inverse_spacing, floor=0.0):
    """``par``: Δt (days), ω, the chemotherapy kill fraction 1 − exp(−c·Δt) of this step, the
    clearance fraction of the dying cells, the simplex slack, 1/h per axis (1/mm), 0, 1 and the
    support floor of the watched channels (see :func:`flag_array`)."""
    values = [0.0] * 11
    values[_FLOOR] = floor
    values[_DT], values[_OMEGA], values[_CHEMO], values[_CLEAR], values[_SLACK] = (
        dt, omega, chemo_fraction, clearance_fraction, slack)
    values[_INV_HZ], values[_INV_HY], values[_INV_HX] = inverse_spacing
    values[_ZERO], values[_ONE] = 0.0, 1.0
    return np.array(values, dtype=dtype)


def flag_array(*, tumour, dying, sink, has_growth, growth_field, kappa_field, has_domain, has_clearable,
               diffusion_field, scale_field, sweeps, threads, region_origin=(0, 0, 0), watched=(), strip_rows=0):
    """``fl``: channel indices (dying −1 when there is none), which coefficients are per-voxel
    fields, the number of Jacobi sweeps and of parallel slabs, and the grid index (z, y, x) of the
    first voxel of the coefficient fields that do not change during a solve (face weights, Jacobi
    scales, growth rate, capacity, domain): they may cover only a region of the grid that contains
    the box (see ``FusedStep``), in the coordinates of the state, which may itself be a packed copy
    of a region of the grid; ``clearable`` and ``dying_out`` cover the same voxels as the state.
    ``watched``: the channels whose written values below the support floor are set to zero and
    whose extent per plane goes to ``extents`` (what the stepper's support search would find next).
    ``strip_rows``: rows per strip of a slab's planes (0: as many as fit ``STRIP_CELLS`` cells)."""
    values = [0] * 17
    values[_STRIP_ROWS] = strip_rows
    if any(c >= 63 for c in watched):
        raise ValueError(f"the kernel's watched-channel mask holds channels 0-62, got {sorted(watched)}")
    values[_WATCHED] = sum(1 << c for c in watched)
    values[_TUMOUR], values[_DYING], values[_SINK] = tumour, dying, sink
    values[_HAS_GROWTH], values[_GROWTH_FIELD], values[_KAPPA_FIELD] = int(has_growth), int(growth_field), int(kappa_field)
    values[_HAS_DOMAIN], values[_HAS_CLEARABLE] = int(has_domain), int(has_clearable)
    values[_DIFF_FIELD], values[_SCALE_FIELD] = int(diffusion_field), int(scale_field)
    values[_SWEEPS], values[_THREADS] = sweeps, threads
    values[_REGION_Z0], values[_REGION_Y0], values[_REGION_X0] = region_origin
    return np.array(values, dtype=np.int64)



@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _load_plane(p, z, z0, z1, lower, lower_start, upper, y0, la, lb, ox, nx, dst, box_y0, strip_y0, strip_halo):
    """dst (C, ny, nx) rows la .. lb = rows y0 + la .. y0 + lb of input plane z (the plane's live
    rows: the others are never read, see :func:`_run_slab`): the slab's own planes from p, its
    neighbours' planes from the copies taken before any slab wrote (they hold the box's rows from
    ``box_y0`` on). In a slab cut into strips of rows, the rows before ``strip_y0`` (this strip's
    halo) were already written by the strip before it: they come from ``strip_halo``, the copy of
    rows strip_y0 − h .. strip_y0 of the slab's planes taken before any strip wrote. Every stencil
    of the explicit part then reads the compact copies (the ring of input planes), one array with
    one layout, and no row needs a function call to find its source."""
    if z < z0 or z >= z1:
        for c in range(dst.shape[0]):
            for ly in range(la, lb):
                out = dst[c, ly]
                row = y0 - box_y0 + ly
                src = lower[c, z - lower_start, row] if z < z0 else upper[c, z - z1, row]
                for x in range(nx):
                    out[x] = src[x]
        return
    # the slab's own planes: read through flat unsigned indices, not a view of p per row (3 % of
    # the brain step, A/B; a view of an array both threads share is reference-counted on one counter)
    flat, row_size = p.reshape(p.size), p.shape[3]
    halo_start = strip_y0 - strip_halo.shape[2]
    for c in range(dst.shape[0]):
        for ly in range(la, lb):
            out = dst[c, ly]
            if y0 + ly < strip_y0:
                src = strip_halo[c, z - z0, y0 + ly - halo_start]
                for x in range(nx):
                    out[x] = src[x]
                continue
            base = _u(((c * p.shape[1] + z) * p.shape[2] + y0 + ly) * row_size + ox)
            for x in range(nx):
                out[x] = flat[base + _u(x)]

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _potential_plane(plane, chi, cols, la, lb, nx, out):
    """out[r] = Σ_c χ[r, c]·p[cols[c]] on rows la .. lb of one input plane (C, ny, nx): the drift
    potential of each row of χ."""
    zero = chi[0, 0] - chi[0, 0]
    for r in range(chi.shape[0]):
        for ly in range(la, lb):
            o = out[r, ly]
            for x in range(nx):
                o[x] = zero
            for c in range(cols.shape[0]):
                w = chi[r, c]
                src = plane[cols[c], ly]
                for x in range(nx):
                    o[x] += w * src[x]

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _gather_plane(field, z, y0, la, lb, ox, nx, out):
    """Rows la .. lb of out (ny·nx, flat) = rows y0 + la .. y0 + lb, from x = ox on, of plane z of a
    (Z, Y, X) field."""
    for ly in range(la, lb):
        src, dst = field[z, y0 + ly, ox:], out[ly * nx:(ly + 1) * nx]
        for x in range(nx):
            dst[x] = src[x]

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _reaction_plane(q, rate, capacity, mask, fl, par, tmp, a, b):
    """Logistic growth and chemotherapy on cells a .. b of one plane of q (C, n cells flat; in
    place), as the torch path. Growth takes the tumour's gain from the tissue classes in proportion
    to their share; outside the domain (mask 0) nothing changes. rate (1/day), capacity and mask
    are flat planes."""
    n_channels = q.shape[0]
    dt, zero, one = par[_DT], par[_ZERO], par[_ONE]
    tumour, dying, sink = fl[_TUMOUR], fl[_DYING], fl[_SINK]
    viable, sink_line = q[tumour], q[sink]
    if fl[_HAS_GROWTH] == 1:
        others, keep, grow, shrink, total = tmp[0], tmp[1], tmp[2], tmp[3], tmp[4]
        for i in range(_u(a), _u(b)):
            others[i] = zero
            total[i] = viable[i]
        for c in range(n_channels):
            line = q[c]
            if c == dying:
                for i in range(_u(a), _u(b)):
                    total[i] += line[i]
            elif c != tumour:
                for i in range(_u(a), _u(b)):
                    others[i] += line[i]  # the tissue share available to be displaced
        for i in range(_u(a), _u(b)):
            gain = (one - total[i] / capacity[i]) * viable[i] * rate[i] * dt * mask[i]
            shrink[i] = min(gain, zero)
            g = min(max(gain, zero), others[i])
            grow[i] = g
            keep[i] = one - g / others[i] if others[i] > zero else one
        for c in range(n_channels):
            if c != tumour and c != dying:
                line = q[c]
                for i in range(_u(a), _u(b)):
                    line[i] *= keep[i]
        for i in range(_u(a), _u(b)):
            viable[i] += grow[i] + shrink[i]
            sink_line[i] -= shrink[i]
    chemo = par[_CHEMO]
    if chemo > zero:
        for i in range(_u(a), _u(b)):
            killed = viable[i] * chemo * mask[i]
            viable[i] -= killed
            sink_line[i] += killed

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _clearance_plane(q, e, clearable, fl, par, y0, ra, rb, ox, nx):
    """Clearance of the dying cells whose delay has passed, on rows ra .. rb of plane e of q (C, n
    flat; in place)."""
    dying_line, sink_line, fraction = q[fl[_DYING]], q[fl[_SINK]], par[_CLEAR]
    for ly in range(ra, rb):
        cl = clearable[e, y0 + ly, ox:]
        dying_row, sink_row = dying_line[ly * nx:(ly + 1) * nx], sink_line[ly * nx:(ly + 1) * nx]
        for x in range(nx):
            cleared = cl[x] * fraction
            dying_row[x] -= cleared
            sink_row[x] += cleared

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _cross_diffusion_plane(p_flat, phi_flat, mask_ring, open_x, e, q, rows, fl, par, bz0, bz1, nx, tmp, pushing,
                           chi, a, b):
    """q += Δt·(cross-diffusion tendency at p^n) on cells a .. b (whole rows) of plane e, which
    reads the rows next to them: Σ_axes (flux in through the lower face
    − out through the upper) / h, flux = upwind(Δφ/h) of each pushed class. When one class
    (``pushing`` ≥ 0) drives every row, as the brain's mass effect does, Δφ of row r is
    χ[r, 0]·Δp_pushing: read from the input planes, with no potential per row.

    Every array is a flat plane of n = ny·nx cells (rings: [slot, channel, cell]), so each sum is
    one long loop over shifted views: x-faces between cells i − 1 and i (closed where a row
    starts: ``open_x``), y-faces between i − nx and i, z-faces to the planes below and above. No
    face crosses the box border (at the first and last plane the neighbour is the plane itself:
    Δφ = 0), and a face with a cell outside the domain (mask 0) carries nothing."""
    dt, zero = par[_DT], par[_ZERO]
    fz = dt * par[_INV_HZ] * par[_INV_HZ]
    fy = dt * par[_INV_HY] * par[_INV_HY]
    fx = dt * par[_INV_HX] * par[_INV_HX]
    n = q.shape[1]
    here_slot, below_slot, above_slot = e % 3, max(e - 1, bz0) % 3, min(e + 1, bz1 - 1) % 3
    m, m_zl, m_zu = mask_ring[here_slot], mask_ring[below_slot], mask_ring[above_slot]
    x_flux, y_flux = tmp[0], tmp[1]  # x_flux[i]: face between i - 1 and i; y_flux[i]: between i - nx and i
    for i in range(nx):
        y_flux[i] = zero
        y_flux[n + i] = zero
    x_flux[0] = zero
    x_flux[n] = zero
    x_inner, y_inner = x_flux[1:n], y_flux[nx:n]
    x_next, y_next = x_flux[1:n + 1], y_flux[nx:n + nx]
    # the faces cells a .. b need: x-faces i | i + 1 from the row start before a (closed) to the one
    # at b (closed), y-faces i | i + nx from row a - 1 to the face below row b
    xa, xb = max(a - 1, 0), min(b, n - 1)
    ya, yb = max(a - nx, 0), min(b, n - nx)
    # which faces carry flux, once per plane: x-faces not at a row start, and with a domain only the
    # faces whose two cells are inside it (without one, the y- and z-faces need no factor at all)
    has_domain = fl[_HAS_DOMAIN] == 1
    face_x = open_x[1:]
    face_y, face_zl, face_zu = tmp[2, :n - nx], tmp[3, :n], tmp[4, :n]
    if has_domain:
        face_x = tmp[5, :n - 1]
        m_left, m_right, open_right = m[:n - 1], m[1:], open_x[1:]
        for i in range(_u(xa), _u(xb)):
            face_x[i] = open_right[i] * m_left[i] * m_right[i]
        m_south, m_north = m[:n - nx], m[nx:]
        for i in range(_u(ya), _u(yb)):
            face_y[i] = m_south[i] * m_north[i]
        for i in range(_u(a), _u(b)):
            face_zl[i] = m_zl[i] * m[i]
            face_zu[i] = m[i] * m_zu[i]
    for r in range(rows.shape[0]):
        k = rows[r]
        acc = q[k]
        here, rho_zl, rho_zu = p_flat[here_slot, k], p_flat[below_slot, k], p_flat[above_slot, k]
        if pushing >= 0:  # Δφ = χ[r, 0]·Δp_pushing
            centre, phi_zl, phi_zu = p_flat[here_slot, pushing], p_flat[below_slot, pushing], p_flat[above_slot, pushing]
            w = chi[r, 0]
        else:
            centre, phi_zl, phi_zu = phi_flat[here_slot, r], phi_flat[below_slot, r], phi_flat[above_slot, r]
            w = par[_ONE]
        c_left, c_right, h_left, h_right = centre[:n - 1], centre[1:], here[:n - 1], here[1:]
        for i in range(_u(xa), _u(xb)):
            v = (c_right[i] - c_left[i]) * (w * face_x[i])
            x_inner[i] = fx * (max(v, zero) * h_left[i] + min(v, zero) * h_right[i])
        c_south, c_north, h_south, h_north = centre[:n - nx], centre[nx:], here[:n - nx], here[nx:]
        if has_domain:
            for i in range(_u(ya), _u(yb)):
                v = (c_north[i] - c_south[i]) * (w * face_y[i])
                y_inner[i] = fy * (max(v, zero) * h_south[i] + min(v, zero) * h_north[i])
            for i in range(_u(a), _u(b)):
                v_zl = (centre[i] - phi_zl[i]) * (w * face_zl[i])
                v_zu = (phi_zu[i] - centre[i]) * (w * face_zu[i])
                in_z = max(v_zl, zero) * rho_zl[i] + min(v_zl, zero) * here[i]
                out_z = max(v_zu, zero) * here[i] + min(v_zu, zero) * rho_zu[i]
                acc[i] += fz * (in_z - out_z) + (y_flux[i] - y_next[i]) + (x_flux[i] - x_next[i])
        else:
            for i in range(_u(ya), _u(yb)):
                v = (c_north[i] - c_south[i]) * w
                y_inner[i] = fy * (max(v, zero) * h_south[i] + min(v, zero) * h_north[i])
            for i in range(_u(a), _u(b)):
                v_zl = (centre[i] - phi_zl[i]) * w
                v_zu = (phi_zu[i] - centre[i]) * w
                in_z = max(v_zl, zero) * rho_zl[i] + min(v_zl, zero) * here[i]
                out_z = max(v_zu, zero) * here[i] + min(v_zu, zero) * rho_zu[i]
                acc[i] += fz * (in_z - out_z) + (y_flux[i] - y_next[i]) + (x_flux[i] - x_next[i])

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _explicit_plane(p_flat, phi_flat, mask_ring, open_x, coefficients, e, q, rows, growth, kappa, clearable, fl,
                    par, bz0, bz1, y0, ox, nx, tmp, pushing, chi, la, lb, ta, tb, ca, cb):
    """q = reaction(p^n) + Δt·(cross-diffusion tendency at p^n) on plane e of the box (q: C × n
    flat): q = p^n on the plane's live rows la .. lb, the reaction on rows ta .. tb, the
    cross-diffusion on rows ca .. cb (elsewhere each term is zero, see :func:`_slab_rows`). Each
    stage runs over the rows as one flat line, so function calls happen per plane, never per
    row. ``coefficients`` holds the flat planes of the growth rate and the capacity: filled once
    when they are constants, gathered here when they are per-voxel fields."""
    plane = p_flat[e % 3]
    for c in range(q.shape[0]):
        src, dst = plane[c], q[c]
        for i in range(_u(la * nx), _u(lb * nx)):
            dst[i] = src[i]
    if tb > ta:
        oz, oy, ox0 = fl[_REGION_Z0], fl[_REGION_Y0], fl[_REGION_X0]  # growth and kappa cover a region from there
        if fl[_HAS_GROWTH] == 1 and fl[_GROWTH_FIELD] == 1:
            _gather_plane(growth, e - oz, y0 - oy, ta, tb, ox - ox0, nx, coefficients[0])
        if fl[_HAS_GROWTH] == 1 and fl[_KAPPA_FIELD] == 1:
            _gather_plane(kappa, e - oz, y0 - oy, ta, tb, ox - ox0, nx, coefficients[1])
        _reaction_plane(q, coefficients[0], coefficients[1], mask_ring[e % 3], fl, par, tmp, ta * nx, tb * nx)
        if fl[_HAS_CLEARABLE] == 1:
            _clearance_plane(q, e, clearable, fl, par, y0, ta, tb, ox, nx)
    if rows.shape[0] > 0 and cb > ca:
        _cross_diffusion_plane(p_flat, phi_flat, mask_ring, open_x, e, q, rows, fl, par, bz0, bz1, nx, tmp, pushing,
                               chi, ca * nx, cb * nx)

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _sweep_plane(z, u_ring, u_slots, channels, rhs, rhs_channels, out, wz, wy, wx, scale, fl, par, bz0, bz1,
                 y0, y1, ox, nx, constants, lap, ra, rb):
    """One Jacobi sweep u ← u + ω/(1 + Δt·c)·(rhs − u + Δt·∇·(D∇u)) on rows ra .. rb (local to y0)
    of plane z of the box (on the plane's other live rows nothing changes: :func:`_copy_rows`).

    Diffused class d is channel ``channels[d]`` of the planes ``u_ring[plane % u_slots]`` and
    channel ``rhs_channels[d]`` of ``rhs``; the result goes to ``out[d]``. Faces across the box
    border carry no flux: the box holds every non-zero value of the diffused classes plus a
    margin of m + 1 voxels. Face weights are D/h² (1/day) on faces (z-, y-, x-faces arrays), which
    like ``scale`` start at the grid index (fl[_REGION_Z0], fl[_REGION_Y0], fl[_REGION_X0])."""
    dt = par[_DT]
    oz, oy, wx0 = fl[_REGION_Z0], fl[_REGION_Y0], ox - fl[_REGION_X0]
    field = fl[_DIFF_FIELD] == 1
    scale_field = fl[_SCALE_FIELD] == 1
    u_here = u_ring[z % u_slots]
    # at the box border a face's neighbour is the cell itself: zero difference, no flux
    below, above = max(z - 1, bz0), min(z + 1, bz1 - 1)
    u_below, u_above = u_ring[below % u_slots], u_ring[above % u_slots]
    zero = par[_ZERO]
    for d in range(out.shape[0]):
        c = channels[d]
        for y in range(y0, y1):  # every row, skipping those outside ra .. rb: with the loop bounded to
            ly = y - y0             # them LLVM compiled the sweep 3-5 % slower on the dense case (A/B)
            if ly < ra or ly >= rb:
                continue
            south, north = max(y - 1, y0), min(y + 1, y1 - 1)
            u = u_here[c, ly]
            u_zl, u_zu = u_below[c, ly], u_above[c, ly]
            u_yl, u_yu = u_here[c, south - y0], u_here[c, north - y0]
            # per-face weights where they vary, else the class's constant row (no call per row);
            # a face across the box border gets any weight: its difference is zero
            w_zl = wz[d, z - 1 - oz, y - oy, wx0:] if field and z > bz0 else constants[1 + d, 0]
            w_zu = wz[d, z - oz, y - oy, wx0:] if field and z < bz1 - 1 else constants[1 + d, 0]
            w_yl = wy[d, z - oz, y - 1 - oy, wx0:] if field and y > y0 else constants[1 + d, 1]
            w_yu = wy[d, z - oz, y - oy, wx0:] if field and y < y1 - 1 else constants[1 + d, 1]
            w_x = wx[d, z - oz, y - oy, wx0:] if field and nx > 1 else constants[1 + d, 2]
            lap[0] = zero  # lap[i] = flow through the face left of cell i; lap[0] = lap[nx] = 0
            lap[nx] = zero
            for x in range(nx - 1):
                lap[x + 1] = w_x[x] * (u[x + 1] - u[x])
            s = scale[d, z - oz, y - oy, wx0:] if scale_field else constants[1 + d, 3]
            o = out[d, ly]
            r = rhs[rhs_channels[d], ly]
            for x in range(nx):
                div = (w_zl[x] * (u_zl[x] - u[x]) + w_zu[x] * (u_zu[x] - u[x]) + w_yl[x] * (u_yl[x] - u[x])
                       + w_yu[x] * (u_yu[x] - u[x]) + lap[x + 1] - lap[x])
                o[x] = u[x] + s[x] * (r[x] - u[x] + dt * div)

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _copy_rows(u_plane, channels, out, la, ra, rb, lb, nx):
    """out[d] = channel ``channels[d]`` of ``u_plane`` on the live rows la .. lb that a sweep does not
    compute (outside ra .. rb): the step changes nothing there, and the next sweep reads them."""
    for d in range(out.shape[0]):
        c = channels[d]
        for ly in range(la, lb):
            if ly < ra or ly >= rb:
                src, dst = u_plane[c, ly], out[d, ly]
                for x in range(nx):
                    dst[x] = src[x]

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy", inline="always")
def _in_support(value, floor, zero):
    """Whether a value of a watched class counts as support: non-zero and of magnitude at least the
    support floor (floor 0: every non-zero value). Both the step's write-back and the separate
    floor-and-bound pass decide with this, so their boxes agree."""
    return abs(value) >= floor and value != zero

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy", inline="always")
def _exchange(a, b):
    """Compare-exchange of a sorting network: (larger, smaller)."""
    return max(a, b), min(a, b)

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy", inline="always")
def _threshold_candidate(running, theta, u_j, reciprocal, one):
    """One step j of the threshold search: running sum of the sorted values, c_j, and θ = c_j
    if u_j > c_j (``reciprocal`` = 1/j)."""
    running = running + u_j
    c_j = (running - one) * reciprocal
    return running, (c_j if u_j > c_j else theta)

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _threshold_network(l0, l1, l2, l3, l4, l5, l6, l7, theta, start, stop, one, reciprocals):
    """θ of the simplex projection for up to 8 classes per voxel (the flat planes l0 … l7): the
    values sorted in registers by Batcher's 19-comparator network (branch-free, so the x loop
    vectorises), then θ = c_ρ with c_j = (Σ_{i<=j} u_i − 1)/j and ρ the last j with u_j > c_j.
    Planes beyond the class count hold −1e30: they sort last and never satisfy u_j > c_j."""
    r2, r3, r4, r5 = reciprocals[1], reciprocals[2], reciprocals[3], reciprocals[4]
    r6, r7, r8 = reciprocals[5], reciprocals[6], reciprocals[7]
    for x in range(_u(start), _u(stop)):
        v0, v1, v2, v3 = l0[x], l1[x], l2[x], l3[x]
        v4, v5, v6, v7 = l4[x], l5[x], l6[x], l7[x]
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

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _threshold_generic(lanes, n_channels, theta, running, start, stop, one, reciprocals):
    """θ of the simplex projection for any class count (odd-even transposition sort of a copy),
    on cells start .. stop."""
    order = lanes[n_channels:2 * n_channels]
    for c in range(n_channels):
        for x in range(_u(start), _u(stop)):
            order[c, x] = lanes[c, x]
    for rnd in range(n_channels):
        for i in range(rnd % 2, n_channels - 1, 2):
            a, b = order[i], order[i + 1]
            for x in range(_u(start), _u(stop)):
                hi = max(a[x], b[x])
                lo = min(a[x], b[x])
                a[x] = hi
                b[x] = lo
    for x in range(_u(start), _u(stop)):
        running[x] = order[0, x]
        theta[x] = order[0, x] - one
    for j in range(1, n_channels):
        u_j = order[j]
        count = reciprocals[j]  # 1 / (j + 1) in the state's dtype
        for x in range(_u(start), _u(stop)):
            running[x] += u_j[x]
            c_j = (running[x] - one) * count
            theta[x] = c_j if u_j[x] > c_j else theta[x]

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy", inline="always")
def _lane(c, q, u_last, is_diffused, pad):
    """Channel c of a plane after the sweeps (flat): the last sweep's values for a diffused class,
    q's for the others, and ``pad`` (−1e30) beyond the class count (see :func:`_threshold_network`)."""
    if c >= q.shape[0]:
        return pad
    d = is_diffused[c]
    return u_last[d] if d >= 0 else q[c]

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _finish_plane(z, q, u_last, p, dying_out, is_diffused, domain, fl, par, y0, ox, nx, lanes, pad, work,
                  reciprocals, extents, write_from, write_to, first_strip, ra, rb):
    """Write the rows ra .. rb that the step computed, as far as they lie in ``write_from`` ..
    ``write_to`` (local to y0: a strip's own rows, not its halo), of plane z back into p (its other
    rows do not change): diffused classes from the last sweep, the others from q (both
    flat planes: channel × cell). The voxels that left the simplex (channel sum off 1 by more than
    the slack, or a negative value) are projected — θ from a sorting network, as :func:`AnatomyDTLib.simplex.simplex_threshold`
    — the others are written as computed; outside the domain nothing changes."""
    n_channels = q.shape[0]
    dying = fl[_DYING]
    slack, zero, one = par[_SLACK], par[_ZERO], par[_ONE]
    has_domain = fl[_HAS_DOMAIN] == 1
    a, b = ra * nx, rb * nx  # the computed rows' cells, flat: every stage but the last write is one long loop
    w0, w1 = max(ra, write_from), min(rb, write_to)  # the rows written
    total, smallest, theta, running, project = work[0], work[1], work[2], work[3], work[4]
    if dying >= 0:  # the integrator rescales delayed-death cohorts by the projection
        dying_lane = _lane(dying, q, u_last, is_diffused, pad)
        for ly in range(w0, w1):
            out, row = dying_out[z, y0 + ly, ox:], dying_lane[ly * nx:(ly + 1) * nx]
            for x in range(nx):
                out[x] = row[x]
    first = _lane(0, q, u_last, is_diffused, pad)
    for i in range(_u(a), _u(b)):
        total[i] = first[i]
        smallest[i] = first[i]
    for c in range(1, n_channels):
        lane = _lane(c, q, u_last, is_diffused, pad)
        for i in range(_u(a), _u(b)):
            total[i] += lane[i]
            smallest[i] = min(smallest[i], lane[i])
    if n_channels <= _NETWORK_LANES:  # each class read where it is: no copy into one array
        _threshold_network(_lane(0, q, u_last, is_diffused, pad), _lane(1, q, u_last, is_diffused, pad),
                           _lane(2, q, u_last, is_diffused, pad), _lane(3, q, u_last, is_diffused, pad),
                           _lane(4, q, u_last, is_diffused, pad), _lane(5, q, u_last, is_diffused, pad),
                           _lane(6, q, u_last, is_diffused, pad), _lane(7, q, u_last, is_diffused, pad),
                           theta, a, b, one, reciprocals)
    else:  # copied into one array, sorted there
        for c in range(n_channels):
            src, lane = _lane(c, q, u_last, is_diffused, pad), lanes[c]
            for i in range(_u(a), _u(b)):
                lane[i] = src[i]
        _threshold_generic(lanes, n_channels, theta, running, a, b, one, reciprocals)
    for i in range(_u(a), _u(b)):  # project: 1 where the voxel left the simplex, else 0
        off = abs(total[i] - one) > slack or smallest[i] < zero
        project[i] = one if off else zero
    if has_domain:  # ... and only inside the domain
        for ly in range(ra, rb):
            mask = domain[z - fl[_REGION_Z0], y0 + ly - fl[_REGION_Y0], ox - fl[_REGION_X0]:]
            row = project[ly * nx:(ly + 1) * nx]
            for x in range(nx):
                row[x] = row[x] if mask[x] > zero else zero
    # Outside the domain every term is masked, so the lanes equal p there exactly: writing
    # them unprojected leaves p unchanged. The blend is exact for project in {0, 1}.
    floor = par[_FLOOR]
    if fl[_WATCHED] != 0 and first_strip:  # plane z's extents start empty: no row (y_hi = -1), x_lo past the last x
        for c in range(n_channels):
            extents[c, z, 0], extents[c, z, 1], extents[c, z, 2], extents[c, z, 3] = 0, -1, p.shape[3], -1
    for c in range(n_channels):
        lane = _lane(c, q, u_last, is_diffused, pad)
        watched = (fl[_WATCHED] >> c) & 1 == 1
        for ly in range(w0, w1):
            dst, offset = p[c, z, y0 + ly, ox:], ly * nx
            row, row_theta, row_project = lane[offset:offset + nx], theta[offset:offset + nx], project[offset:offset + nx]
            if not watched:
                for x in range(nx):
                    dst[x] = row_project[x] * max(row[x] - row_theta[x], zero) + (one - row_project[x]) * row[x]
                continue
            # a watched channel: values below the support floor become zero, and the row's non-zero
            # extent joins the plane's (the stepper's support search, done while the row is in cache)
            first, last = nx, -1
            for x in range(nx):
                v = row_project[x] * max(row[x] - row_theta[x], zero) + (one - row_project[x]) * row[x]
                keep = _in_support(v, floor, zero)
                dst[x] = v if keep else zero
                first = min(first, x if keep else nx)
                last = max(last, x if keep else -1)
            if last >= 0:
                extent = extents[c, z]
                if extent[1] < 0:
                    extent[0] = y0 + ly
                extent[1] = y0 + ly
                extent[2] = min(extent[2], ox + first)
                extent[3] = max(extent[3], ox + last)

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _clipped(first, stop, lo, hi):
    """(first, stop) clipped to lo .. hi; an empty range stays empty (first = stop)."""
    first = min(max(first, lo), hi)
    return first, max(min(stop, hi), first)

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _slab_rows(plane_rows, bz0, bz1, y0, y1):
    """Per plane of the box (index z − bz0), local to y0 and inside the strip's rows y0 .. y1:
    (ra, rb), the rows the step computes (``plane_rows[:, 0:2]``; outside them nothing changes);
    (la, lb), the plane's live rows, the ones any stage reads: the computed rows of the plane and of
    its two neighbours, one row further; (ta, tb), the rows where the reaction acts: the support's
    own rows (``plane_rows[:, 2:4]``: the watched classes, the tumour's among them); and (ca, cb),
    the rows where cross-diffusion acts: one face from the support (its rows on this plane and
    the two next to it, one row further; a pushing class is watched). A stage's array holds valid
    values on the live rows, the computed ones as computed, the others copied unchanged (see
    :func:`_run_slab`)."""
    n_planes, ny = bz1 - bz0, y1 - y0
    rows = np.zeros((n_planes, 8), dtype=np.int64)
    for i in range(n_planes):
        rows[i, 0], rows[i, 1] = _clipped(plane_rows[bz0 + i, 0] - y0, plane_rows[bz0 + i, 1] - y0, 0, ny)
    for i in range(n_planes):
        ra, rb = rows[i, 0], rows[i, 1]
        lo, hi, cross_lo, cross_hi = ny, 0, ny, 0
        for j in range(max(i - 1, 0), min(i + 2, n_planes)):
            if rows[j, 1] > rows[j, 0]:
                lo = min(lo, rows[j, 0] - 1)
                hi = max(hi, rows[j, 1] + 1)
            first, stop = plane_rows[bz0 + j, 2] - y0, plane_rows[bz0 + j, 3] - y0
            if stop > first:
                cross_lo = min(cross_lo, first - 1)
                cross_hi = max(cross_hi, stop + 1)
        rows[i, 2], rows[i, 3] = _clipped(lo, hi, 0, ny) if hi > lo else (0, 0)
        rows[i, 4], rows[i, 5] = _clipped(plane_rows[bz0 + i, 2] - y0, plane_rows[bz0 + i, 3] - y0, ra, rb)
        rows[i, 6], rows[i, 7] = _clipped(cross_lo, cross_hi, ra, rb) if cross_hi > cross_lo else (ra, ra)
    return rows

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _run_slab(p, z0, z1, lower, upper, box, strip_y0, strip_y1, strip_halo, chi, rows, cols, growth, kappa, domain,
              clearable, diffused, is_diffused, wz, wy, wx, scale, dying_out, fl, par, constants, extents, plane_rows):
    """Advance rows [strip_y0, strip_y1) of the output planes [z0, z1) of the box by one step (the
    pipeline of the module docstring): explicit part at plane e, sweep s at e - s, output at
    e - max(m, 1). The strip is computed with m + 1 rows of halo on each side inside the box
    (faces across the computed rows' border carry nothing, which reaches m + 1 rows in: the
    explicit part and the m sweeps each reach one row further), and only its own rows are written.

    On each plane only the rows ``plane_rows`` gives are computed (:func:`_slab_rows`): the step
    changes nothing on the others, so there every stage's value is the input's. The stages copy it
    onto the plane's live rows that they do not compute (the input plane, q, each sweep but the
    last), because the neighbouring planes' stencils read them."""
    bz0, bz1, box_y0, box_y1, ox, x1 = box[0], box[1], box[2], box[3], box[4], box[5]
    halo_rows = fl[_SWEEPS] + 1
    y0, y1 = max(box_y0, strip_y0 - halo_rows), min(box_y1, strip_y1 + halo_rows)
    ny, nx = y1 - y0, x1 - ox
    n_channels = p.shape[0]
    m = fl[_SWEEPS]
    lag = max(m, 1)
    q_slots = max(lag, 2) + 1
    kd = max(diffused.shape[0], 1)
    p_ring = np.empty((3, n_channels, ny, nx), dtype=p.dtype)  # input planes e - 1, e, e + 1
    q_ring = np.empty((q_slots, n_channels, ny, nx), dtype=p.dtype)
    u_ring = np.empty((lag, 3, kd, ny, nx), dtype=p.dtype)  # u_s of sweep s = 1..m
    identity = np.arange(kd)
    tmp = np.zeros((6, nx + 1), dtype=p.dtype)
    lanes = np.empty((2 * n_channels if n_channels > _NETWORK_LANES else 0, ny * nx), dtype=p.dtype)  # see _finish_plane
    pad = np.full(ny * nx, -1e30, dtype=p.dtype)  # the sorting network's lanes beyond the class count
    work = np.empty((5, ny * nx), dtype=p.dtype)
    reciprocals = np.empty(max(n_channels, _NETWORK_LANES), dtype=p.dtype)
    for j in range(reciprocals.shape[0]):
        reciprocals[j] = 1.0 / (j + 1)
    lower_start = z0 - lower.shape[1]
    e_first = max(z0 - m, bz0)
    e_stop = min(z1 + m, bz1)
    pushing = cols[0] if cols.shape[0] == 1 else -1  # one class drives every row: Δφ from its planes
    has_cross = rows.shape[0] > 0 and pushing < 0  # otherwise each row's potential is needed
    phi_ring = np.empty((3, rows.shape[0] if has_cross else 1, ny, nx), dtype=p.dtype)  # potentials, per row of χ
    # flat views of the rings ([slot, channel, cell], n = ny·nx cells per plane) and per-plane work arrays
    n = ny * nx
    p_flat = p_ring.reshape((3, n_channels, n))
    phi_flat = phi_ring.reshape((3, phi_ring.shape[1], n))
    q_flat = q_ring.reshape((q_slots, n_channels, n))
    u_flat = u_ring.reshape((lag, 3, kd, n))
    plane_tmp = np.empty((6, n + nx), dtype=p.dtype)
    mask_ring = np.ones((3, n), dtype=p.dtype)  # the domain on the input planes (1 everywhere without one)
    open_x = np.ones(n, dtype=p.dtype)  # 0 at the x-face left of each row's first cell: the box border
    for ly in range(ny):
        open_x[ly * nx] = 0
    coefficients = np.empty((2, n), dtype=p.dtype)  # growth rate and capacity on the current plane
    coefficients[0, :] = constants[0, 1, 0]
    coefficients[1, :] = constants[0, 2, 0]
    has_domain = fl[_HAS_DOMAIN] == 1
    oz, oy, ox0 = fl[_REGION_Z0], fl[_REGION_Y0], fl[_REGION_X0]  # the domain covers a region from there
    live = _slab_rows(plane_rows, bz0, bz1, y0, y1)  # per plane: computed rows ra, rb; live rows la, lb
    # the input planes (and their potentials) the first explicit plane needs: e_first - 1 and e_first
    for z in range(max(e_first - 1, bz0), min(e_first + 1, bz1)):
        la, lb = live[z - bz0, 2], live[z - bz0, 3]
        _load_plane(p, z, z0, z1, lower, lower_start, upper, y0, la, lb, ox, nx, p_ring[z % 3], box_y0, strip_y0,
                    strip_halo)
        if has_domain:
            _gather_plane(domain, z - oz, y0 - oy, la, lb, ox - ox0, nx, mask_ring[z % 3])
        if has_cross:
            _potential_plane(p_ring[z % 3], chi, cols, la, lb, nx, phi_ring[z % 3])
    for e in range(z0 - m, z1 + lag):
        if e_first <= e < e_stop:
            if e + 1 < bz1:  # the plane above e joins the ring (it replaces e - 2, no longer read)
                la, lb = live[e + 1 - bz0, 2], live[e + 1 - bz0, 3]
                _load_plane(p, e + 1, z0, z1, lower, lower_start, upper, y0, la, lb, ox, nx, p_ring[(e + 1) % 3],
                            box_y0, strip_y0, strip_halo)
                if has_domain:
                    _gather_plane(domain, e + 1 - oz, y0 - oy, la, lb, ox - ox0, nx, mask_ring[(e + 1) % 3])
                if has_cross:
                    _potential_plane(p_ring[(e + 1) % 3], chi, cols, la, lb, nx, phi_ring[(e + 1) % 3])
            r = live[e - bz0]
            _explicit_plane(p_flat, phi_flat, mask_ring, open_x, coefficients, e, q_flat[e % q_slots], rows, growth,
                            kappa, clearable, fl, par, bz0, bz1, y0, ox, nx, plane_tmp, pushing, chi, r[2], r[3],
                            r[4], r[5], r[6], r[7])
        for s in range(1, m + 1):
            zs = e - s
            if zs < max(z0 - (m - s), bz0) or zs >= min(z1 + (m - s), bz1):
                continue
            r = live[zs - bz0]
            if s == 1:  # u_0 = rhs = q, read through the diffused channels
                _sweep_plane(zs, q_ring, q_slots, diffused, q_ring[zs % q_slots], diffused, u_ring[0, zs % 3],
                             wz, wy, wx, scale, fl, par, bz0, bz1, y0, y1, ox, nx, constants, tmp[0], r[0], r[1])
            else:
                _sweep_plane(zs, u_ring[s - 2], 3, identity, q_ring[zs % q_slots], diffused,
                             u_ring[s - 1, zs % 3], wz, wy, wx, scale, fl, par, bz0, bz1, y0, y1, ox, nx,
                             constants, tmp[0], r[0], r[1])
            if s < m and (r[2] < r[0] or r[1] < r[3]):  # the next sweep reads the live rows not computed
                if s == 1:
                    _copy_rows(q_ring[zs % q_slots], diffused, u_ring[0, zs % 3], r[2], r[0], r[1], r[3], nx)
                else:
                    _copy_rows(u_ring[s - 2, zs % 3], identity, u_ring[s - 1, zs % 3], r[2], r[0], r[1], r[3], nx)
        zf = e - lag
        if z0 <= zf < z1:
            r = live[zf - bz0]
            _finish_plane(zf, q_flat[zf % q_slots], u_flat[lag - 1, zf % 3], p, dying_out, is_diffused, domain, fl,
                          par, y0, ox, nx, lanes, pad, work, reciprocals, extents, strip_y0 - y0, strip_y1 - y0,
                          strip_y0 == box_y0, r[0], r[1])

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy", parallel=True)
def _fused_step(p, box, chi, rows, cols, growth, kappa, domain, clearable, diffused, is_diffused, wz, wy, wx,
                scale, dying_out, fl, par, constants, extents, plane_rows):
    """One IMEX step of a (C, Z, Y, X) state, in place, on ``box`` = (z0, z1, y0, y1, x0, x1):
    one slab of planes per thread, each with copies of the input planes it reads beyond its own
    range (taken before any slab writes). For each watched channel (``fl``) and plane z of the
    box, ``extents[c, z]`` receives (y_lo, y_hi, x_lo, x_hi) of its non-zero voxels after the
    support floor (y_hi −1: none), in grid indices, inclusive. A slab whose planes have more than
    ``STRIP_CELLS`` cells is advanced in strips of rows, one after the other, each with m + 1 rows
    of halo; the halo rows a strip reads from the strip before it are copied before either writes."""
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
    ny = y1 - y0
    strip_rows = fl[_STRIP_ROWS] if fl[_STRIP_ROWS] > 0 else max(1, STRIP_CELLS // max(1, x1 - x0))
    strips = max(1, -(-ny // strip_rows))
    for i in prange(slabs):
        z0, z1 = starts[i], starts[i + 1]
        # the halo rows of every strip but the first, copied before any strip of this slab writes
        halos = np.empty((max(strips - 1, 1), n_channels, z1 - z0, halo, x1 - x0), dtype=p.dtype)
        for k in range(1, strips):
            first_row = y0 + (ny * k) // strips
            for h in range(halo):
                row = first_row - halo + h
                if row >= y0:
                    halos[k - 1, :, :, h] = p[:, z0:z1, row, x0:x1]
        for k in range(strips):
            _run_slab(p, z0, z1, lowers[i], uppers[i], box, y0 + (ny * k) // strips, y0 + (ny * (k + 1)) // strips,
                      halos[max(k - 1, 0)], chi, rows, cols, growth, kappa, domain, clearable, diffused, is_diffused,
                      wz, wy, wx, scale, dying_out, fl, par, constants, extents, plane_rows)


@njit(cache=True, nogil=True)
def _rows_to_compute(support_rows, z0, z1, y0, y1, reach, oz, oy, out):
    """``FusedStep.plane_rows``' arithmetic: for each plane z of z0 .. z1 (grid indices), the rows
    within ``reach`` faces of the rows of ``support_rows`` (grid planes × (first, stop), (0, 0):
    none): those of plane z ± d grown by reach − d rows, d = 0 .. reach, from the first such row
    to the last, clipped to y0 .. y1 (none near: the empty range (y1, y1)), to out[z − oz, 0:2];
    and the plane's own support rows clipped to y0 .. y1 to out[z − oz, 2:4]; minus oy (the
    state's indices)."""
    n = support_rows.shape[0]
    for z in range(z0, z1):
        lo, hi = 0, -1  # hi < 0: no support on the planes within reach
        for k in range(max(z - reach, 0), min(z + reach + 1, n)):
            if support_rows[k, 1] > support_rows[k, 0]:
                grow = reach - abs(k - z)  # the faces left after the |k - z| between the planes
                lo = support_rows[k, 0] - grow if hi < 0 else min(lo, support_rows[k, 0] - grow)
                hi = max(hi, support_rows[k, 1] + grow)
        first, stop = _clipped(lo, hi, y0, y1) if hi >= 0 else (y1, y1)
        out[z - oz, 0], out[z - oz, 1] = first - oy, stop - oy
        first, stop = y1, y1
        if support_rows[z, 1] > support_rows[z, 0]:
            first, stop = _clipped(support_rows[z, 0], support_rows[z, 1], y0, y1)
        out[z - oz, 2], out[z - oz, 3] = first - oy, stop - oy

@njit(cache=True, nogil=True)
def _summarise_extents(extents, watched, z0, z1, oz, oy, boxes, rows):
    """From the kernel's per-plane extents (C, planes, 4) of the planes z0 .. z1 (the state's
    indices): boxes[i] = (z0, z1, y0, y1, x0, x1) of watched channel ``watched[i]``'s non-zero
    voxels in the state's indices (z1 = 0: none), and rows[z + oz] = (first, last + 1) + oy,
    the rows holding any watched channel's, in grid indices (every other plane (0, 0))."""
    rows[:] = 0
    for i in range(watched.shape[0]):
        boxes[i, :] = 0
    for z in range(z0, z1):
        first, last = -1, -1
        for i in range(watched.shape[0]):
            e = extents[watched[i], z]
            if e[1] < 0:
                continue
            box = boxes[i]
            if box[1] == 0:
                box[0], box[2], box[3], box[4], box[5] = z, e[0], e[1] + 1, e[2], e[3] + 1
            box[1] = z + 1
            box[2], box[3] = min(box[2], e[0]), max(box[3], e[1] + 1)
            box[4], box[5] = min(box[4], e[2]), max(box[5], e[3] + 1)
            first = e[0] if last < 0 else min(first, e[0])
            last = max(last, e[1])
        if last >= 0:
            rows[z + oz, 0], rows[z + oz, 1] = first + oy, last + 1 + oy

@njit(cache=True, fastmath=True, nogil=True, error_model="numpy", parallel=True)
def _floor_and_bound(p, channels, window, floor, out, plane_rows):
    """For each listed channel: set values of magnitude below ``floor`` to zero (in place) inside
    ``window`` = (z0, z1, y0, y1, x0, x1), and write the bounding box of its non-zero voxels
    there as out[i] = (z0, z1, y0, y1, x0, x1) in grid indices (z1 = 0 when there are none).
    With ``floor`` 0 nothing is zeroed: only the box is found. ``plane_rows[z]`` (grid indices)
    receives, for each plane z of the window, the rows (first, last + 1) that hold a non-zero
    voxel of any listed channel ((0, 0): none); a (0, 2) array skips this."""
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
                    keep = _in_support(v, floor, zero)  # floor 0: only find the non-zero voxels
                    row[x] = v if keep else zero
                    first = min(first, x + wx0 if keep else wx1)
                    last = max(last, x + wx0 if keep else -1)
                if last >= 0:
                    rows_lo[i, j] = min(rows_lo[i, j], y)
                    rows_hi[i, j] = y
                    cols_lo[i, j] = min(cols_lo[i, j], first)
                    cols_hi[i, j] = max(cols_hi[i, j], last)
    if plane_rows.shape[0] > 0:
        for i in range(n_planes):
            lo, hi = wy1, -1
            for j in range(n):
                lo = min(lo, rows_lo[i, j])
                hi = max(hi, rows_hi[i, j])
            if hi < 0:  # none: (0, 0), as elsewhere
                lo = hi + 1
            plane_rows[wz0 + i, 0], plane_rows[wz0 + i, 1] = lo, hi + 1
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
