"""Gradient-safe explicit cross-diffusion for training: -∇·(Σ_{j≠k} χ_kj p_k ∇p_j) of Eq. 2.

Same discretisation and sign convention as :class:`AnatomyDTLib.operators.CrossDiffusionOperator`
(class k drifts with face velocity v_k = Σ_j χ_kj (p_j[i+1] - p_j[i]) / h, donor-cell upwinding,
outflow of every cell limited to its content for the step Δt, no flux through the grid border or
faces touching an outside-mask cell), so it is the same explicit term of the IMEX step.

Why a separate implementation: the library operator computes its limiter as ``p / demand``. When
a demand is denormal (far-field tails of diffused one-hot fields give velocities of 1e-30 and
less), the backward pass of that division overflows and multiplies inf by 0, so *every* gradient
of a training rollout becomes NaN after ~10 steps. Here the limiter is

    limiter = p / demand   where demand > max(p, 1e-12),   else 1

computed so that no branch ever divides by less than 1e-12: identical to the library's limiter
except that demands below 1e-12 are not limited (a possible overshoot below zero of at most
1e-12, removed by the simplex projection), and with derivatives bounded by 1e12. The learned model passes χ to the solver through
its reaction hook (evaluated at p^n like the solver's own explicit term) instead of the
``cross_diffusion`` argument.

Units: χ in mm²/day, spacing in mm, the tendency in 1/day.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..operators import face_both_inside, face_difference, flux_divergence, scatter_face_to_cells

_DEMAND_FLOOR = 1e-12  # demands below this are not limited (an overshoot of at most 1e-12)


def cross_diffusion_tendency(p: torch.Tensor, chi: torch.Tensor, spacing: Sequence[float], dt: float,
                             mask: torch.Tensor | None = None) -> torch.Tensor:
    """dp/dt (B, K, *S) of the cross-diffusion term at state ``p`` for a step of at most ``dt`` days.

    Args:
        p: (B, K, *S) field.
        chi: (K, K) χ in mm²/day (diagonal ignored, χ_kj < 0 pushes k away from j).
        spacing: mm per spatial axis.
        dt: the largest step (days) the outflow limiter must keep positive; a shorter actual step
            only makes the update more conservative.
        mask: optional (B|1, 1, *S) float domain mask; faces touching an outside cell carry no flux.
    """
    potential = torch.einsum("kj,bj...->bk...", chi, p)
    fluxes = []
    outflow = torch.zeros_like(p)
    for axis, h in enumerate(spacing):
        dim = 2 + axis
        n = p.shape[dim]
        velocity = face_difference(potential, dim) / h
        if mask is not None:
            velocity = velocity * face_both_inside(mask, dim)
        flux = torch.clamp(velocity, min=0.0) * p.narrow(dim, 0, n - 1) + torch.clamp(velocity, max=0.0) * p.narrow(dim, 1, n - 1)
        fluxes.append(flux)
        outflow = outflow + scatter_face_to_cells(torch.clamp(flux, min=0.0) / h, torch.clamp(-flux, min=0.0) / h, dim)
    demand = dt * outflow
    # Limit only where the demand exceeds the content and a floor; both branches stay finite in
    # the backward pass (the divisor is >= the floor wherever the quotient is used).
    limit = demand > torch.clamp(p, min=_DEMAND_FLOOR)
    limiter = torch.where(limit, torch.clamp(p, min=0.0) / torch.where(limit, demand, torch.ones_like(demand)),
                          torch.ones_like(p))
    total = None
    for axis, (h, flux) in enumerate(zip(spacing, fluxes)):
        dim = 2 + axis
        n = p.shape[dim]
        donor = torch.where(flux > 0, limiter.narrow(dim, 0, n - 1), limiter.narrow(dim, 1, n - 1))
        part = flux_divergence(flux * donor, dim) / h
        total = part if total is None else total + part
    return total
