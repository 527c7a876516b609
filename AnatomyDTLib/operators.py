"""Finite-volume operators of the PDE on a regular grid with physical spacing.

All fields are shaped (B, C, *S) with 2 or 3 spatial axes S. A *face* along spatial axis ``a``
sits between cells i and i+1; face arrays are one shorter than the grid along that axis.
Fluxes through the outer faces of the grid are zero (no-flux boundaries); an optional brain
mask adds no-flux faces wherever a face has an outside cell on either side.

Units: spacing h in mm, diffusion D in mm²/day, so face weights w = D_face / h² are in 1/day.

Why flux form: every operator here is written as a difference of face fluxes, so whatever
leaves one cell enters its neighbour — class mass is conserved to rounding error by
construction, with any spacing, mask or coefficient field.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

_DEMAND_FLOOR = 1e-12  # demands (content fractions) below this are not limited; see the cross-diffusion limiter


def spatial_dims(field: torch.Tensor) -> range:
    """Tensor dimensions of the spatial axes of a (B, C, *S) field."""
    return range(2, field.dim())


def face_difference(u: torch.Tensor, dim: int) -> torch.Tensor:
    """u[i+1] - u[i] along ``dim`` (one value per interior face)."""
    n = u.shape[dim]
    return u.narrow(dim, 1, n - 1) - u.narrow(dim, 0, n - 1)


def face_mean(u: torch.Tensor, dim: int) -> torch.Tensor:
    """Arithmetic mean of the two cells beside each face along ``dim``."""
    n = u.shape[dim]
    return 0.5 * (u.narrow(dim, 1, n - 1) + u.narrow(dim, 0, n - 1))


def face_harmonic_mean(u: torch.Tensor, dim: int) -> torch.Tensor:
    """Harmonic mean 2ab/(a+b) of the cells beside each face; 0 when either side is 0.

    The harmonic mean is the standard face diffusivity for heterogeneous media: it is the exact
    series conductance of two half-cells, and it makes a face with a zero-diffusivity cell on
    either side a no-flux face (used for the brain mask). Inputs are >= 0.
    """
    n = u.shape[dim]
    a = u.narrow(dim, 1, n - 1)
    b = u.narrow(dim, 0, n - 1)
    tiny = torch.finfo(u.dtype).tiny
    if u.requires_grad and torch.is_grad_enabled():
        return 2.0 * a * b / (a + b).clamp(min=tiny)  # a = b = 0 gives 0/tiny = 0
    # the same operations in the same order, with two face-sized buffers instead of five
    # (a 1 mm brain grid builds these faces once per forecast)
    mean = a * b
    mean.mul_(2.0)
    denominator = a + b
    return mean.div_(denominator.clamp_(min=tiny))


def face_both_inside(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Float face mask: 1 where both cells beside the face are inside the domain mask."""
    n = mask.shape[dim]
    return (mask.narrow(dim, 1, n - 1) * mask.narrow(dim, 0, n - 1)).to(mask.dtype)


def _outer_face(face_values: torch.Tensor, dim: int) -> torch.Tensor:
    """Zeros shaped like one layer of faces along ``dim``: the value of a grid's outer face. Built
    from the shape, so that an axis one cell thick (no inner faces, an empty tensor) works too."""
    shape = list(face_values.shape)
    shape[dim] = 1
    return face_values.new_zeros(shape)


def flux_divergence(face_flux: torch.Tensor, dim: int) -> torch.Tensor:
    """Net inflow per cell, F_{i-1/2} - F_{i+1/2}, with zero flux through the grid's outer faces.

    ``face_flux`` holds F_{i+1/2}, positive in the +``dim`` direction. Returns a cell-shaped tensor.
    """
    zero = _outer_face(face_flux, dim)
    padded = torch.cat([zero, face_flux, zero], dim=dim)
    n = padded.shape[dim]
    return padded.narrow(dim, 0, n - 1) - padded.narrow(dim, 1, n - 1)


def add_flux_divergence_(acc: torch.Tensor, face_flux: torch.Tensor, dim: int, scale: float = 1.0) -> torch.Tensor:
    """In-place ``acc += scale * (F_{i-1/2} - F_{i+1/2})`` for the buffer-reusing inference path."""
    n = acc.shape[dim]
    acc.narrow(dim, 1, n - 1).add_(face_flux, alpha=scale)
    acc.narrow(dim, 0, n - 1).sub_(face_flux, alpha=scale)
    return acc


