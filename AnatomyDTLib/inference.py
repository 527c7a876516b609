"""The no-grad inference path of the IMEX step: same scheme as the reference path, few allocations.

When nothing needs gradients the solver runs each step through :class:`InferenceStepper`,
which works in place on a private copy of the state and on buffers allocated once per solve.
Fresh multi-hundred-MB tensors cost page faults on every allocation, so on a 240×240×155×5
grid the allocating reference path spends most of its time there.

It computes the same step as :mod:`AnatomyDTLib.solver` (tested to agree within rounding); the
step lengths — landing on events, and the sub-steps that keep the explicit cross-diffusion below
its stability limit — are chosen by the solver's integrator, which both paths share. The
economies:

* classes with D_k = 0 are not diffused (their implicit solve is the identity);
* cross-diffusion only touches the rows and columns of χ that are non-zero; with a single
  non-zero column (one class pushes the others, the brain's mass effect) the face gradient of
  that class is computed once and shared by every pushed class;
* the simplex projection is applied only to voxels that left the simplex (channel sum off 1
  by more than the dtype's tolerance, or a negative value); the others are left exactly as
  they are;
* every term is evaluated on the bounding box of where it can be non-zero: growth where there is
  tumour, cross-diffusion where its driving classes are non-zero (plus one voxel: outside, their
  gradient is exactly zero), diffusion where the diffused classes are non-zero plus m voxels (m
  Jacobi sweeps spread by at most m voxels). The bounding box of each watched class is found
  once per step, searching only the window where it can be.
* **support floor**: m Jacobi sweeps give every voxel within m voxels of the support a non-zero
  value, so without a floor the support of a diffusing class would grow by m voxels per step
  through values like 1e-35 that no output can show. At the start of each step, values of the
  watched classes (those whose support sets a box) with magnitude below :func:`support_floor` of
  the dtype (ε²: 1.4e-14 in float32, 4.9e-32 in float64) are set to zero. This is the only place
  where the inference path departs from the reference path by more than rounding; each removed
  value is below the floor, and what it could have become over a horizon T is bounded by
  floor·exp(α·T) (logistic growth is the only amplifying term): 1.3e-12 in float32 after 90 days
  at α = 0.05/day, far below what any output shows (tested against the reference path). It also keeps the arithmetic away from
  denormal floats, which are 10–100× slower on CPUs, independently of which thread computes what
  (``torch.set_flush_denormal`` acts on the calling thread only).
* **packed state** (fused kernel only): the kernel steps a compact copy of the state on a region
  around the box (:class:`PackedState`) instead of the grid-sized tensor, whose box rows are short
  pieces of long rows and read about 2.5× slower (``benchmarks/strided_rows.py``). The copy is
  kept between steps and written back only when something outside the stepper needs the whole
  grid (an output day, surgery, a torch-path step, the end of the solve): everything the
  integrator does between steps goes through :meth:`InferenceStepper.current` and
  :meth:`InferenceStepper.unpacked`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import treatments as tx
from .operators import face_both_inside
from .boxes import contains, dilate, dilate_or_none, intersection, relative, shifted, union, union_all
from .fused import FusedStep, floored_supports_, is_zero
from .simplex import on_simplex_slack, simplex_threshold

def support_floor(dtype: torch.dtype) -> float:
    """ε² of the dtype (1.4e-14 in float32, 4.9e-32 in float64): magnitudes below this are set to zero in
    the watched classes at the start of each step (see the module docstring)."""
    return float(torch.finfo(dtype).eps) ** 2


class InferenceStepper:
    """In-place IMEX steps for a fixed problem (built by the solver, see ``solver._Problem``)."""

    def __init__(self, problem, state: torch.Tensor):
        self.pr = problem
        self.shape = tuple(state.shape)
        self.dtype = state.dtype
        self.device = state.device
        self.spacing = problem.grid.spacing
        self._prepare_diffusion()
        self._prepare_cross_diffusion()
        self._prepare_limiter_check()
        self.fused = FusedStep(self)  # the one-pass CPU kernel, where it applies (see fused.py)
        self._supports_after_kernel = None  # (p's address, p's version, supports, rows) after a fused step
        self._support_rows = None  # per batch item and grid plane, the rows holding the supports found last (or None)
        n_face = max(int(math.prod(self._face_shape(d, (1, 1) + self.shape[2:]))) for d in range(2, len(self.shape)))
        self.face_buffer = torch.empty(n_face * self.shape[0] * max(1, len(self.diffused)), dtype=self.dtype,
                                       device=self.device)
        self.slack = on_simplex_slack(self.dtype)
        self.floor = support_floor(self.dtype)
        self.full_box = tuple(slice(0, n) for n in self.shape[2:])
        self.tumour_like = [problem.tumour] + ([problem.dying] if problem.dying is not None else [])
        # The classes whose support decides a box: columns of χ, tumour (growth, treatment) and the
        # diffused classes. With a learned reaction hook the diffusion box is searched after the hook.
        watched = set(self.tumour_like) | set(self.diffused)
        if self.cross_rows:
            watched |= set(self.cross_cols)
        self.watched = sorted(watched)
        # Every support this stepper looks for lies inside ``window``; it grows by at most
        # m + 1 voxels per step (m Jacobi sweeps, one upwind face), so each step searches only there.
        self.window = self.full_box
        # Delayed death: the dying channel is watched, so it is non-zero only inside the search
        # window and changes only there; the integrator keeps its cohorts' bookkeeping to that box
        # (``dying_box``, set before each step; None = the whole grid).
        self.dying_box = None
        self._grid_dying_before = None  # grid-sized buffers of the dying bookkeeping, kept across steps
        self._grid_clearable = None
        self._clearable_box = None  # the box where the current clearable buffer was last written
        # The fused kernel's compact copy of the state on a region around the box, kept between
        # steps (see the module docstring); None: ``p`` itself is current everywhere.
        self.packed: PackedState | None = None
        self.packings = 0  # how often a packed copy was built in this solve (once per region, and after write-backs)
        # Start exactly on the simplex: p0 is accepted within a small tolerance, and later steps only
        # re-project the voxels they change.
        self._project_off_simplex_(state, self.full_box)

    # -- set-up ---------------------------------------------------------------------------
    @staticmethod
    def _face_shape(dim: int, shape) -> tuple[int, ...]:
        s = list(shape)
        s[dim] -= 1
        return tuple(s)

    def _prepare_diffusion(self) -> None:
        """The diffusion operator's active classes and face weights (1/day); scalars stay scalars."""
        op = self.pr.diffusion
        self.diffused = list(op.active)
        self.uniform = op.uniform
        self.weights = op.face_weights
        if self.diffused:
            self._diag = op.max_diagonal() if self.pr.jacobi_variant == "conservative" else op.diagonal
        numel = self.shape[0] * len(self.diffused) * math.prod(self.shape[2:])
        # flat buffers, viewed at the size of each step's diffusion box
        self.u, self.rhs, self.lap = (torch.empty(numel, dtype=self.dtype, device=self.device) for _ in range(3))

    def _prepare_cross_diffusion(self) -> None:
        cross = self.pr.cross
        self.cross_rows = []
        if cross is None:
            return
        chi = cross.chi
        if chi.dim() > 2:  # spatial χ: use the reference operator (rare, small problems)
            self.cross_rows = None
            return
        rows = [k for k in range(chi.shape[0]) if bool((chi[k] != 0).any())]
        cols = [j for j in range(chi.shape[1]) if bool((chi[:, j] != 0).any())]
        self.cross_rows = rows
        self.cross_cols = cols
        self.chi_sub = chi[rows][:, cols].contiguous()

    # -- the step -------------------------------------------------------------------------
    def step(self, p: torch.Tensor, t: float, dt: float, chemo_rate: float, clearable) -> torch.Tensor:
        """Advance ``p`` (owned by the integrator, modified in place) by ``dt`` days."""
        pr = self.pr
        spatial = self.shape[2:]
        m = pr.jacobi_iters
        fused = self.fused.applies(dt)
        if not fused and self.packed is not None:  # the torch path works on the grid-sized state
            clearable = self._unpack_with_clearable(p, clearable)
        window = self.search_window()
        support = self._floored_supports_(p, window)  # class -> box of its non-zero voxels (or None)
        if fused:
            return self._fused_step_(p, support, dt, chemo_rate, clearable)
        changed = None  # the box of every voxel this step may change
        cross = None
        if pr.cross is not None:
            if self.cross_rows is None:
                box = self.full_box
            else:
                box = dilate_or_none(union_all(support[c] for c in self.cross_cols), 1, spatial)
            if box is not None:
                cross = (box, self._cross_increment(_crop(p, box), dt, box))
                changed = union(changed, box)
        tumour_box = union_all(support[c] for c in self.tumour_like)
        if tumour_box is not None:
            self._reaction_(_crop(p, tumour_box), dt, chemo_rate, _crop(clearable, tumour_box), tumour_box)
            changed = union(changed, tumour_box)
        if pr.reaction_hook is not None:  # a learned term can act anywhere
            self._hook_(p, t, dt)
            changed = self.full_box
        if cross is not None:
            box, (increment, scale) = cross
            region = _crop(p, box)
            if scale is None:  # spatial χ: every channel's tendency
                region.add_(increment, alpha=dt)
            else:
                for i, k in enumerate(self.cross_rows):
                    region[:, k].add_(increment[:, i], alpha=dt * scale[i])
        if self.diffused:
            if pr.reaction_hook is not None:
                box = support_box_within(p[:, self.diffused], self.full_box, m + 1, spatial)
            else:
                box = dilate_or_none(self._diffused_support(support, None if cross is None else cross[0], tumour_box),
                                      m + 1, spatial)
            if box is not None:
                self._implicit_diffusion_(p, dt, box)
                changed = union(changed, box)
        self.window = changed if changed is not None else self.window
        if pr.dying is not None:  # the integrator keeps delayed-death cohorts consistent with the projection
            self._keep_dying_before_projection(p, changed)
        if changed is not None:
            self._project_off_simplex_(p, changed)
        return p

    def _fused_step_(self, p: torch.Tensor, support, dt: float, chemo_rate: float, clearable) -> torch.Tensor:
        """The same step by the fused kernel, on the union of the boxes the torch path would touch
        (each term is exactly zero outside its own box, so the larger box changes nothing)."""
        pr = self.pr
        spatial = self.shape[2:]
        cross_box = None
        if self.cross_rows:
            cross_box = dilate_or_none(union_all(support[c] for c in self.cross_cols), 1, spatial)
        tumour_box = union_all(support[c] for c in self.tumour_like)
        changed = union(cross_box, tumour_box)
        if self.diffused:
            diffusion_box = dilate_or_none(self._diffused_support(support, cross_box, tumour_box), pr.jacobi_iters + 1,
                                            spatial)
            changed = union(changed, diffusion_box)
        if changed is None:
            if pr.dying is not None:
                self._keep_dying_before_projection(p, changed)
            return p
        state, region = self._kernel_state(p, changed)
        if pr.dying is not None:
            self._keep_dying_before_projection(p, changed)
        if clearable is not None:
            clearable = self.clearable_buffer()  # in the kernel's coordinates (a repack carried it over)
        supports = self.fused.step_(state, changed, dt, chemo_rate, clearable,
                                    self.dying_before_projection if pr.dying is not None else None, region,
                                    self._support_rows)
        self.window = changed
        self._supports_after_kernel = (state.data_ptr(), state._version, supports, self.fused.rows_found.copy())
        return p

    # -- the packed state ---------------------------------------------------------------------
    def _kernel_state(self, p: torch.Tensor, box) -> tuple[torch.Tensor, tuple[slice, ...] | None]:
        """The tensor the fused kernel steps on ``box`` and the grid region it covers (None: it is
        ``p``, grid-sized). The packed copy is (re)built when the fused step's region changes
        (``FusedStep.region_for``: the box grown by a margin, renewed when the box outgrows it,
        a few times per solve). A region that is the whole grid is not copied: its rows are whole
        rows already, and a copy would only double the state's memory."""
        region = self.fused.region_for(box) if self._packs_state() else self.full_box
        if region == self.full_box:
            self.unpacked(p)
            return p, None
        if self.packed is None or self.packed.region != region:
            previous = self.packed
            self.unpacked(p, keep_clearable=False)
            self.packed = PackedState(p, region, self.pr.dying is not None)
            self.packings += 1
            self._move_clearable(previous)
        return self.packed.data, region

    def _move_clearable(self, previous: PackedState | None) -> None:
        """Carry the clearable cells the integrator wrote before this step into the new packed copy:
        from the previous packed copy, or from the grid-sized buffer, which is emptied (it must not
        clear them twice). Outside the new region they are zero (the dying channel is)."""
        box = self._clearable_box
        if box is None or self.packed.clearable is None:
            return
        if previous is not None:
            self.packed.take_clearable(previous.clearable, previous.region, box)
        elif self._grid_clearable is not None:
            self.packed.take_clearable(self._grid_clearable, self.full_box, box)
            _crop(self._grid_clearable, box).zero_()
        self._clearable_box = self.clip(box)

    def _packs_state(self) -> bool:
        """Whether the fused kernel keeps a packed copy of the state: with delayed death only when the
        integrator bounds the dying channel's bookkeeping by a box (``dying_box``)."""
        return self.fused.PACK_STATE and (self.pr.dying is None or self.dying_box is not None)

    def current(self, p: torch.Tensor, box) -> torch.Tensor:
        """The state's current values on ``box`` (grid slices; (B, C, *box)), as a view through
        which in-place changes reach the state: a view of the packed copy when it holds the box,
        else of ``p`` (the packed copy is then written back first)."""
        if self.packed is not None:
            if self.packed.holds(box):
                return _crop(self.packed.data, self.packed.local(box))
            self.unpacked(p)
        return _crop(p, box)

    def clip(self, box):
        """``box`` restricted to the packed region, where every non-zero value of the watched
        classes (the dying channel and its cohorts included) lies while the state is packed; ``box``
        itself when it is not packed."""
        if self.packed is None or box is None:
            return box
        clipped = []
        for b, r in zip(box, self.packed.region):
            start = min(max(b.start, r.start), r.stop)
            clipped.append(slice(start, max(start, min(b.stop, r.stop))))
        return tuple(clipped)

    def on(self, buffer: torch.Tensor, box) -> torch.Tensor:
        """The view on ``box`` (grid slices) of a buffer in the kernel's coordinates (packed region or grid)."""
        return _crop(buffer, box if self.packed is None else self.packed.local(box))

    def unpacked(self, p: torch.Tensor, keep_clearable: bool = True) -> torch.Tensor:
        """``p`` made current everywhere: the packed copy written back into it and dropped. Call
        it before reading or changing ``p`` other than through :meth:`current`. The clearable
        buffer moves to the grid-sized one (``keep_clearable``), so a step that follows uses it."""
        packed, self.packed = self.packed, None
        if packed is None:
            return p
        _crop(p, packed.region).copy_(packed.data)
        if packed.clearable is not None and keep_clearable and self._clearable_box is not None:
            grid = self._grid_clearable_buffer()
            _crop(grid, self._clearable_box).copy_(_crop(packed.clearable, packed.local(self._clearable_box)))
        if self._supports_after_kernel is not None and self._supports_after_kernel[:2] == (
                packed.data.data_ptr(), packed.data._version):  # the kernel's boxes hold for p now
            self._supports_after_kernel = (p.data_ptr(), p._version) + self._supports_after_kernel[2:]
        return p

    def _unpack_with_clearable(self, p: torch.Tensor, clearable):
        """Write the packed copy back before a torch-path step; returns the clearable buffer in the
        grid's coordinates (it moved there) when the step has one."""
        self.unpacked(p)
        return None if clearable is None else self.clearable_buffer()

    def clearable_buffer(self) -> torch.Tensor:
        """The buffer (B, 1, *kernel coordinates) that holds the dying cells whose delay has passed:
        zero outside the box given to the last :meth:`clearable_on_`."""
        if self.packed is not None:
            return self.packed.clearable
        return self._grid_clearable_buffer()

    def _grid_clearable_buffer(self) -> torch.Tensor:
        if self._grid_clearable is None:  # one buffer per solve (a stepper is built per solve)
            self._grid_clearable = self._grid_channel()
        return self._grid_clearable

    def _grid_channel(self) -> torch.Tensor:
        """A new grid-sized single-channel buffer of zeros (B, 1, *S)."""
        return torch.zeros((self.shape[0], 1) + tuple(self.shape[2:]), dtype=self.dtype, device=self.device)

    def clearable_on_(self, box) -> torch.Tensor:
        """The clearable buffer's view on ``box`` (grid slices), to be filled; the values written on
        the previous box are zeroed first, so the buffer is zero outside ``box``."""
        buffer = self.clearable_buffer()
        if self._clearable_box is not None:
            self.on(buffer, self._clearable_box).zero_()
        self._clearable_box = box
        return self.on(buffer, box)

    def search_window(self) -> tuple[slice, ...]:
        """The box the next step searches for supports: it holds every non-zero value of the watched
        classes (tumour, dying, diffused, χ columns), and the next step changes nothing outside it."""
        return dilate(self.window, self.pr.jacobi_iters + 2, self.shape[2:])

    def _keep_dying_before_projection(self, p: torch.Tensor, changed) -> None:
        """``dying_before_projection``: the dying channel as it is now (before the projection), for
        the integrator's cohort rescaling. With a ``dying_box`` only that box and the step's
        ``changed`` box are copied, into a buffer kept across steps (in the kernel's coordinates):
        the integrator reads only there (the fused kernel then writes the changed box's
        pre-projection values itself)."""
        d = self.pr.dying
        if self.dying_box is None:
            self.unpacked(p)
            self._grid_dying_before = p[:, d:d + 1].clone()
            return
        buffer = self.dying_before_projection
        for box in (self.dying_box, changed):
            if box is not None:
                box = self.clip(box)
                self.on(buffer, box).copy_(self.current(p, box)[:, d:d + 1])

    @property
    def dying_before_projection(self) -> torch.Tensor:
        """The dying channel before this step's projection (B, 1, *kernel coordinates): valid on the
        step's ``dying_box`` and ``changed`` box (see :meth:`_keep_dying_before_projection`)."""
        if self.packed is not None:
            return self.packed.dying_before
        if self._grid_dying_before is None:  # one buffer per solve (a stepper is built per solve)
            self._grid_dying_before = self._grid_channel()
        return self._grid_dying_before

    def _diffused_support(self, support, cross_box, tumour_box):
        """A box containing every non-zero voxel of the diffused classes after the explicit part.

        Before it, their support is known; the explicit part can add support only where it acts:
        cross-diffusion in its box (rows of χ), and the reaction in the tumour's box (the sink class
        receives killed tumour; growth only rescales the other classes).
        """
        box = union_all(support[c] for c in self.diffused)
        diffused = set(self.diffused)
        if cross_box is not None and (self.cross_rows is None or diffused & set(self.cross_rows)):
            box = union(box, cross_box)
        if tumour_box is not None and self.pr.sink in diffused:
            box = union(box, tumour_box)
        return box

    def _floored_supports_(self, p: torch.Tensor, window) -> dict:
        """Per watched class, the box of its non-zero voxels inside ``window`` (global slices), after
        setting its values of magnitude below the support floor to zero (in place). Right after a
        fused step nothing is left to do: the kernel floored the watched classes as it wrote them
        and returned their boxes, which hold as long as nothing has changed the state since (torch
        bumps a tensor's version counter at every in-place change, events included; the kernel's
        own writes do not). Otherwise one numba pass when the fused kernel is usable, torch if not;
        on the packed copy while there is one (outside its region the watched classes are zero).
        The kernel and the numba pass also give the supports' rows per plane (``_support_rows``,
        grid indices; None after the torch search), with which the next kernel step computes only
        the rows it can change (``FusedStep.plane_rows``)."""
        after_kernel, self._supports_after_kernel = self._supports_after_kernel, None
        self._support_rows = None
        state, window, origin = self._searched(p, window)
        if after_kernel is not None and after_kernel[:2] == (state.data_ptr(), state._version):
            self._support_rows = after_kernel[3]
            return after_kernel[2]
        if self.fused.usable:
            rows = np.zeros((state.shape[0], state.shape[2], 2), dtype=np.int64)
            boxes = floored_supports_(state, self.watched, window, self.floor, rows)
            if boxes is not None:
                self._support_rows = self._rows_on_grid(rows, origin)
                return {c: shifted(box, origin) for c, box in boxes.items()}
        region = _crop(state, window)
        boxes = {}
        for c in self.watched:
            values = region[:, c]
            keep = values.abs() >= self.floor
            if not bool(keep.all()):
                values.mul_(keep)  # exact: x * 1 = x, and x * 0 = 0 for the finite values of a field
            local = _true_box(keep.any(dim=0) if keep.shape[0] > 1 else keep[0])
            boxes[c] = None if local is None else tuple(
                slice(o + w.start + b.start, o + w.start + b.stop) for o, w, b in zip(origin, window, local))
        return boxes

    def _rows_on_grid(self, rows: np.ndarray, origin) -> np.ndarray:
        """Per-plane rows (B, planes of the searched tensor, 2) in its indices -> the grid's (B, Z, 2)."""
        on_grid = np.zeros((self.shape[0], self.shape[2], 2), dtype=np.int64)
        on_grid[:, origin[0]:origin[0] + rows.shape[1]] = np.where(rows[..., 1:] > rows[..., :1], rows + origin[1], 0)
        return on_grid

    def _searched(self, p: torch.Tensor, window):
        """(tensor, window in its coordinates, its origin in the grid) for a search of the watched
        classes inside ``window`` (grid slices): the packed copy and the window clipped to its
        region while there is one, else ``p``."""
        if self.packed is None:
            return p, window, (0,) * len(window)
        return self.packed.data, self.packed.local(self.clip(window)), tuple(r.start for r in self.packed.region)

    # -- events -----------------------------------------------------------------------------
    def radiation_fraction_(self, p: torch.Tensor, dose_gy, alpha_per_gy: float, beta_per_gy2: float, target: int,
                            hypoxia=None):
        """One radiotherapy fraction in place, on the box of the viable tumour only: the same transfer as
        :func:`treatments.radiation_fraction` (elsewhere the tumour is zero and nothing changes).

        Returns (box, killed probability on that box: (B, 1, *box's shape)) when the solver keeps
        delayed-death cohorts (``target`` is the dying channel), else None; outside the box nothing
        was killed. Without tumour the box is empty.
        """
        pr = self.pr
        box = self._nonzero_box(p, pr.tumour, self.search_window())
        keep_killed = pr.dying is not None and target == pr.dying
        if box is None:
            if not keep_killed:
                return None
            empty = tuple(slice(0, 0) for _ in self.shape[2:])
            return empty, p.new_zeros((p.shape[0], 1) + (0,) * len(empty))
        dose = dose_gy if isinstance(dose_gy, torch.Tensor) else torch.as_tensor(float(dose_gy), dtype=p.dtype,
                                                                                  device=p.device)
        region = self.current(p, box)
        dose = _crop(dose, box) if dose.dim() > 0 else dose
        if hypoxia is not None:  # outside the box the tumour share is 0: OER 1, and nothing to kill
            dose = tx.effective_dose(dose, tx.tumour_total(region, pr.tumour, pr.dying), hypoxia)
        survival = tx.linear_quadratic_survival(dose, alpha_per_gy, beta_per_gy2)
        killed = region[:, pr.tumour:pr.tumour + 1] * (1.0 - survival)
        domain = _crop(pr.domain, box)
        if domain is not None:
            killed = killed * domain
        if target != pr.tumour:
            region[:, pr.tumour:pr.tumour + 1].sub_(killed)
            region[:, target:target + 1].add_(killed)
        return (box, killed) if keep_killed else None

    def _nonzero_box(self, p: torch.Tensor, channel: int, window) -> tuple[slice, ...] | None:
        """The box of ``channel``'s non-zero voxels inside ``window`` (global slices), or None: one
        numba pass when the fused kernel is usable (floor 0: nothing is changed), else torch (a
        boolean copy and a reduction per axis: several ms per radiotherapy fraction at 240×240×155)."""
        state, window, origin = self._searched(p, window)
        if self.fused.usable:
            boxes = floored_supports_(state, [channel], window, 0.0)
            if boxes is not None:
                return shifted(boxes[channel], origin)
        return shifted(support_box_within(state.narrow(1, channel, 1), window, 0, state.shape[2:]), origin)

    # -- explicit part --------------------------------------------------------------------
    def _reaction_(self, p, dt, chemo_rate, clearable, box) -> None:
        """Growth, chemotherapy and clearance on the tumour's box (in place)."""
        pr = self.pr
        domain = _crop(pr.domain, box)
        if not is_zero(pr.growth_rate):
            self._logistic_growth_(p, dt, _crop(pr.growth_rate, box), _crop(pr.carrying_capacity, box), domain)
        if chemo_rate > 0:
            killed = p[:, pr.tumour:pr.tumour + 1] * (1.0 - math.exp(-chemo_rate * dt))
            if domain is not None:
                killed.mul_(domain)
            p[:, pr.tumour:pr.tumour + 1] -= killed
            p[:, pr.sink:pr.sink + 1] += killed
        if clearable is not None:
            rate = pr.clearance_rate_per_day
            cleared = clearable * (1.0 - math.exp(-rate * dt))
            p[:, pr.dying:pr.dying + 1] -= cleared
            p[:, pr.sink:pr.sink + 1] += cleared

    def _hook_(self, p, t, dt) -> None:
        from .solver import _visible

        pr = self.pr
        extra = pr.reaction_hook(_visible(pr, p), t)
        if pr.dying is not None:
            extra = torch.cat([extra, torch.zeros_like(extra[:, :1])], dim=1)
        if pr.domain is not None:
            extra = extra * pr.domain
        p.add_(extra, alpha=dt)

    def _logistic_growth_(self, p, dt, growth_rate, carrying_capacity, domain) -> None:
        """In place, the same transfer as :func:`treatments.logistic_growth` on single-channel buffers."""
        pr = self.pr
        viable = p[:, pr.tumour:pr.tumour + 1]
        total = viable.clone() if pr.dying is None else viable + p[:, pr.dying:pr.dying + 1]
        others = torch.sub(p.sum(dim=1, keepdim=True), total)  # tissue share available to be displaced
        gain = total.div_(carrying_capacity).neg_().add_(1.0).mul_(viable).mul_(growth_rate).mul_(dt)
        if domain is not None:
            gain.mul_(domain)
        shrink = torch.clamp(gain, max=0.0)
        growth = gain.clamp_(min=0.0)
        growth = torch.minimum(growth, others, out=growth)
        # each other tissue keeps the fraction 1 - growth/others of itself
        keep = torch.where(others > 0, growth / others.clamp(min=torch.finfo(self.dtype).tiny), 0.0).neg_().add_(1.0)
        for c in range(p.shape[1]):
            if c != pr.tumour and c != pr.dying:
                p[:, c:c + 1].mul_(keep)
        viable.add_(growth).add_(shrink)
        p[:, pr.sink:pr.sink + 1].sub_(shrink)

    def _prepare_limiter_check(self) -> None:
        """Whether the outflow limiter can ever act, from the coefficients alone.

        A face velocity of row k is |Σ_j χ_kj Δp_j| / h <= Σ_j |χ_kj| / h, since 0 <= p_j <= 1 on the
        simplex; a cell has two faces per axis, so its outflow over a step is at most
        Δt·Σ_j|χ_kj|·2·Σ_a 1/h_a² times its content. Below 1 the limiter min(1, content/outflow)
        is exactly 1 everywhere; with a margin of 2 for rounding, the step then skips it.
        """
        if not self.cross_rows:
            self.limiter_free_dt = None
            return
        reach = float(self.chi_sub.abs().sum(dim=1).max()) * 2.0 * sum(1.0 / (h * h) for h in self.spacing)
        self.limiter_free_dt = 0.5 / reach if reach > 0 else math.inf

    def _cross_increment(self, p, dt, box):
        """dp/dt of cross-diffusion at p^n (a crop) for the rows of χ that are non-zero (outflow limited),
        as (tendencies (B, rows, *box), per-row scale): row k changes by Δt·scale_k·tendency_k."""
        cross = self.pr.cross
        if self.cross_rows is None:
            return cross.tendency(p, dt), None
        rows, cols = self.cross_rows, self.cross_cols
        density = _channels(p, rows)
        mask = _crop(self.pr.domain, box)
        unlimited = dt <= self.limiter_free_dt
        if len(cols) == 1 and unlimited:
            column = self.chi_sub[:, 0]
            if bool((column < 0).all()) or bool((column > 0).all()):
                tendency = self._single_column_tendency(p[:, cols[0]:cols[0] + 1], density, mask, bool(column[0] < 0))
                return tendency, [float(c) for c in column]
        potential = torch.einsum("kj,bj...->bk...", self.chi_sub, p[:, cols])
        fluxes = self._general_fluxes(potential, density, mask)
        if not unlimited:
            self._limit_outflow_(fluxes, density, dt)
        tendency = torch.zeros_like(density)
        for (dim, h), flux in zip(self._axes(), fluxes):
            n = p.shape[dim]
            tendency.narrow(dim, 1, n - 1).add_(flux, alpha=1.0 / h)
            tendency.narrow(dim, 0, n - 1).sub_(flux, alpha=1.0 / h)
        return tendency, [1.0] * len(rows)

    def _axes(self):
        return [(2 + axis, h) for axis, h in enumerate(self.spacing)]

    def _general_fluxes(self, potential, density, mask) -> list:
        """Upwind face fluxes of every row: face velocity = difference of the row's potential / h."""
        fluxes = []
        for dim, h in self._axes():
            n = potential.shape[dim]
            v = potential.narrow(dim, 1, n - 1) - potential.narrow(dim, 0, n - 1)
            v.div_(h)
            if mask is not None:
                v.mul_(face_both_inside(mask, dim))
            flux = torch.clamp(v, min=0.0).mul_(density.narrow(dim, 0, n - 1))
            flux.add_(torch.clamp(v, max=0.0).mul_(density.narrow(dim, 1, n - 1)))
            fluxes.append(flux)
        return fluxes

    def _limit_outflow_(self, fluxes, density, dt) -> None:
        """Scale every flux by its donor cell's limiter min(1, content / (Δt·outflow)) (in place)."""
        outflow = torch.zeros_like(density)
        for (dim, h), flux in zip(self._axes(), fluxes):
            n = density.shape[dim]
            outflow.narrow(dim, 0, n - 1).add_(torch.clamp(flux, min=0.0), alpha=1.0 / h)
            outflow.narrow(dim, 1, n - 1).sub_(torch.clamp(flux, max=0.0), alpha=1.0 / h)
        outflow.mul_(dt)
        limited = outflow > density
        limiter = torch.div(density, outflow.clamp_(min=torch.finfo(self.dtype).tiny), out=outflow)
        limiter.masked_fill_(~limited, 1.0).clamp_(0.0, 1.0)
        for (dim, h), flux in zip(self._axes(), fluxes):
            n = density.shape[dim]
            flux.mul_(torch.where(flux > 0, limiter.narrow(dim, 0, n - 1), limiter.narrow(dim, 1, n - 1)))

    def _single_column_tendency(self, pushing, density, mask, repulsive: bool) -> torch.Tensor:
        """Σ_faces ±flux_k/h / χ_kj when one class j drives every row (v_k = χ_kj ∇p_j), no limiter.

        The face gradient g of p_j is computed once per axis and shared by all rows. For χ_kj < 0
        the donor of a face is the upper cell where g > 0 and the lower cell where g < 0 (the
        reverse for χ_kj > 0), so flux_k / χ_kj = a·p_k[lower] + b·p_k[upper] with (a, b) = (g⁻, g⁺)
        the negative and positive parts of g (swapped for attraction). Per cell i this sums to

            p_k(i)·G(i) + Σ_axes [a(i−½)·p_k(i−1) − b(i+½)·p_k(i+1)] / h,
            G(i) = Σ_axes [b(i−½) − a(i+½)] / h,

        where G is one channel shared by all rows: three row-sized passes fewer per axis than
        accumulating each face flux into both of its cells.
        """
        coefficient = torch.zeros_like(pushing)  # G
        faces = []
        for dim, h in self._axes():
            n = pushing.shape[dim]
            g = pushing.narrow(dim, 1, n - 1) - pushing.narrow(dim, 0, n - 1)  # h·g: 1/h² is applied below
            if mask is not None:
                g.mul_(face_both_inside(mask, dim))
            positive = torch.clamp(g, min=0.0)
            negative = g.clamp_(max=0.0)
            lower, upper = (negative, positive) if repulsive else (positive, negative)
            coefficient.narrow(dim, 1, n - 1).add_(upper, alpha=1.0 / (h * h))
            coefficient.narrow(dim, 0, n - 1).sub_(lower, alpha=1.0 / (h * h))
            faces.append((dim, h, lower, upper))
        tendency = torch.mul(density, coefficient)
        for dim, h, lower, upper in faces:
            n = density.shape[dim]
            tendency.narrow(dim, 1, n - 1).addcmul_(density.narrow(dim, 0, n - 1), lower, value=1.0 / (h * h))
            tendency.narrow(dim, 0, n - 1).addcmul_(density.narrow(dim, 1, n - 1), upper, value=-1.0 / (h * h))
        return tendency

    # -- implicit part --------------------------------------------------------------------
    def _face_weights_in(self, box) -> list:
        """Face weights restricted to the faces inside ``box`` (scalars stay scalars)."""
        if self.uniform:
            return self.weights
        cropped = []
        for axis, w in enumerate(self.weights):
            face_box = list(box)
            face_box[axis] = slice(box[axis].start, box[axis].stop - 1)
            cropped.append(_crop(w, face_box))
        return cropped

    def _laplacian_(self, u: torch.Tensor, weights, out: torch.Tensor) -> torch.Tensor:
        """out = ∇·(D∇u) for the diffused classes, accumulated face by face in place.

        Per axis: the face differences once, then w·difference added to the lower cell and
        subtracted from the upper one (``addcmul_``, no separate product pass). The first axis
        writes its lower-cell part instead of adding it to a zeroed array.
        """
        first = True
        for axis, w in enumerate(weights):
            dim = 2 + axis
            n = u.shape[dim]
            if n < 2:
                continue
            shape = self._face_shape(dim, u.shape)
            face = self.face_buffer[:math.prod(shape)].view(shape)
            torch.sub(u.narrow(dim, 1, n - 1), u.narrow(dim, 0, n - 1), out=face)
            if first:
                torch.mul(face, w, out=out.narrow(dim, 0, n - 1))
                out.narrow(dim, n - 1, 1).zero_()
                first = False
            else:
                out.narrow(dim, 0, n - 1).addcmul_(face, w)
            out.narrow(dim, 1, n - 1).addcmul_(face, w, value=-1.0)
        if first:
            out.zero_()
        return out

    def _implicit_diffusion_(self, p: torch.Tensor, dt: float, box) -> None:
        """Jacobi sweeps on the diffused classes inside ``box`` (outside it they are exactly zero)."""
        region = _crop(p, box)
        shape = (p.shape[0], len(self.diffused)) + tuple(region.shape[2:])
        numel = math.prod(shape)
        rhs, u, lap = (buf[:numel].view(shape) for buf in (self.rhs, self.u, self.lap))
        for i, c in enumerate(self.diffused):
            rhs[:, i].copy_(region[:, c])
        u.copy_(rhs)
        diag = self._diag if self.pr.jacobi_variant == "conservative" else _crop(self._diag, box)
        scale = self.pr.omega / (1.0 + dt * diag)
        weights = self._face_weights_in(box)
        for _ in range(self.pr.jacobi_iters):
            self._laplacian_(u, weights, lap)
            residual = torch.add(rhs, lap, alpha=dt, out=lap).sub_(u)  # rhs - (u - Δt L u)
            u.addcmul_(residual, scale)
        for i, c in enumerate(self.diffused):
            region[:, c].copy_(u[:, i])

    # -- projection -----------------------------------------------------------------------
    def _project_off_simplex_(self, p: torch.Tensor, box) -> None:
        """Project the voxels of ``box`` that are off the simplex; the others are left exactly as they are."""
        region = _crop(p, box)
        domain = _crop(self.pr.domain, box)
        total = region.sum(dim=1)
        off = total.sub_(1.0).abs_() > self.slack
        off |= region.amin(dim=1) < 0
        if domain is not None:
            off &= domain[:, 0] > 0
        n_off = int(off.sum())
        if n_off == 0:
            return
        if n_off > off.numel() // 4 or not p.is_contiguous():
            # mostly off: project contiguous lanes in place, with θ = 0 where already on the simplex
            theta = simplex_threshold(region, dim=1)
            theta.masked_fill_(~off.unsqueeze(1), 0.0)
            region.sub_(theta).clamp_(min=0.0)  # on-simplex voxels: x - 0 = x and x >= 0, unchanged
            return
        self._project_gathered_(p, box, off)

    def _project_gathered_(self, p: torch.Tensor, box, off: torch.Tensor) -> None:
        """Gather the off-simplex voxels of each batch item by linear index, project, scatter back."""
        spatial = self.shape[2:]
        strides = [math.prod(spatial[a + 1:]) for a in range(len(spatial))]
        index = off.nonzero()  # (n, 1 + ndim): batch item, then local coordinates in the box
        linear = torch.zeros(index.shape[0], dtype=torch.long, device=index.device)
        for a, (b, stride) in enumerate(zip(box, strides)):
            linear.add_(index[:, 1 + a] + b.start, alpha=stride)
        flat = p.view(p.shape[0], p.shape[1], -1)
        for item in range(p.shape[0]):
            lin = linear if p.shape[0] == 1 else linear[index[:, 0] == item]
            if lin.numel() == 0:
                continue
            lanes = torch.stack([flat[item, c].index_select(0, lin) for c in range(p.shape[1])])  # (K, n)
            lanes.sub_(simplex_threshold(lanes, dim=0)).clamp_(min=0.0)
            for c in range(p.shape[1]):
                flat[item, c].index_copy_(0, lin, lanes[c])


