"""The no-grad inference path of the IMEX step: same scheme as the reference path, no allocations.

When nothing needs gradients the solver runs each step through :class:`InferenceStepper`,
which works in place on a private copy of the state and on buffers allocated once per solve.
Fresh multi-hundred-MB tensors cost page faults on every allocation, so on a 240×240×155×5
grid the allocating reference path spends most of its time there.

It computes the same step as :mod:`AnatomyDTLib.solver` (tested to agree within rounding); the
step lengths — landing on events, and the sub-steps that keep the explicit cross-diffusion below
its stability limit — are chosen by the solver's integrator, which both paths share. The exact
economies:

* classes with D_k = 0 are not diffused (their implicit solve is the identity);
* cross-diffusion only touches the rows and columns of χ that are non-zero;
* the simplex projection is applied only to voxels that left the simplex (channel sum off 1
  by more than the dtype's tolerance, or a negative value); the others are already on it;
* every term is evaluated on the bounding box of where it can be non-zero: growth where there is
  tumour, cross-diffusion where its driving classes are non-zero (plus one voxel: outside, their
  gradient is exactly zero), diffusion where the diffused classes are non-zero plus m voxels (m
  Jacobi sweeps spread by at most m voxels). These boxes are exact, not thresholds; denormal
  floats are flushed to zero during the solve (values below ~1e-38 in float32), which keeps
  decaying tails from spreading the boxes and avoids the CPU's slow denormal arithmetic.
"""

from __future__ import annotations

import math

import torch

from . import treatments as tx
from .operators import face_both_inside, face_harmonic_mean
from .simplex import project_to_simplex

_SIMPLEX_SLACK = {torch.float32: 2e-7, torch.float64: 1e-13}


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
        n_face = max(int(math.prod(self._face_shape(d, (1, 1) + self.shape[2:]))) for d in range(2, len(self.shape)))
        self.face_buffer = torch.empty(n_face * self.shape[0] * max(1, len(self.diffused)), dtype=self.dtype,
                                       device=self.device)
        self.slack = _SIMPLEX_SLACK.get(self.dtype, 1e-6)
        self.full_box = tuple(slice(0, n) for n in self.shape[2:])
        self.tumour_like = [problem.tumour] + ([problem.dying] if problem.dying is not None else [])
        # Every support this stepper looks for lies inside ``window``; it grows by at most
        # m + 1 voxels per step (m Jacobi sweeps, one upwind face), so each step searches only there.
        self.window = self.full_box
        # Start exactly on the simplex: p0 is accepted within a small tolerance, and later steps only
        # re-project the voxels they change.
        self._project_off_simplex_(state, problem.domain)

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
        window = _dilate(self.window, pr.jacobi_iters + 2, spatial)
        changed = None  # the box of every voxel this step may change
        cross = None
        if pr.cross is not None:
            box = self.full_box if self.cross_rows is None else support_box_within(p[:, self.cross_cols], window, 1, spatial)
            if box is not None:
                cross = (box, self._cross_increment(_crop(p, box), dt, box))
                changed = _union(changed, box)
        tumour_box = support_box_within(p[:, self.tumour_like], window, 0, spatial)
        if tumour_box is not None:
            self._reaction_(_crop(p, tumour_box), dt, chemo_rate, _crop(clearable, tumour_box), tumour_box)
            changed = _union(changed, tumour_box)
        if pr.reaction_hook is not None:  # a learned term can act anywhere
            self._hook_(p, t, dt)
            changed = self.full_box
        if cross is not None:
            box, increment = cross
            _crop(p, box)[:, self.cross_rows] += dt * increment
        if self.diffused:
            box = support_box_within(p[:, self.diffused], window, pr.jacobi_iters + 1, spatial)
            if box is not None:
                self._implicit_diffusion_(p, dt, box)
                changed = _union(changed, box)
        self.window = changed if changed is not None else self.window
        if pr.dying is not None:  # the integrator keeps delayed-death cohorts consistent with the projection
            self.dying_before_projection = p[:, pr.dying:pr.dying + 1].clone()
        if changed is not None:
            self._project_off_simplex_(_crop(p, changed), _crop(pr.domain, changed))
        return p

    # -- explicit part --------------------------------------------------------------------
    def _reaction_(self, p, dt, chemo_rate, clearable, box) -> None:
        """Growth, chemotherapy and clearance on the tumour's box (in place)."""
        pr = self.pr
        domain = _crop(pr.domain, box)
        if not _is_zero(pr.growth_rate):
            self._logistic_growth_(p, dt, _crop(pr.growth_rate, box), _crop(pr.carrying_capacity, box), domain)
        if chemo_rate > 0:
            killed = p[:, pr.tumour:pr.tumour + 1] * (1.0 - math.exp(-chemo_rate * dt))
            if domain is not None:
                killed.mul_(domain)
            p[:, pr.tumour:pr.tumour + 1] -= killed
            p[:, pr.sink:pr.sink + 1] += killed
        if clearable is not None:
            rate = pr.plan.radiotherapy.delayed_death.clearance_rate_per_day
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

    def _cross_increment(self, p, dt, box) -> torch.Tensor:
        """dp/dt of cross-diffusion at p^n (a crop) for the rows of χ that are non-zero (outflow limited)."""
        cross = self.pr.cross
        if self.cross_rows is None:
            return cross.tendency(p, dt)
        rows, cols = self.cross_rows, self.cross_cols
        if len(cols) == 1:
            potential = p[:, cols] * self.chi_sub.reshape((1, len(rows)) + (1,) * (p.dim() - 2))
        else:
            potential = torch.einsum("kj,bj...->bk...", self.chi_sub, p[:, cols])
        density = p[:, rows]
        mask = _crop(self.pr.domain, box)
        fluxes = []
        outflow = torch.zeros_like(density)
        for axis, h in enumerate(self.spacing):
            dim = 2 + axis
            n = p.shape[dim]
            v = potential.narrow(dim, 1, n - 1) - potential.narrow(dim, 0, n - 1)
            v.div_(h)
            if mask is not None:
                v.mul_(face_both_inside(mask, dim))
            flux = torch.clamp(v, min=0.0).mul_(density.narrow(dim, 0, n - 1))
            flux.add_(torch.clamp(v, max=0.0).mul_(density.narrow(dim, 1, n - 1)))
            del v
            outflow.narrow(dim, 0, n - 1).add_(torch.clamp(flux, min=0.0), alpha=1.0 / h)
            outflow.narrow(dim, 1, n - 1).add_(torch.clamp(flux, max=0.0), alpha=-1.0 / h)
            fluxes.append(flux)
        outflow.mul_(dt)
        limiter = torch.where(outflow > density, density / outflow.clamp(min=torch.finfo(self.dtype).tiny), 1.0)
        limiter.clamp_(0.0, 1.0)
        tendency = torch.zeros_like(density)
        for axis, (h, flux) in enumerate(zip(self.spacing, fluxes)):
            dim = 2 + axis
            n = p.shape[dim]
            flux.mul_(torch.where(flux > 0, limiter.narrow(dim, 0, n - 1), limiter.narrow(dim, 1, n - 1)))
            tendency.narrow(dim, 1, n - 1).add_(flux, alpha=1.0 / h)
            tendency.narrow(dim, 0, n - 1).sub_(flux, alpha=1.0 / h)
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
        """out = ∇·(D∇u) for the diffused classes, accumulated face by face in place."""
        out.zero_()
        for axis, w in enumerate(weights):
            dim = 2 + axis
            n = u.shape[dim]
            if n < 2:
                continue
            shape = self._face_shape(dim, u.shape)
            face = self.face_buffer[:math.prod(shape)].view(shape)
            torch.sub(u.narrow(dim, 1, n - 1), u.narrow(dim, 0, n - 1), out=face)
            face.mul_(w)
            out.narrow(dim, 0, n - 1).add_(face)
            out.narrow(dim, 1, n - 1).sub_(face)
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
            lap.mul_(dt).add_(rhs).sub_(u)  # residual: rhs - (u - Δt L u)
            lap.mul_(scale)
            u.add_(lap)
        for i, c in enumerate(self.diffused):
            region[:, c].copy_(u[:, i])

    # -- projection -----------------------------------------------------------------------
    def _project_off_simplex_(self, p: torch.Tensor, domain) -> None:
        """Project the voxels that are off the simplex; the others are left exactly as they are."""
        total = p.sum(dim=1)
        off = (total - 1.0).abs_() > self.slack
        off |= (p < 0).any(dim=1)
        if domain is not None:
            off &= domain[:, 0] > 0
        n_off = int(off.sum())
        if n_off == 0:
            return
        if n_off > off.numel() // 4:  # mostly off: projecting contiguous lanes beats gather/scatter
            projected = project_to_simplex(p, dim=1)
            p.copy_(torch.where(off.unsqueeze(1), projected, p))
            return
        moved = p.movedim(1, -1)[off]  # (n_off, K)
        p.movedim(1, -1)[off] = project_to_simplex(moved, dim=1)


