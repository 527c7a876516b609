"""Fused CPU kernel of the no-grad IMEX step: one streaming pass over the state per step.

The torch inference path (:mod:`AnatomyDTLib.inference`) runs each stage of a step — reaction,
cross-diffusion, each Jacobi sweep, the simplex projection — as a chain of whole-array torch
operations, so a 240×240×155×5 state crosses memory some 50 times per step. This module computes
the same step voxel by voxel in one compiled kernel (numba), pipelined along the slowest axis:

    for each plane e (of the box, in order):
        explicit part at plane e          reaction + cross-diffusion from p^n     -> q[e]
        Jacobi sweep s at plane e - s     for s = 1..m, from sweep s-1's planes   -> u_s[e - s]
        finish plane e - L                diffused classes from u_m, the others from q,
                                          simplex projection, written back into p (in place);
                                          the watched classes floored, their extents recorded

Only a few planes live at a time (ring buffers of the input planes e − 1, e, e + 1, of q and of
each sweep: ≈ 1.5 MB per slab for a brain tumour's box; planes of more than 24,576 cells, which
would take ≈ 20 MB per slab at 240×240 with 5 active classes and spill out of a shared L3, are
advanced in strips of rows, each with m + 1 rows of halo), so main memory sees the state read once
and written once — the step's unavoidable traffic. Every stage runs over a whole plane per call, as flat vectorised
loops over its cells (docs/performance_history.md, "The per-plane kernel"; benchmarks/perf_row_length.py). The output lags the input by
L = max(m, 1) planes, so every input plane has been copied into the ring before its plane of p is
overwritten. The box is split into one slab of planes per thread; each slab recomputes m + 1
planes of halo around it from a copy of its neighbours' input planes, taken before any slab writes.
As it writes, the kernel also does the next step's support search (values of the watched classes
below the support floor set to zero, the box of each found, and its rows per plane), so that
search needs no pass of its own unless something else changes the state in between (an event).
With those rows the next step computes on each plane only the rows within :attr:`FusedStep.reach`
faces of the support (m; m + 1 when a pushed class diffuses; :meth:`FusedStep.plane_rows`):
nothing else can change. The reaction acts only on the support's own rows, the cross-diffusion one
face beyond them. A tumour fills about a third of its box; on the brain case this computes 0.73 of
the box's rows.

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
reference. numba compiles the kernel on first use (35–50 s per dtype on a 2-core machine) and
caches the machine code on disk (next to ``fused_kernels.py``, which holds the numba code, or in
numba's user cache when that folder is read-only), so later runs and later processes load it in
well under a second. :mod:`AnatomyDTLib.warmup` (``anatomydt warmup``) compiles it ahead of the
first forecast; the Slicer module starts that in the background.

Units: Δt in days, spacing in mm, χ and D in mm²/day, rates in 1/day.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .boxes import contains, dilate, from_bounds, shifted, union

ENV_SWITCH = "ANATOMYDT_FUSED"
_KERNELS = None  # the module AnatomyDTLib.fused_kernels once imported, False if numba cannot be imported


def _kernels():
    """AnatomyDTLib.fused_kernels, imported on first use (it imports numba, ≈ 0.25 s), or None when
    numba is missing or broken: a failed import only means the torch path."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from . import fused_kernels
            _start_numba_threads_keeping_torch_threads()
            _KERNELS = fused_kernels
        except Exception:  # pragma: no cover - exercised only where numba cannot be imported
            _KERNELS = False
    return _KERNELS or None


def _start_numba_threads_keeping_torch_threads() -> None:
    """Start numba's thread pool, and leave torch's thread count as it was.

    Why: numba's OpenMP layer starts its pool on the first parallel kernel call and, in doing so,
    sets the OpenMP thread count that torch reports and uses as its own: a process's
    ``torch.set_num_threads(1)`` silently became 2 after its first ``pde-only`` forecast. Started
    here, ahead of any kernel call, the pool's change is undone at once; the kernel's calls leave
    the count alone after that (``Testing/test_fused_step.py`` checks it in a fresh process)."""
    import numba

    threads = torch.get_num_threads()
    numba.get_num_threads()  # starts the pool
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def fused_kernel_available() -> bool:
    """Whether the fused kernel can run here: not switched off by the user (``ANATOMYDT_FUSED=0``
    forces the torch path, e.g. to compare the two) and numba importable."""
    if os.environ.get(ENV_SWITCH, "1").strip() in ("0", "false", "no", "off"):
        return False
    return _kernels() is not None