class PackedState:
    """A compact copy of the state on a region of the grid, which the fused kernel steps instead of
    the grid-sized tensor (see the module docstring), with the delayed-death buffers the kernel
    reads and writes on the same region.

    Attributes:
        region: the grid slices it covers.
        data: (B, C, *region's shape), contiguous: the state's current values there.
        dying_before, clearable: (B, 1, *region's shape), or None without a dying channel.
    """

    def __init__(self, p: torch.Tensor, region, dying: bool):
        self.region = tuple(region)
        self.data = _crop(p, self.region).contiguous()
        shape = (p.shape[0], 1) + tuple(self.data.shape[2:])
        self.dying_before = p.new_zeros(shape) if dying else None
        self.clearable = p.new_zeros(shape) if dying else None

    def holds(self, box) -> bool:
        return contains(self.region, box)

    def local(self, box) -> tuple[slice, ...]:
        """``box`` (grid slices, inside the region) in the region's coordinates."""
        return relative(box, self.region)

    def take_clearable(self, source: torch.Tensor, source_region, box) -> None:
        """Copy the clearable cells of ``source`` (a buffer covering ``source_region`` of the grid) on
        ``box`` (grid slices, inside ``source_region``): the part inside this region."""
        inside = intersection(box, self.region)
        if inside is not None:
            _crop(self.clearable, self.local(inside)).copy_(_crop(source, relative(inside, source_region)))