def support_box(channels: torch.Tensor, margin: int) -> tuple[slice, ...] | None:
    """Spatial slices of the bounding box of the non-zero voxels of ``channels`` (B, C, *S), grown
    by ``margin`` voxels and clipped to the grid; None when every voxel is zero."""
    nonzero = channels.ne(0).any(dim=1).any(dim=0)  # (*S)
    slices = []
    for axis in range(nonzero.dim()):
        others = tuple(a for a in range(nonzero.dim()) if a != axis)
        line = nonzero.any(dim=others) if others else nonzero
        idx = torch.nonzero(line).flatten()
        if idx.numel() == 0:
            return None
        lo = max(0, int(idx[0]) - margin)
        hi = min(line.numel(), int(idx[-1]) + 1 + margin)
        slices.append(slice(lo, hi))
    return tuple(slices)


def support_box_within(channels: torch.Tensor, window, margin: int, spatial_shape) -> tuple[slice, ...] | None:
    """Like :func:`support_box`, searching only inside ``window`` (global slices), which must contain
    every non-zero voxel; the margin is added in global coordinates and clipped to the grid."""
    local = support_box(_crop(channels, window), margin=0)
    if local is None:
        return None
    return tuple(slice(max(0, w.start + l.start - margin), min(n, w.start + l.stop + margin))
                 for w, l, n in zip(window, local, spatial_shape))


def _dilate(box, margin: int, spatial_shape):
    return tuple(slice(max(0, b.start - margin), min(n, b.stop + margin)) for b, n in zip(box, spatial_shape))


def _crop(t: torch.Tensor | None, box) -> torch.Tensor | None:
    """The (B, C, *box) view of a field, or the tensor itself if it has no spatial extent."""
    if t is None or all(n == 1 for n in t.shape[2:]):
        return t
    return t[(slice(None), slice(None)) + tuple(box)]


def _union(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _is_zero(value: torch.Tensor) -> bool:
    return not bool((value != 0).any())