class DiffusionOperator:
    """The self-diffusion operator L_k u = ∇·(D_k(x) ∇u) of the classes that diffuse, in flux form.

    Built once per solve from the diffusion coefficients, the spacing and the optional mask.
    Only the *active* classes are stored and solved: those whose D is not identically zero, or
    all classes when D requires gradients (a zero D can become non-zero in training). For the
    others the implicit solve is the identity. Uniform per-class coefficients without a mask keep
    scalar face weights (no face arrays).

    Args:
        diffusion: (B|1, C, *S) or (1, C, 1, ..., 1) tensor of D in mm²/day, >= 0.
        spacing: mm per spatial axis, in the tensor's axis order.
        mask: optional (B|1, 1, *S) float tensor, 1 inside the domain, 0 outside.
        spatial_shape: the grid's shape (needed for the diagonal of uniform coefficients).
    """

    def __init__(self, diffusion: torch.Tensor, spacing: Sequence[float], mask: torch.Tensor | None = None,
                 spatial_shape: Sequence[int] | None = None):
        self.spacing = tuple(float(h) for h in spacing)
        self.num_channels = diffusion.shape[1]
        self.spatial_shape = tuple(spatial_shape) if spatial_shape is not None else tuple(diffusion.shape[2:])
        if diffusion.requires_grad:
            active = list(range(self.num_channels))
        else:
            flat = diffusion.detach().transpose(0, 1).reshape(self.num_channels, -1)
            active = [c for c in range(self.num_channels) if bool((flat[c] != 0).any())]
        self.active = active
        self.active_index = torch.tensor(active, dtype=torch.long, device=diffusion.device)
        d = diffusion.index_select(1, self.active_index) if len(active) < self.num_channels else diffusion
        self.uniform = mask is None and all(s == 1 for s in d.shape[2:])
        if not self.uniform:
            if all(s == 1 for s in d.shape[2:]):
                d = d.expand(*d.shape[:2], *self.spatial_shape)
            if mask is not None:
                d = d * mask
        self.face_weights = []
        for axis, h in enumerate(self.spacing):
            if self.uniform:
                self.face_weights.append(d / (h * h))
            else:
                w = face_harmonic_mean(d, 2 + axis)
                self.face_weights.append(w / (h * h) if w.requires_grad else w.div_(h * h))
        self._diagonal = None
        self._max_diagonal = None

    @property
    def diagonal(self) -> torch.Tensor:
        """c_i = sum of the weights of cell i's faces (1/day) for the active classes; the matrix
        diagonal is 1 + Δt·c. Computed on first use."""
        if self._diagonal is None:
            total = scratch = None
            for axis, w in enumerate(self.face_weights):
                dim = 2 + axis
                n = self.spatial_shape[axis]
                if self.uniform:
                    face_shape = [1] * (2 + len(self.spatial_shape))
                    face_shape[dim] = n - 1
                    faces = torch.ones(face_shape, dtype=w.dtype, device=w.device)
                    part = _face_sum(faces, dim, n) * w  # 2 faces inside, 1 at the grid's ends
                    total = part if total is None else total + part
                else:  # in place (autograd follows it), the same sums in the same order: (z + y) + x
                    cells = list(w.shape)
                    cells[dim] = n
                    if total is None:
                        total = _face_sum_(w.new_zeros(cells), w, dim, n)
                    else:
                        scratch = w.new_zeros(cells) if scratch is None else scratch.zero_()
                        total.add_(_face_sum_(scratch, w, dim, n))
            self._diagonal = total
        return self._diagonal

    def max_diagonal(self) -> torch.Tensor:
        """max_i c_i per (batch, active class): the uniform scaling of the conservative Jacobi sweep."""
        if self._max_diagonal is None:
            if self.uniform:  # interior cells have both faces on every axis of length > 2
                total = None
                for axis, w in enumerate(self.face_weights):
                    faces = 2.0 if self.spatial_shape[axis] > 2 else float(self.spatial_shape[axis] - 1)
                    total = w * faces if total is None else total + w * faces
                self._max_diagonal = total
            else:
                c = self.diagonal
                self._max_diagonal = c.flatten(2).amax(dim=2).reshape(*c.shape[:2], *([1] * (c.dim() - 2)))
        return self._max_diagonal

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """L u = ∇·(D ∇u) for a tensor holding the *active* classes only (1/day × u), no-flux faces."""
        total = None
        for axis, w in enumerate(self.face_weights):
            dim = 2 + axis
            flux = w * face_difference(u, dim)  # diffusive flux towards +dim is -D∇u; L u = -(div of it)
            part = -flux_divergence(flux, dim)
            total = part if total is None else total + part
        return total