def _true_box(mask: torch.Tensor) -> tuple[slice, ...] | None:
    """Slices of the bounding box of the True voxels of a boolean array, or None if there are none."""
    profiles = _axis_profiles(mask)
    slices = []
    for line in profiles:
        idx = torch.nonzero(line).flatten()
        if idx.numel() == 0:
            return None
        slices.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(slices)


def _axis_profiles(mask: torch.Tensor) -> list[torch.Tensor]:
    """Per axis, whether any element of each slice across it is True (two passes over the array)."""
    if mask.dim() == 1:
        return [mask]
    last = mask.flatten(0, -2).any(dim=0)
    return _axis_profiles(mask.any(dim=-1)) + [last]


def support_box(channels: torch.Tensor, margin: int) -> tuple[slice, ...] | None:
    """Spatial slices of the bounding box of the non-zero voxels of ``channels`` (B, C, *S), grown
    by ``margin`` voxels and clipped to the grid; None when every voxel is zero."""
    nonzero = channels.ne(0).any(dim=1).any(dim=0)  # (*S)
    local = _true_box(nonzero)
    if local is None:
        return None
    return dilate(local, margin, tuple(nonzero.shape))


def support_box_within(channels: torch.Tensor, window, margin: int, spatial_shape) -> tuple[slice, ...] | None:
    """Like :func:`support_box`, searching only inside ``window`` (global slices), which must contain
    every non-zero voxel; the margin is added in global coordinates and clipped to the grid."""
    local = support_box(_crop(channels, window), margin=0)
    if local is None:
        return None
    return tuple(slice(max(0, w.start + l.start - margin), min(n, w.start + l.stop + margin))
                 for w, l, n in zip(window, local, spatial_shape))


def _channels(p: torch.Tensor, channels: list[int]) -> torch.Tensor:
    """p[:, channels] as a view when the channels are consecutive, else a copy."""
    if channels == list(range(channels[0], channels[0] + len(channels))):
        return p.narrow(1, channels[0], len(channels))
    return p[:, channels]


def _crop(t: torch.Tensor | None, box) -> torch.Tensor | None:
    """The (B, C, *box) view of a field, or the tensor itself if it has no spatial extent."""
    if t is None or all(n == 1 for n in t.shape[2:]):
        return t
    return t[(slice(None), slice(None)) + tuple(box)]
