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

import torch


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
    return 2.0 * a * b / (a + b).clamp(min=torch.finfo(u.dtype).tiny)  # a = b = 0 gives 0/tiny = 0


def face_both_inside(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Float face mask: 1 where both cells beside the face are inside the domain mask."""
    n = mask.shape[dim]
    return (mask.narrow(dim, 1, n - 1) * mask.narrow(dim, 0, n - 1)).to(mask.dtype)


def flux_divergence(face_flux: torch.Tensor, dim: int) -> torch.Tensor:
    """Net inflow per cell, F_{i-1/2} - F_{i+1/2}, with zero flux through the grid's outer faces.

    ``face_flux`` holds F_{i+1/2}, positive in the +``dim`` direction. Returns a cell-shaped tensor.
    """
    zero = torch.zeros_like(face_flux.narrow(dim, 0, 1))
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
                self.face_weights.append(face_harmonic_mean(d, 2 + axis) / (h * h))
        self._diagonal = None
        self._max_diagonal = None

    @property
    def diagonal(self) -> torch.Tensor:
        """c_i = sum of the weights of cell i's faces (1/day) for the active classes; the matrix
        diagonal is 1 + Δt·c. Computed on first use."""
        if self._diagonal is None:
            total = None
            for axis, w in enumerate(self.face_weights):
                dim = 2 + axis
                n = self.spatial_shape[axis]
                if self.uniform:
                    face_shape = [1] * (2 + len(self.spatial_shape))
                    face_shape[dim] = n - 1
                    faces = torch.ones(face_shape, dtype=w.dtype, device=w.device)
                    part = _face_sum(faces, dim, n) * w  # 2 faces inside, 1 at the grid's ends
                else:
                    part = _face_sum(w, dim, n)
                total = part if total is None else total + part
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


def _face_sum(face_values: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """Per cell, the sum of the values on its two faces along ``dim`` (outer faces count as 0)."""
    zero = torch.zeros_like(face_values.narrow(dim, 0, 1))
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
    p_k is taken from the upwind cell (first-order donor-cell upwinding), which is monotone
    and keeps p_k >= 0 when Δt·Σ|outflow velocities|/h <= 1 (a CFL condition). To stay
    positive for *any* Δt — the implicit diffusion allows large steps — the outflow of every
    cell is limited to its content: all fluxes leaving a cell are scaled by
    min(1, p_k / (Δt·outflow)). Below the CFL limit the limiter is inactive and the scheme is
    plain upwinding; above it the scheme stays positive and conservative (a limited flux
    leaves one cell and enters its neighbour), trading accuracy for robustness. Faces with an
    outside-mask cell carry no flux.
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
            outflow = outflow + _scatter_face_to_cells(out_plus, out_minus, dim, n)
        demand = dt * outflow
        limiter = torch.where(demand > p, p / torch.where(demand > 0, demand, torch.ones_like(demand)), torch.ones_like(p))
        limiter = torch.clamp(limiter, 0.0, 1.0)
        total = None
        for axis, (h, flux) in enumerate(zip(self.spacing, raw_fluxes)):
            dim = 2 + axis
            n = p.shape[dim]
            donor_factor = torch.where(flux > 0, limiter.narrow(dim, 0, n - 1), limiter.narrow(dim, 1, n - 1))
            part = flux_divergence(flux * donor_factor, dim) / h
            total = part if total is None else total + part
        return total


def _scatter_face_to_cells(to_lower_cell: torch.Tensor, to_upper_cell: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """Cell array where cell i gets ``to_lower_cell`` of face i+1/2 and cell i+1 gets ``to_upper_cell``."""
    zero = torch.zeros_like(to_lower_cell.narrow(dim, 0, 1))
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