def floored_supports_(p: torch.Tensor, channels: list[int], window, floor: float,
                      plane_rows: np.ndarray | None = None) -> dict | None:
    """The torch path's ``InferenceStepper._floored_supports_`` in one pass per batch item: zero the
    listed channels' values below ``floor`` inside ``window`` (three slices; ``floor`` 0 changes
    nothing, the boxes of the non-zero voxels are only found) and return
    {channel: box of its non-zero voxels, or None}. Returns None when the kernel cannot run here
    (then the caller uses torch). ``plane_rows`` (B, Z, 2), if given, receives per batch item and
    plane the rows (first, last + 1) holding a non-zero voxel of any listed channel, in ``p``'s
    indices ((0, 0): none, as on every plane outside the window)."""
    if not fused_kernel_available() or p.device.type != "cpu" or p.dim() != 5 or p.dtype not in (
            torch.float32, torch.float64) or not p.is_contiguous():
        return None
    window_array = np.array([window[0].start, window[0].stop, window[1].start, window[1].stop, window[2].start,
                             window[2].stop], dtype=np.int64)
    merged: dict = {c: None for c in channels}
    out = np.zeros((len(channels), 6), dtype=np.int64)
    if plane_rows is not None:
        plane_rows[:] = 0
    no_rows = np.zeros((0, 2), dtype=np.int64)
    for b in range(p.shape[0]):
        _kernels()._floor_and_bound(_as_numpy(p[b]), np.asarray(channels, dtype=np.int64), window_array,
                                    float(floor), out, no_rows if plane_rows is None else plane_rows[b])
        for j, c in enumerate(channels):
            if out[j, 1] > out[j, 0]:
                merged[c] = union(merged[c], from_bounds(out[j]))
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
    face weights, α, κ, the domain) are converted once; those that are per-voxel fields are copied
    onto a region around the box (:meth:`region_for`), renewed when the box outgrows it. The
    stepper keeps the state itself packed on the same region between steps
    (``inference.PackedState``) and passes it with ``state_region``.
    """

    PACK_MARGIN = 8  # voxels by which the region of the packed coefficient fields and state exceeds the box
    PACK_STATE = True  # the stepper keeps the state packed on that region between steps (inference.PackedState)
    STRIP_ROWS = 0  # rows per strip of the kernel's planes; 0: as many as fit fused_kernels.STRIP_CELLS cells
    ROW_RANGES = True  # compute on each plane only the rows the step can change (see plane_rows)

    def __init__(self, stepper):
        self.stepper = stepper
        self.threads = torch.get_num_threads()  # slabs run in parallel, one per torch thread
        pr = stepper.pr
        # cheap conditions first: a solve that cannot use the kernel never imports numba
        self.usable = (stepper.device.type == "cpu" and stepper.dtype in (torch.float32, torch.float64)
                       and pr.reaction_hook is None and stepper.cross_rows is not None and len(stepper.shape) == 5
                       and stepper.shape[1] <= 63  # the kernel's watched classes are bits of one int64
                       and fused_kernel_available())
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
        self.has_growth = not is_zero(pr.growth_rate)
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
        # how many faces from the watched classes' support a step can change anything (plane_rows):
        # the sweeps spread the diffused classes m faces, one more when cross-diffusion (one face)
        # moves a diffused class first
        pushed_diffuses = self.sweeps > 0 and any(c in stepper.diffused for c in self.rows.tolist())
        self.reach = max(self.sweeps + (1 if pushed_diffuses else 0), 1 if self.rows.size else 0)
        # the coefficient fields that do not change during the solve, packed on a region (see region_for)
        self.diffusion_field = bool(stepper.diffused) and not stepper.uniform
        self.scale_field = bool(stepper.diffused) and any(n > 1 for n in stepper._diag.shape[2:])
        self.needs_region = (self.diffusion_field or self.scale_field or self.growth[1] or self.kappa[1]
                             or self.domain is not None)
        self._region = None
        self.regions_built = 0  # how often that region was (re)built in this solve
        self._packed: dict = {}  # compact copies of those fields on that region
        # per batch item, class and plane: (y_lo, y_hi, x_lo, x_hi) of the watched classes' non-zero voxels
        self.extents = np.zeros((stepper.shape[0], stepper.shape[1], stepper.shape[2], 4), dtype=np.int64)
        # per batch item and grid plane: the rows (first, stop) holding the watched classes' non-zero
        # voxels after the last kernel call ((0, 0): none), the next step's plane_rows input
        self.rows_found = np.zeros((stepper.shape[0], stepper.shape[2], 2), dtype=np.int64)
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

    def region_for(self, box) -> tuple[slice, ...]:
        """The region of the grid on which the kernel gets the coefficient fields that do not change
        during a solve (per-face weights, per-voxel Jacobi scales, α, κ, the domain) as compact
        arrays, and on which the stepper keeps the state packed: the box grown by ``PACK_MARGIN``
        voxels, kept while later boxes lie inside it (a box grows by at most m + 2 voxels per
        step; on the brain case the region is built 4 times in 90 steps).

        Why: the box's rows are short pieces of the grid's rows (≈ 90 of 240 voxels on the brain
        case), and reading them from grid-sized arrays costs nearly as much as reading whole rows
        (``benchmarks/strided_rows.py``); these fields are copied once into arrays whose rows are
        barely longer than the box's. The state's own box rows cost the same, hence its packed copy."""
        if self._region is None or not contains(self._region, box):
            self._region = dilate(box, self.PACK_MARGIN, self.stepper.shape[2:])
            self._packed = {}
            self.regions_built += 1
        return self._region

    def _on_region(self, key, t: torch.Tensor, region) -> np.ndarray:
        """``t`` (leading axis, then *S or a face shape) restricted to ``region`` (clipped to its own
        extent along each axis: a face array has one fewer face than cells), as a compact array in
        the state's dtype; built once per region and ``key``."""
        if key not in self._packed:
            crop = (slice(None),) + tuple(slice(r.start, min(r.stop, n)) for r, n in zip(region, t.shape[1:]))
            self._packed[key] = _as_numpy(t[crop].to(self.stepper.dtype).contiguous())
        return self._packed[key]

    def _field_item(self, name: str, value, b: int, region) -> np.ndarray:
        """Batch item b of a per-voxel field (B|1, 1, *S) on the region, as a (Z, Y, X) array."""
        t = torch.as_tensor(value)
        item = min(b, t.shape[0] - 1)
        return self._on_region((name, item), t[item], region)[0]

    @staticmethod
    def _scalar_item(value, b: int) -> float:
        """Batch item b of a coefficient that is one number per batch item (or one in all)."""
        t = torch.as_tensor(value)
        per_item = t.reshape(t.shape[0], -1)[:, 0] if t.dim() > 0 else t.reshape(1)
        return float(per_item[min(b, per_item.shape[0] - 1)])

    def _diffusion_arrays(self, b: int, dt: float, constants: np.ndarray, region):
        """Face weights D/h² per axis (1/day) and the Jacobi scale ω/(1 + Δt·c) of the diffused
        classes for batch item b: per-face arrays on ``region`` when they vary, else written into
        ``constants``. Called by :meth:`_coefficients`, which keeps the result for its Δt."""
        st = self.stepper
        if not st.diffused:
            return self.dummy4, self.dummy4, self.dummy4, self.dummy4
        arrays = []
        for axis, w in enumerate(st.weights):
            item = min(b, w.shape[0] - 1)  # (Kd, faces) or (Kd, 1, 1, 1) per batch item
            if self.diffusion_field:
                arrays.append(self._on_region(("weights", axis, item), w[item], region))
            else:
                constants[1:, axis, :] = _as_numpy(w[item].reshape(-1, 1).to(st.dtype))
                arrays.append(self.dummy4)
        diag = st._diag[min(b, st._diag.shape[0] - 1)]  # (Kd, 1, 1, 1) conservative or (Kd, *S) classic
        if not self.scale_field:
            constants[1:, 3, :] = _as_numpy((st.pr.omega / (1.0 + dt * diag)).reshape(-1, 1).to(st.dtype))
            return arrays[0], arrays[1], arrays[2], self.dummy4
        scale = st.pr.omega / (1.0 + dt * diag[(slice(None),) + tuple(region)])  # depends on Δt: not kept here
        return arrays[0], arrays[1], arrays[2], _as_numpy(scale.to(st.dtype).contiguous())

    def step_(self, p: torch.Tensor, box, dt: float, chemo_rate: float, clearable, dying_out,
              state_region=None, support_rows: np.ndarray | None = None) -> dict:
        """One step of ``p`` (B, C, Z, Y, X), in place, on ``box`` (three slices of the grid); writes
        the dying channel before the projection into ``dying_out`` (B, 1, Z, Y, X) when there is one.
        ``state_region``: ``p``, ``clearable`` and ``dying_out`` cover only this region of the grid
        (it must be :meth:`region_for` of the box); None: they are grid-sized. ``support_rows``
        (B, grid planes, 2): per plane the rows (first, stop) that hold the watched classes'
        non-zero voxels now (see :meth:`plane_rows`); None: unknown, every row of the box is computed.

        Returns what the stepper's support search would find at the start of the next step, had
        nothing else changed ``p``: {watched class: box of its non-zero voxels (grid slices), or
        None}; their rows per plane are in ``rows_found``. The kernel has already set the watched
        classes' values below the support floor to zero (they could be non-zero only inside
        ``box``, so that is all the search would do)."""
        st = self.stepper
        pr = st.pr
        spacing = st.spacing
        clearance = 0.0
        if clearable is not None:
            clearance = 1.0 - math.exp(-pr.clearance_rate_per_day * dt)
        kernels = _kernels()
        par = kernels.parameter_array(self.np_dtype, dt=dt, omega=pr.omega,
                                      chemo_fraction=1.0 - math.exp(-chemo_rate * dt) if chemo_rate > 0 else 0.0,
                                      clearance_fraction=clearance, slack=st.slack,
                                      inverse_spacing=[1.0 / h for h in spacing], floor=st.floor)
        if state_region is not None:  # everything the kernel reads covers the region: its indices start at 0
            region = self.region_for(box)
            if tuple(state_region) != region:
                raise ValueError(f"the packed state covers {state_region}, but the box {box} needs the region {region}")
            state_origin = tuple(r.start for r in region)
            origin = (0, 0, 0)
        else:
            region = self.region_for(box) if self.needs_region else None
            state_origin = (0, 0, 0)
            origin = (0, 0, 0) if region is None else tuple(r.start for r in region)
        local = shifted(box, [-o for o in state_origin])  # the box in the state's indices
        box_array = np.array([local[0].start, local[0].stop, local[1].start, local[1].stop, local[2].start,
                              local[2].stop], dtype=np.int64)
        for b in range(p.shape[0]):
            constants, wz, wy, wx, scale, growth_b, kappa_b, domain = self._coefficients(b, dt, region, p.shape[-1])
            clear = self.dummy3 if clearable is None else _as_numpy(clearable[b, 0].to(st.dtype).contiguous())
            dying = self.dummy3 if dying_out is None else _as_numpy(dying_out[b, 0])
            fl = kernels.flag_array(tumour=pr.tumour, dying=-1 if pr.dying is None else pr.dying, sink=pr.sink,
                                    has_growth=self.has_growth, growth_field=self.growth[1],
                                    kappa_field=self.kappa[1], has_domain=self.domain is not None,
                                    has_clearable=clearable is not None, diffusion_field=self.diffusion_field,
                                    scale_field=self.scale_field, sweeps=self.sweeps,
                                    threads=_kernel_threads(self.threads), region_origin=origin,
                                    watched=st.watched, strip_rows=self.STRIP_ROWS)
            rows = self.plane_rows(None if support_rows is None else support_rows[b], box, state_origin, p.shape[2])
            kernels._fused_step(_as_numpy(p[b]), box_array, self.chi, self.rows, self.cols, growth_b, kappa_b, domain,
                                clear, self.diffused, self.is_diffused, wz, wy, wx, scale, dying, fl, par, constants,
                                self.extents[b], rows)
        supports = self._supports_found(local, state_origin, p.shape[0])
        return {c: shifted(found, state_origin) for c, found in supports.items()}

    def plane_rows(self, support_rows: np.ndarray | None, box, origin, n_planes: int) -> np.ndarray:
        """The kernel's ``plane_rows`` (n_planes, 4): for each plane of ``box`` (grid slices), the
        rows (first, stop) it computes, in the state's indices (``origin``: the grid index of the
        state's first voxel), and the support's own rows on the plane (where the reaction acts;
        cross-diffusion acts one face beyond them). Outside the first the step changes nothing, and
        the kernel only copies.

        Why this is exact: every voxel the step changes lies within :attr:`reach` faces of the
        support of the watched classes W (tumour, dying, diffused classes, χ columns). The
        reaction acts on the tumour's and the dying class's support; cross-diffusion moves mass
        of the pushed classes across faces where a pushing class is non-zero on one side (one face
        beyond W); each of the m Jacobi sweeps spreads the diffused classes one face further, from
        where they are after the explicit part: W, or one face beyond it when cross-diffusion
        pushes a diffused class; the projection touches only voxels that changed. So the reach is
        m, or m + 1 when a pushed class diffuses, and at least 1 with cross-diffusion (the brain's
        mass effect pushes tissues that do not diffuse: m). A face between planes counts like one
        between rows, so a plane's rows are those of W on the plane d planes away, grown by
        reach − d rows, for d = 0 .. reach. (The box reaches m + 1 voxels beyond the diffused
        classes, one more than the rows need: the kernel closes the faces across the box's border,
        which would change the last sweep next to it, whereas rows outside the computed ones keep
        their true, unchanged values, which the stencils read.) ``Testing/test_fused_step.py`` fails with one
        face less, for the brain's mass effect and for a pushed class that diffuses.
        A tumour fills about a third of its box (``benchmarks/perf_roofline.py`` counts it) and
        its planes near the box's ends hold few rows: 0.73 of the box's rows are computed on the
        brain case. ``support_rows`` (grid planes, 2): W's rows per plane, as :attr:`rows_found`
        or ``floored_supports_`` give them; None (or ``ROW_RANGES`` off): every row of the box."""
        rows = np.zeros((n_planes, 4), dtype=np.int64)
        zs, ys = box[0], box[1]
        if support_rows is None or not self.ROW_RANGES:
            rows[zs.start - origin[0]:zs.stop - origin[0]] = [ys.start - origin[1], ys.stop - origin[1]] * 2
            return rows
        _kernels()._rows_to_compute(support_rows, zs.start, zs.stop, ys.start, ys.stop, self.reach,
                                    origin[0], origin[1], rows)
        return rows

    def _supports_found(self, box, origin, batch: int) -> dict:
        """{watched class: the box of its non-zero voxels over the batch, or None} from the kernel's
        per-plane extents of the planes of ``box`` (outside it the watched classes are zero), in the
        coordinates of the kernel's state; their rows per plane go to ``rows_found`` (grid indices,
        ``origin``: the grid index of the state's first voxel)."""
        watched = np.asarray(self.stepper.watched, dtype=np.int64)
        boxes = np.zeros((len(watched), 6), dtype=np.int64)
        supports = dict.fromkeys(self.stepper.watched)
        for b in range(batch):
            _kernels()._summarise_extents(self.extents[b], watched, box[0].start, box[0].stop, origin[0], origin[1],
                                          boxes, self.rows_found[b])
            for i, c in enumerate(self.stepper.watched):
                if boxes[i, 1] == 0:
                    continue
                supports[c] = union(supports[c], from_bounds(boxes[i]))
        return supports

    def _coefficients(self, b: int, dt: float, region, row_length: int) -> tuple:
        """The kernel's coefficient arguments for batch item b and step Δt: the constant rows
        (``constants``: [0] ones, α, κ; [1 + d] face weights z, y, x and Jacobi scale of diffused
        class d), the face-weight and scale arrays, α, κ and the domain (fields on ``region``, else
        dummies). Built once per b and region, and again when Δt changes: a solve repeats the same
        Δt, and building them took ≈ 0.4 ms of torch and numpy calls per step on the brain case."""
        key = ("coefficients", b)
        if key not in self._packed or self._packed[key][0] != dt:
            growth, growth_field = self.growth
            kappa, kappa_field = self.kappa
            constants = np.ones((1 + max(1, len(self.stepper.diffused)), 4, row_length), dtype=self.np_dtype)
            wz, wy, wx, scale = self._diffusion_arrays(b, dt, constants, region)
            growth_b, kappa_b = self.dummy3, self.dummy3
            if growth_field:
                growth_b = self._field_item("growth", growth, b, region)
            else:
                constants[0, 1, :] = self._scalar_item(growth, b)
            if kappa_field:
                kappa_b = self._field_item("kappa", kappa, b, region)
            else:
                constants[0, 2, :] = self._scalar_item(kappa, b)
            domain = self.dummy3 if self.domain is None else self._field_item("domain", self.domain, b, region)
            self._packed[key] = (dt, (constants, wz, wy, wx, scale, growth_b, kappa_b, domain))
        return self._packed[key][1]


def is_zero(value) -> bool:
    """Whether a coefficient (a number or a tensor of any shape) is zero everywhere: then its term
    drops out of the step (the torch path and the kernel both skip it)."""
    return not bool((torch.as_tensor(value) != 0).any())