def _face_sum_(out: torch.Tensor, face_values: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """``out += _face_sum(face_values, dim, n)`` for a zeroed ``out``, without the padded copy:
    each cell gets its upper face's value, then its lower face's (a + b = b + a exactly)."""
    out.narrow(dim, 0, n - 1).add_(face_values)
    out.narrow(dim, 1, n - 1).add_(face_values)
    return out


def _face_sum(face_values: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """Per cell, the sum of the values on its two faces along ``dim`` (outer faces count as 0). An
    axis of one cell has no faces (``face_values`` is empty along ``dim``): every sum is 0."""
    zero = _outer_face(face_values, dim)
    padded = torch.cat([zero, face_values, zero], dim=dim)
    return padded.narrow(dim, 0, n) + padded.narrow(dim, 1, n)


def jacobi_solve(operator: DiffusionOperator, rhs: torch.Tensor, dt: float, iterations: int, omega: float,
                 variant: str = "conservative", initial: torch.Tensor | None = None) -> torch.Tensor:
    """Approximate the implicit diffusion solve (I - Δt L) u = rhs by ``iterations`` unrolled sweeps.

    Each sweep is u ← u + ω·(rhs - (u - Δt L u)) / d with

    * ``variant="classic"``: d = 1 + Δt c_i, the local diagonal — textbook weighted Jacobi.
    * ``variant="conservative"`` (default): d = 1 + Δt max_i c_i, one scale per class. In regions
      of uniform D this is identical to classic Jacobi. Where the diagonal varies (mask borders,
      tissue-dependent D) it still sums the residual exactly to zero, so every sweep conserves
      each class's mass to rounding error, which classic Jacobi does not.

    For 0 < ω <= 1 both variants write each sweep as a non-negative combination of rhs and
    neighbouring values with weights summing to one, so they keep u >= 0 and are stable for any
    Δt (unconditional stability of the implicit diffusion). The sweeps are plain tensor ops and
    therefore differentiable; gradients flow through all of them.
    """
    if not operator.active:
        return rhs
    full = rhs
    if len(operator.active) < operator.num_channels:
        rhs = rhs.index_select(1, operator.active_index)
        initial = None if initial is None else initial.index_select(1, operator.active_index)
    if variant == "classic":
        scale = omega / (1.0 + dt * operator.diagonal)
    elif variant == "conservative":
        scale = omega / (1.0 + dt * operator.max_diagonal())
    else:
        raise ValueError(f"Unknown Jacobi variant {variant!r}; use 'conservative' or 'classic'.")
    u = rhs if initial is None else initial
    for _ in range(iterations):
        residual = rhs - u + dt * operator.apply(u)
        u = u + scale * residual
    if len(operator.active) < operator.num_channels:
        return full.index_copy(1, operator.active_index, u)  # classes with D = 0 are unchanged
    return u


class CrossDiffusionOperator:
    """Explicit cross-diffusion  -∇·( Σ_{j≠k} χ_kj(x) p_k ∇p_j )  of Eq. 2, in flux form.

    Sign convention (exactly Eq. 2 of the paper): the flux of class k is J_k = +p_k Σ_j χ_kj ∇p_j,
    so class k drifts with velocity v_k = Σ_j χ_kj ∇p_j (mm/day for χ in mm²/day):

    * χ_kj > 0 — class k moves *up* the gradient of class j (attraction, Keller–Segel sign);
    * χ_kj < 0 — class k is pushed *away* from class j (avoidance, e.g. ventricles pushed by tumour
      mass effect).

    Discretisation: face velocities from centred face differences of p_j; the advected density
    p_k is taken from the upwind cell (first-order donor-cell upwinding). For a *frozen*
    velocity this is monotone and keeps p_k >= 0 when Δt·Σ|outflow velocities|/h <= 1. To stay
    positive for *any* Δt, the outflow of every cell is limited to its content: all fluxes
    leaving a cell are scaled by min(1, p_k / (Δt·outflow)) — a continuous (Lipschitz) factor,
    inactive below that limit. A limited flux still leaves one cell and enters its neighbour, so
    the term conserves every class's mass. Faces with an outside-mask cell carry no flux.

    Why it is stable, and when: positivity and the simplex projection bound every value in
    [0, 1] whatever Δt, but boundedness is not stability. The velocity is itself a gradient, so
    the term is of *second* order in p_j, and the simplex projection, which removes the channel
    sum's excess from all classes present, feeds the pushed class's explicit pile-up back into
    the pushing class. In a mixture of two classes j, k the projected step has the exact
    linear amplification factor (frozen coefficients, mode with -Δ_h symbol σ, x = Δt·σ)

        g = ½ [ R_j(x)·(1 − x χ_jk p_j) + R_k(x)·(1 − x χ_kj p_k) ],

    R_c the damping of class c's implicit diffusion (its m Jacobi sweeps). The continuous
    problem is well-posed only if D_j + D_k + χ_kj >= 0 for every pair (the projected
    diffusivity ½(D_j + D_k + χ_kj p_k + χ_jk p_j) is then >= 0), and the step is stable only
    if |g| <= 1 for every σ up to the grid's largest: a parabolic limit Δt = O(h²/|χ|), not the
    hyperbolic CFL above. :func:`cross_diffusion_stability` evaluates both; the solver warns
    about ill-posed coefficients and shortens its steps to the stable Δt (docs/solver.md,
    "Cross-diffusion: well-posedness and the explicit step limit").
    """

    def __init__(self, chi: torch.Tensor, spacing: Sequence[float], mask: torch.Tensor | None = None):
        # chi: (C, C) constant, or (B|1, C, C, *S) spatial; diagonal ignored (zeroed by the caller).
        self.spacing = tuple(float(h) for h in spacing)
        self.spatial = chi.dim() > 2
        self.chi = chi
        self.mask = mask
        self.face_chi = None
        if self.spatial:
            self.face_chi = [face_mean(chi.flatten(1, 2), 2 + a).unflatten(1, chi.shape[1:3]) for a in range(len(self.spacing))]

    def _face_velocity(self, p: torch.Tensor, axis: int) -> torch.Tensor:
        """v_k on the faces along ``axis``: Σ_j χ_kj (p_j[i+1] - p_j[i]) / h (mm/day)."""
        dim = 2 + axis
        h = self.spacing[axis]
        if not self.spatial:
            potential = torch.einsum("kj,bj...->bk...", self.chi, p)
            velocity = face_difference(potential, dim) / h
        else:
            grad = face_difference(p, dim) / h
            velocity = torch.einsum("bkj...,bj...->bk...", self.face_chi[axis], grad)
        if self.mask is not None:
            velocity = velocity * face_both_inside(self.mask, dim)
        return velocity

    def tendency(self, p: torch.Tensor, dt: float) -> torch.Tensor:
        """dp/dt from cross-diffusion at state ``p``, outflow-limited for the step ``dt`` (days)."""
        raw_fluxes = []
        outflow = torch.zeros_like(p)
        for axis, h in enumerate(self.spacing):
            dim = 2 + axis
            n = p.shape[dim]
            v = self._face_velocity(p, axis)
            upwind_lo = p.narrow(dim, 0, n - 1)  # donor when v > 0 (flow towards +dim)
            upwind_hi = p.narrow(dim, 1, n - 1)  # donor when v < 0
            flux = torch.clamp(v, min=0.0) * upwind_lo + torch.clamp(v, max=0.0) * upwind_hi
            raw_fluxes.append(flux)
            out_plus = torch.clamp(flux, min=0.0) / h   # leaves cell i through its +face
            out_minus = torch.clamp(-flux, min=0.0) / h  # leaves cell i+1 through its -face
            outflow = outflow + scatter_face_to_cells(out_plus, out_minus, dim)
        demand = dt * outflow
        # Limit only demands above the content and above 1e-12: dividing by a denormal demand
        # makes the backward pass multiply inf by 0 (NaN gradients after a few days of rollout).
        # Unlimited demands below 1e-12 overshoot by at most 1e-12, which the projection removes.
        limit = demand > torch.clamp(p, min=_DEMAND_FLOOR)
        limiter = torch.where(limit, torch.clamp(p, min=0.0) / torch.where(limit, demand, torch.ones_like(demand)),
                              torch.ones_like(p))
        limiter = torch.clamp(limiter, 0.0, 1.0)
        total = None
        for axis, (h, flux) in enumerate(zip(self.spacing, raw_fluxes)):
            dim = 2 + axis
            n = p.shape[dim]
            donor_factor = torch.where(flux > 0, limiter.narrow(dim, 0, n - 1), limiter.narrow(dim, 1, n - 1))
            part = flux_divergence(flux * donor_factor, dim) / h
            total = part if total is None else total + part
        return total


def scatter_face_to_cells(to_lower_cell: torch.Tensor, to_upper_cell: torch.Tensor, dim: int) -> torch.Tensor:
    """Cell array where cell i gets ``to_lower_cell`` of face i+1/2 and cell i+1 gets ``to_upper_cell``."""
    zero = _outer_face(to_lower_cell, dim)
    return torch.cat([to_lower_cell, zero], dim=dim) + torch.cat([zero, to_upper_cell], dim=dim)


def jacobi_contraction(dt: float, max_diffusion: float, spacing: Sequence[float]) -> float:
    """Per-sweep error reduction of smooth modes in the implicit diffusion solve: Δt·c / (1 + Δt·c).

    c = 2·D_max·Σ_a 1/h_a² (1/day) is the largest diagonal of the diffusion operator. After m
    sweeps the implicit solve still carries about contraction**m of the diffusion increment as
    error: the scheme stays stable for any Δt, but it is only accurate when that is small.
    """
    c = 2.0 * max_diffusion * sum(1.0 / (h * h) for h in spacing)
    return dt * c / (1.0 + dt * c)


def recommended_jacobi_iters(dt: float, max_diffusion: float, spacing: Sequence[float], tolerance: float = 0.05,
                             minimum: int = 2, maximum: int = 50) -> int:
    """Smallest number of Jacobi sweeps m with contraction**m <= ``tolerance`` (clipped to [minimum, maximum]).

    Example: brain defaults D = 0.1 mm²/day, 1 mm voxels, Δt = 1 day give c = 0.6/day, contraction 0.375,
    and m = 4 for 5 %; the paper's m = 2 leaves about 14 % of each step's diffusion unresolved.
    """
    rho = jacobi_contraction(dt, max_diffusion, spacing)
    if rho <= 0:
        return minimum
    m = math.ceil(math.log(tolerance) / math.log(rho))
    return int(min(maximum, max(minimum, m)))


# --------------------------------------------------------------------------------------------
# Cross-diffusion under the simplex projection: well-posedness and the explicit step limit
# --------------------------------------------------------------------------------------------

_MAX_COEFFICIENT_ROWS = 4096  # distinct (D_j, D_k, χ_kj) combinations evaluated per class pair
_SYMBOL_SAMPLES = 256


def largest_symbol(spacing: Sequence[float], spatial_shape: Sequence[int]) -> float:
    """σ_max (1/mm²): the largest eigenvalue of the discrete -Δ_h with no-flux faces on the grid.

    Along an axis of n cells of width h it is 4·sin²((n−1)π/(2n)) / h², just below 4/h² (the
    checkerboard mode); the axes add.
    """
    total = 0.0
    for h, n in zip(spacing, spatial_shape):
        if n > 1:
            total += 4.0 * math.sin((n - 1) * math.pi / (2 * n)) ** 2 / (float(h) ** 2)
    return total


def jacobi_damping(x: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, iterations: int) -> torch.Tensor:
    """The factor R by which :func:`jacobi_solve` multiplies a Fourier mode of the right-hand side.

    For the mode with -Δ_h symbol σ and x = Δt·σ, the implicit solve is (1 + x·D) u = rhs. The
    exact solve gives r = 1/(1 + x·D); the m sweeps, started at u = rhs with the per-sweep scale
    ``scale`` = ω/(1 + Δt·c), leave the error (1 − r)·rhs multiplied by ε^m with
    ε = 1 − scale·(1 + x·D). A class that does not diffuse (D = 0) has R = 1.
    """
    r = 1.0 / (1.0 + x * d)
    eps = 1.0 - scale * (1.0 + x * d)
    return r + eps ** iterations * (1.0 - r)


def two_phase_amplification(x: torch.Tensor, d_j, d_k, chi_kj, damping_j, damping_k) -> torch.Tensor:
    """Linear amplification factor of one IMEX step + projection in a mixture of classes j and k.

    Frozen coefficients, the mode with -Δ_h symbol σ, x = Δt·σ, at the end p_k = 1 of the mixture
    p_j + p_k = 1 (the factor is linear in p_k, so the two ends bound it; the other end is the
    pair (j, k) read the other way round). The explicit cross-diffusion turns the perturbation
    (δ, −δ) of (p_j, p_k) into (δ, −δ(1 − x·χ_kj)); each class is then damped by its implicit
    diffusion (``damping_*`` = R of :func:`jacobi_damping`), and the projection keeps the mean
    of the two: g = ½ (R_j + R_k (1 − x·χ_kj)). The step is stable when |g| <= 1 for every σ.
    As σ → 0, g ≈ 1 − x (D_j + D_k + χ_kj)/2: the continuous problem is ill-posed (backward
    diffusion) when D_j + D_k + χ_kj < 0.
    """
    return 0.5 * (damping_j + damping_k * (1.0 - x * chi_kj))


class CrossDiffusionStability:
    """Result of :func:`cross_diffusion_stability`.

    Attributes:
        ill_posed: (k, j, margin) for each ordered class pair whose margin D_j + D_k + χ_kj
            (mm²/day) is negative somewhere in the domain (the smallest value): a mixture of
            the two classes then diffuses backwards and no time step makes it converge.
        unresolved: (k, j, margin) for pairs that are well-posed but whose margin is so small
            that even Δt/``max_substeps`` is not stable.
        substeps: how many equal steps Δt has to be divided into for stability (1: Δt is fine).
        max_stable_dt: Δt/substeps in days, or None when Δt itself is stable.
    """

    def __init__(self, ill_posed, unresolved, substeps: int, dt: float):
        self.ill_posed = ill_posed
        self.unresolved = unresolved
        self.substeps = substeps
        self.max_stable_dt = None if substeps <= 1 else dt / substeps

    def __repr__(self) -> str:
        return (f"CrossDiffusionStability(ill_posed={self.ill_posed}, unresolved={self.unresolved}, "
                f"substeps={self.substeps}, max_stable_dt={self.max_stable_dt})")


def _pair_coefficients(diffusion: torch.Tensor, chi: torch.Tensor, k: int, j: int,
                       mask: torch.Tensor | None, cache: dict | None = None) -> torch.Tensor | None:
    """Distinct rows (D_j, D_k, χ_kj) over the domain for one ordered pair, or None if χ_kj ≡ 0.

    ``cache`` keeps the distinct values of a class's D field between pairs (the usual case: only
    the tumour's D varies in space, and every pushed class pairs with it).
    """
    c = chi[k, j] if chi.dim() == 2 else chi[:, k, j]
    c = c.detach().to(torch.float64)
    if not bool((c != 0).any()):
        return None
    # a field that is constant (e.g. a zero D stored as a full field) counts as a scalar; the
    # fields keep their own dtype until they are reduced to distinct values (converting each
    # varying field to float64 first would copy the whole grid; the conversion is exact either way)
    columns = [_scalar_if_constant(diffusion[:, j].detach(), cache, ("constant", j)),
               _scalar_if_constant(diffusion[:, k].detach(), cache, ("constant", k)),
               _scalar_if_constant(c, None, None)]
    columns = [t.to(torch.float64) if t.numel() <= 1 else t for t in columns]
    varying = [i for i, t in enumerate(columns) if t.numel() > 1]
    if not varying:
        return torch.stack([t.reshape(()) for t in columns]).reshape(1, 3)
    if len(varying) == 1:
        i = varying[0]
        key = ("d", (j, k)[i]) if i < 2 else None
        if key is None or cache is None or key not in cache:
            t = columns[i]
            if mask is not None:
                inside, t = torch.broadcast_tensors(mask[:, 0].detach() > 0, t)
                t = t[inside]
            values = distinct_values(t.reshape(-1)).to(torch.float64)
            if key is not None and cache is not None:
                cache[key] = values
        else:
            values = cache[key]
        return torch.stack([values if m == i else columns[m].reshape(()).expand(values.numel()) for m in range(3)], dim=1)
    if mask is not None:
        inside, *fields = torch.broadcast_tensors(mask[:, 0].detach() > 0, *[columns[i] for i in varying])
        fields = [t[inside] for t in fields]
    else:
        fields = list(torch.broadcast_tensors(*[columns[i] for i in varying]))
        fields = [t.reshape(-1) for t in fields]
    # distinct rows from 1-D uniques: a row's key combines its columns' value indices, re-numbered
    # after each column so that it stays below the number of voxels
    key = None
    for t in fields:
        inverse = distinct_value_index(t)
        key = inverse if key is None else distinct_value_index(key * (int(inverse.max()) + 1) + inverse)
    one_each = torch.empty(int(key.max()) + 1, dtype=torch.int64)
    one_each.scatter_(0, key, torch.arange(key.numel(), dtype=torch.int64))
    picked = dict(zip(varying, (t[one_each].to(torch.float64) for t in fields)))
    n = one_each.numel()
    return torch.stack([picked[i] if i in picked else columns[i].reshape(()).expand(n) for i in range(3)], dim=1)


def _scalar_if_constant(t: torch.Tensor, cache: dict | None, key) -> torch.Tensor:
    """``t`` itself, or its one value as a 0-d tensor when every entry is equal (remembered in
    ``cache`` under ``key``: each class's D field is tested once, not once per pair)."""
    if t.numel() <= 1:
        return t
    if cache is not None and key in cache:
        constant = cache[key]
    else:
        constant = not bool((t != t.reshape(-1)[0]).any())
        if cache is not None:
            cache[key] = constant
    return t.reshape(-1)[:1].reshape(()) if constant else t


def distinct_values(values: torch.Tensor) -> torch.Tensor:
    """The sorted distinct values of a 1-D tensor (as ``torch.unique``).

    On CPU this goes through NumPy, whose vectorised sort makes it 10-20x faster than
    ``torch.unique`` on a 1 mm brain grid (8.9 M values: 0.04 s against 0.8 s); that sort was the
    largest part of a forecast's set-up (docs/performance.md, "Set-up before the first step").
    """
    if values.device.type != "cpu":
        return torch.unique(values)
    return torch.from_numpy(np.unique(values.detach().numpy()))


def distinct_value_index(values: torch.Tensor) -> torch.Tensor:
    """For each entry of a 1-D tensor, the index (int64) of its value among the sorted distinct
    values (``torch.unique(values, return_inverse=True)[1]``), by a search among those values."""
    if values.device.type != "cpu":
        return torch.unique(values, return_inverse=True)[1]
    array = values.detach().numpy()
    return torch.from_numpy(np.searchsorted(np.unique(array), array).astype(np.int64, copy=False))


def cross_diffusion_stability(diffusion: torch.Tensor, chi: torch.Tensor, spacing: Sequence[float],
                              spatial_shape: Sequence[int], dt: float, *, operator: DiffusionOperator | None = None,
                              jacobi_iters: int = 2, omega: float = 1.0, variant: str = "conservative",
                              mask: torch.Tensor | None = None, max_substeps: int = 64) -> CrossDiffusionStability:
    """Well-posedness of Eq. 2 on the simplex and the stable step of its explicit cross-diffusion.

    For every ordered class pair (k, j) with χ_kj ≠ 0 and every distinct combination of the
    coefficients (D_j(x), D_k(x), χ_kj(x)) in the domain:

    * **well-posedness**: the margin D_j + D_k + χ_kj must be >= 0. In a mixture of the two
      classes the projected PDE is ∂t p_k = ∇·(½(D_j + D_k + χ_kj p_k + χ_jk p_j) ∇p_k); a
      negative margin makes that diffusivity negative near p_k = 1 (backward diffusion: rounding
      errors grow at a rate ∝ 1/h², on any scheme). Pairs that violate it are reported and left
      out of the step limit (no step makes them converge).
    * **step limit**: the smallest number n of equal sub-steps of Δt for which the two-phase
      amplification factor (:func:`two_phase_amplification`, with the damping of the actual
      Jacobi sweeps) satisfies |g| <= 1 for all symbols σ in (0, σ_max]. Pairs still unstable at
      n = ``max_substeps`` (a margin near 0) are reported as unresolved.

    The two-phase analysis is exact for mixtures of two classes; for χ with a single non-zero
    column (one class pushing or pulling the others, as the brain mass effect) it was also checked
    to bound mixtures of any number of classes (docs/solver.md). With several interacting columns
    it is a necessary condition only. Fields with more than 4096 distinct coefficient
    combinations per pair are reduced to the 4096 with the smallest margin relative to
    |χ|·(D_j + D_k + |χ|).

    Args:
        diffusion: (B|1, C, *S|1...) D in mm²/day, as given to :class:`DiffusionOperator`.
        chi: (C, C) or (B|1, C, C, *S) χ in mm²/day.
        spacing, spatial_shape: the grid.
        dt: the step to check (days).
        operator: the diffusion operator (for the conservative Jacobi scale); built if None.
        jacobi_iters, omega, variant: the implicit solve's settings.
        mask: optional (B|1, 1, *S) domain mask.
        max_substeps: the largest subdivision considered.
    """
    sigma_max = largest_symbol(spacing, spatial_shape)
    num_classes = diffusion.shape[1]
    ill_posed, unresolved = [], []
    if sigma_max <= 0:
        return CrossDiffusionStability(ill_posed, unresolved, 1, dt)
    if variant == "conservative":
        if operator is None:
            operator = DiffusionOperator(diffusion.detach(), spacing, mask, spatial_shape)
        c_max = torch.zeros(num_classes, dtype=torch.float64)
        if operator.active:
            per_active = operator.max_diagonal().detach().to(torch.float64)
            per_active = per_active.reshape(per_active.shape[0], per_active.shape[1], -1).amax(dim=(0, 2))
            c_max[torch.tensor(operator.active)] = per_active
    sigma = sigma_max * torch.cat([torch.tensor([1e-4, 1e-3, 1e-2], dtype=torch.float64),
                                   torch.linspace(1.0 / _SYMBOL_SAMPLES, 1.0, _SYMBOL_SAMPLES, dtype=torch.float64)])
    needed = 1
    cache: dict = {}
    for k in range(num_classes):
        for j in range(num_classes):
            if j == k:
                continue
            rows = _pair_coefficients(diffusion, chi, k, j, mask, cache)
            if rows is None:
                continue
            d_j, d_k, c = rows.unbind(1)
            margin = d_j + d_k + c
            scale = (d_j + d_k + c.abs()).clamp(min=1e-300)
            tolerance = 1e-12 * scale
            low = float(margin.min())
            if bool((margin < -tolerance).any()):
                ill_posed.append((k, j, low))
            usable = margin > tolerance
            if bool((~usable & (margin >= -tolerance)).any()):
                unresolved.append((k, j, low))
            rows = rows[usable]
            if rows.shape[0] == 0:
                continue
            if rows.shape[0] > _MAX_COEFFICIENT_ROWS:
                d_j, d_k, c = rows.unbind(1)
                danger = c.abs() * (d_j + d_k + c.abs()) / (d_j + d_k + c)
                rows = rows[torch.topk(danger, _MAX_COEFFICIENT_ROWS).indices]
            d_j, d_k, c = (t[:, None] for t in rows.unbind(1))
            pending = torch.ones(rows.shape[0], dtype=torch.bool)
            for n in range(1, max_substeps + 1):
                tau = dt / n
                x = tau * sigma[None, :]
                if variant == "conservative":
                    s_j = omega / (1.0 + tau * c_max[j])
                    s_k = omega / (1.0 + tau * c_max[k])
                else:
                    s_j = omega / (1.0 + tau * d_j * sigma_max / 2)
                    s_k = omega / (1.0 + tau * d_k * sigma_max / 2)
                g = two_phase_amplification(x, d_j, d_k, c, jacobi_damping(x, d_j, s_j, jacobi_iters),
                                            jacobi_damping(x, d_k, s_k, jacobi_iters))
                stable = (g.abs() <= 1.0 + 1e-12).all(dim=1)
                newly = pending & stable
                if bool(newly.any()):
                    needed = max(needed, n)
                    pending &= ~stable
                if not bool(pending.any()):
                    break
            if bool(pending.any()):
                unresolved.append((k, j, float((d_j + d_k + c)[pending].min())))
    return CrossDiffusionStability(ill_posed, unresolved, needed, dt)
